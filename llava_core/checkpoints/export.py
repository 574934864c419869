"""LlavaModel -> a llava-hf checkpoint folder, in the transformers-4.x hub layout.

The inverse of loader.py: `EXPORT_RULES` rewrites each of our parameter names to the hub
name it was read from (`language_model.model.*`, `language_model.lm_head.weight`,
`vision_tower.vision_model.*` with HF CLIP names, `multi_modal_projector.*`), and open_clip's
packed `in_proj` is split back into CLIP's q, k and v (`qkv_rows`, the loader's own view).
`map_key(hub_name(k)) == k` for every parameter is checked by the tests, so the two tables
cannot drift apart. config.json is generated from our config dataclasses.

Every folder is written into a temp folder beside the target and renamed into place
(`atomic_folder`), so a crash never leaves a half-written checkpoint under the target's name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from ..model.config import LlavaConfig
from ..model.llava import LlavaModel
from ..model.next_config import LlavaNextConfig
from .loader import qkv_rows

log = logging.getLogger(__name__)

# Our parameter name -> hub name; every rule that matches applies, in order (as KEY_RULES).
# `{qkv}` marks a packed in_proj that becomes three hub tensors, q, k and v.
EXPORT_RULES: list[tuple[str, str]] = [
    (r"^language_model\.(?!lm_head\.)", "language_model.model."),  # lm_head stays language_model.lm_head
    (r"^projector\.", "multi_modal_projector."),
    # open_clip VisionTransformer -> HF CLIPVisionTransformer
    (r"^vision_tower\.visual\.conv1\.", "vision_tower.vision_model.embeddings.patch_embedding."),
    (r"^vision_tower\.visual\.class_embedding$", "vision_tower.vision_model.embeddings.class_embedding"),
    (r"^vision_tower\.visual\.positional_embedding$",
     "vision_tower.vision_model.embeddings.position_embedding.weight"),
    (r"^vision_tower\.visual\.ln_pre\.", "vision_tower.vision_model.pre_layrnorm."),
    (r"^vision_tower\.visual\.ln_post\.", "vision_tower.vision_model.post_layernorm."),
    (r"^vision_tower\.visual\.transformer\.resblocks\.(\d+)\.", r"vision_tower.vision_model.encoder.layers.\1."),
    (r"(encoder\.layers\.\d+)\.ln_1\.", r"\1.layer_norm1."),
    (r"(encoder\.layers\.\d+)\.ln_2\.", r"\1.layer_norm2."),
    (r"(encoder\.layers\.\d+)\.mlp\.c_fc\.", r"\1.mlp.fc1."),
    (r"(encoder\.layers\.\d+)\.mlp\.c_proj\.", r"\1.mlp.fc2."),
    (r"(encoder\.layers\.\d+)\.attn\.out_proj\.", r"\1.self_attn.out_proj."),
    (r"(encoder\.layers\.\d+)\.attn\.in_proj_(weight|bias)$", r"\1.self_attn.{qkv}_proj.\2"),
]
_COMPILED = [(re.compile(p), r) for p, r in EXPORT_RULES]


def hub_names(name: str) -> list[tuple[str, str | None]]:
    """Our parameter name -> [(hub key, None)], or three (hub key, 'q'|'k'|'v') for a packed in_proj."""
    for pattern, repl in _COMPILED:
        name = pattern.sub(repl, name)
    if "{qkv}" in name:
        return [(name.replace("{qkv}", p), p) for p in "qkv"]
    return [(name, None)]


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
    if isinstance(cfg, LlavaNextConfig):  # image_newline keeps its name: no EXPORT_RULES line
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


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


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

def _replaceable(folder: Path) -> bool:
    """An existing folder we may replace: empty, or a checkpoint (it has config.json)."""
    return not any(folder.iterdir()) or (folder / "config.json").is_file()


@contextmanager
def atomic_folder(target: str | Path, overwrite: bool = True):
    """Yield a fresh temp folder beside `target`; on success rename it to `target`.

    An existing `target` is moved aside first and deleted after the rename (only if it is
    empty or a checkpoint folder, and overwrite=True); on an error the temp folder is removed
    and `target` is untouched."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{target}: the folder exists and is not empty (pass overwrite)")
        if not _replaceable(target):
            raise FileExistsError(f"{target}: the folder holds files but no config.json; refusing to "
                                  "replace what does not look like a checkpoint")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        yield tmp
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, target: Path) -> None:
    """Rename tmp to target, moving an existing target aside first."""
    for f in tmp.rglob("*"):  # safetensors and mkdtemp create owner-only files
        os.chmod(f, 0o755 if f.is_dir() else 0o644)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
