"""LoRA adapters on the decoder's linear layers: peft's key names -> ours, the settings a merge
can honour, and the merged deltas W += (alpha / r) * B @ A (Hu et al. 2021).

Adapters are keyed by our decoder module names, e.g. `layers.3.self_attn.q_proj.lora_A.weight`
(A: (r, in), B: (out, r)); training may use peft, whose names `normalize_lora_key` strips.
"""

from __future__ import annotations

import math
import re

import torch

from ..model.config import TextConfig
from ..model.llama import Block
from .loader import CheckpointError

_LORA_KEY = re.compile(r"^layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.lora_([AB])\.weight$")


def normalize_lora_key(key: str) -> str:
    """peft's names -> ours: 'base_model.model.[language_model.]layers.3.self_attn.q_proj.lora_A[.default].weight'
    -> 'layers.3.self_attn.q_proj.lora_A.weight'."""
    key = re.sub(r"^base_model\.model\.", "", key)
    key = re.sub(r"^(model\.)?language_model\.", "", key)
    key = re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", key)  # adapter name
    return key


def normalize_lora_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA A/B matrices keyed by our decoder module names; a ValueError names any key that is not
    a decoder LoRA matrix, and any A without its B."""
    out, bad = {}, []
    for key, t in state.items():
        name = normalize_lora_key(key)
        if _LORA_KEY.match(name):
            out[name] = t
        else:
            bad.append(key)
    if bad:
        raise ValueError(f"LoRA state: {len(bad)} key(s) are not LoRA A/B matrices of the decoder's "
                         f"linear layers (vision-tower LoRA must be merged before save_parts): {bad[:5]}")
    alone = [k for k in out if k.replace("lora_A", "lora_B") not in out or k.replace("lora_B", "lora_A") not in out]
    if alone:
        raise ValueError(f"LoRA state: A and B must come in pairs; unpaired: {alone[:5]}")
    return out


_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "alpha_pattern": {},
                "modules_to_save": None, "trainable_token_indices": None, "layer_replication": None}


def lora_settings(lora_config, state: dict[str, torch.Tensor], base_model: str | None = None) -> dict:
    """adapter_config.json for a normalised LoRA state: r, lora_alpha, use_rslora, target_modules.
    `lora_config` is a dict or a peft LoraConfig; settings the merge cannot honour are refused."""
    d = lora_config.to_dict() if hasattr(lora_config, "to_dict") else dict(lora_config)
    for key in ("r", "lora_alpha"):
        if key not in d:
            raise ValueError(f"lora_config lacks {key!r}")
    for key, ok in _UNSUPPORTED.items():
        if d.get(key, ok) not in (ok, None, {}, False):
            raise ValueError(f"lora_config {key}={d[key]!r} is not supported by the merge ({ok!r})")
    if d.get("bias", "none") != "none":
        raise ValueError(f"lora_config bias={d['bias']!r} is not supported ('none')")
    modules = sorted({_LORA_KEY.match(k).group(2).split(".")[-1] for k in state})
    return {"peft_type": "LORA", "r": int(d["r"]), "lora_alpha": float(d["lora_alpha"]),
            "use_rslora": bool(d.get("use_rslora", False)), "target_modules": modules, "bias": "none",
            "base_model": base_model}


def lora_deltas(state: dict[str, torch.Tensor], settings: dict, cfg: TextConfig, source: str = "LoRA"):
    """Yield (decoder weight name, delta (out, in) fp32) = scale * B @ A, scale = alpha / r
    (alpha / sqrt(r) with use_rslora), r being each module's own rank (A's rows)."""
    shapes = _decoder_linear_shapes(cfg)
    for key in sorted(k for k in state if ".lora_A." in k):
        module = key[:-len(".lora_A.weight")]
        a, b = state[key].float(), state[key.replace("lora_A", "lora_B")].float()  # (r, in), (out, r)
        want = shapes.get(module + ".weight")
        if want is None or a.shape[1] != want[1] or b.shape[0] != want[0] or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{source}: {key} {list(a.shape)} / lora_B {list(b.shape)} do not fit "
                                  f"{module} {list(want) if want else '(no such module)'}")
        r = a.shape[0]
        scale = settings["lora_alpha"] / (math.sqrt(r) if settings.get("use_rslora") else r)
        yield module + ".weight", scale * (b @ a)  # (out, r) @ (r, in) -> (out, in)


def _decoder_linear_shapes(cfg: TextConfig) -> dict[str, tuple[int, int]]:
    with torch.device("meta"):
        block = Block(cfg, 0)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items() if v.ndim == 2}
    return {f"layers.{i}.{k}": s for i in range(cfg.num_hidden_layers) for k, s in shapes.items()}
