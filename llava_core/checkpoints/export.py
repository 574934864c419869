"""LlavaModel -> a llava-hf checkpoint folder, in the transformers-4.x hub layout.

The inverse of loader.py, read from the same table (keymap.py): `hub_names` gives each of our
parameters the hub name it is loaded from (`language_model.model.*`, `language_model.lm_head.weight`,
`vision_tower.vision_model.*` with HF CLIP names, `multi_modal_projector.*`), and open_clip's
packed `in_proj` is split back into CLIP's q, k and v (`qkv_rows`, the loader's own view).
config.json is generated from our config dataclasses.

Every folder is written into a temp folder beside the target and renamed into place
(`atomic_folder`), so a crash never leaves a half-written checkpoint under the target's name.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ..atomic import atomic_folder, write_json
from ..model.config import LlavaConfig
from ..model.llava import LlavaModel
from ..model.next_config import LlavaNextConfig
from .keymap import hub_names, qkv_rows

log = logging.getLogger(__name__)

def hub_state_dict(model: LlavaModel, dtype: torch.dtype | None = None, prefixes: tuple[str, ...] = ("",)
                   ) -> dict[str, torch.Tensor]:
    """{hub key: CPU tensor} for the parameters whose names start with one of `prefixes`.
    A tied lm_head is left out, as transformers saves it."""
    out = {}
    tied = model.cfg.text.tie_word_embeddings
    for name, t in model.state_dict().items():
        if not name.startswith(prefixes) or (tied and name == "language_model.lm_head.weight"):
            continue
        t = t.detach().to("cpu", dtype or t.dtype)
        for key, part in hub_names(name):
            # q/k/v: cloned so each tensor owns its storage (safetensors refuses shared memory)
            out[key] = qkv_rows(t, part).clone() if part else t.contiguous()
    return out


# --- config.json --------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def llava_hf_config(cfg: LlavaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A complete llava-hf config.json dict (transformers-4.x spelling) for our config."""
    v, t = cfg.vision, cfg.text
    vision = dict(model_type="clip_vision_model", hidden_size=v.hidden_size,
                  intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
                  num_attention_heads=v.num_attention_heads, image_size=v.image_size,
                  patch_size=v.patch_size, num_channels=v.num_channels, hidden_act=v.hidden_act,
                  layer_norm_eps=v.layer_norm_eps, attention_dropout=0.0)
    text = dict(model_type="llama", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                head_dim=t.head_dim, max_position_embeddings=t.max_position_embeddings,
                rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, rope_scaling=t.rope_scaling,
                hidden_act="silu", attention_bias=False, mlp_bias=False,
                tie_word_embeddings=t.tie_word_embeddings, bos_token_id=t.bos_token_id,
                eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id, torch_dtype=_dtype_name(dtype))
    out = dict(architectures=["LlavaForConditionalGeneration"], model_type="llava",
               vision_config=vision, text_config=text,
               image_token_index=cfg.image_token_index, image_seq_length=cfg.num_image_tokens,
               vision_feature_layer=cfg.vision_feature_layer,
               vision_feature_select_strategy=cfg.vision_feature_select_strategy,
               projector_hidden_act="gelu", multimodal_projector_bias=cfg.projector.bias,
               tie_word_embeddings=t.tie_word_embeddings, pad_token_id=t.pad_token_id,
               torch_dtype=_dtype_name(dtype))
    if t.sliding_window is not None:  # LLaMA has no window: only a Mistral config can say it
        text.update(model_type="mistral", sliding_window=t.sliding_window)
    if isinstance(cfg, LlavaNextConfig):  # image_newline keeps its name (keymap.KEY_MAP)
        out.update(architectures=["LlavaNextForConditionalGeneration"], model_type="llava_next",
                   image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints])
    # transformers' LlavaMultiModalProjector is mlp2x_gelu only; the field and the key names of
    # the others are listed in projector.py's docstring
    if cfg.projector.kind != "mlp2x_gelu":
        log.warning("projector %r: llava_core reads this checkpoint, transformers cannot", cfg.projector.kind)
        out["llava_core_projector"] = cfg.projector.kind
    return out


def generation_config(cfg: LlavaConfig) -> dict:
    """generation_config.json: the EOS ids transformers' generate must stop on."""
    t = cfg.text
    return {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id}


# --- writing ------------------------------------------------------------------------------

def parse_size(size: int | str) -> int:
    """500_000, '500KB' (10^3), '2GiB' (2^30) ... -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", size.upper())
    if not m:
        raise ValueError(f"shard_size={size!r}: expected bytes as an int, or e.g. '500MB', '2GiB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, shard_size: int | str | None = None,
                      name: str = "model") -> list[Path]:
    """`{name}.safetensors`, or shards `{name}-0000i-of-0000n.safetensors` no larger than shard_size
    (a tensor larger than that gets a shard of its own) plus `{name}.safetensors.index.json`."""
    from safetensors.torch import save_file

    limit = parse_size(shard_size) if shard_size is not None else None
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for key, t in tensors.items():
        size = t.numel() * t.element_size()
        if limit is not None and shards[-1] and used + size > limit:
            shards.append({})
            used = 0
        shards[-1][key] = t
        used += size
    if len(shards) == 1:
        path = folder / f"{name}.safetensors"
        save_file(shards[0], str(path), metadata={"format": "pt"})
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = folder / f"{name}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        weight_map.update({k: path.name for k in shard})
        paths.append(path)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(folder / f"{name}.safetensors.index.json", {"metadata": {"total_size": total},
                                                            "weight_map": weight_map})
    return paths


def write_llava_hf(model: LlavaModel, folder: Path, dtype: torch.dtype | None = None,
                   shard_size: int | str | None = None) -> None:
    """Weights, config.json and generation_config.json into an existing folder (not atomic:
    `save_llava_hf` and assembly call it inside `atomic_folder`)."""
    dtype = dtype or model.dtype
    tensors = hub_state_dict(model, dtype)
    write_safetensors(tensors, folder, shard_size)
    write_json(folder / "config.json", llava_hf_config(model.cfg, dtype))
    write_json(folder / "generation_config.json", generation_config(model.cfg))
    log.info("wrote %d tensors (%s) to %s", len(tensors), _dtype_name(dtype), folder)


def save_llava_hf(model: LlavaModel, folder: str | Path, dtype: torch.dtype | None = None,
                  shard_size: int | str | None = None) -> Path:
    """Write `model` as a llava-hf checkpoint folder (weights, config.json, generation_config.json).

    dtype: the stored dtype (None: the model's). shard_size: bytes or '500MB'; None writes one
    file. An existing checkpoint at `folder` is replaced as a whole; a folder that holds other
    things is refused. Tokenizer and processor files are the caller's (see default_model)."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        write_llava_hf(model, tmp, dtype, shard_size)
    return folder


# --- atomic folders -----------------------------------------------------------------------


def processor_config(cfg: LlavaConfig, image_token: str = "<image>") -> dict:
    """processor_config.json as transformers' LlavaProcessor reads it. transformers counts
    (H/p)*(W/p) + num_additional_image_tokens, minus 1 for "default": the CLS token is the one
    additional token, whichever the strategy."""
    return {"processor_class": "LlavaProcessor", "patch_size": cfg.vision.patch_size,
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
            "num_additional_image_tokens": 1, "image_token": image_token}


def write_processor_files(folder: Path, cfg: LlavaConfig, image_token: str = "<image>",
                          chat_template: str | None = None) -> None:
    """preprocessor_config.json (a CLIPImageProcessor at the tower's size, OpenAI CLIP's mean and
    std), processor_config.json and, if given, chat_template.json, as llava-hf ships them."""
    from ..model.processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    size = cfg.vision.image_size
    write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
        "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True})
    write_json(folder / "processor_config.json", processor_config(cfg, image_token))
    if chat_template is not None:
        write_json(folder / "chat_template.json", {"chat_template": chat_template})


def complete_processor_files(folder: Path) -> None:
    """Fill in what transformers' LlavaProcessor needs and a checkpoint may lack: processor_config.json's
    patch_size, num_additional_image_tokens, strategy and image token; a CLIP preprocessor_config.json."""
    cfg = LlavaConfig.from_json(folder / "config.json")
    token = _token_string(folder, cfg.image_token_index) or "<image>"
    if not (folder / "preprocessor_config.json").is_file():
        write_processor_files(folder, cfg, token)
    path = folder / "processor_config.json"
    proc = json.loads(path.read_text()) if path.is_file() else {}
    for key, value in processor_config(cfg, token).items():
        proc.setdefault(key, value)
    write_json(path, proc)


def _token_string(folder: Path, token_id: int) -> str | None:
    """The added token with this id in tokenizer.json, if any."""
    try:
        added = json.loads((folder / "tokenizer.json").read_text()).get("added_tokens", [])
    except (OSError, json.JSONDecodeError):
        return None
    return next((t["content"] for t in added if t.get("id") == token_id), None)
