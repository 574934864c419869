"""llava-hf checkpoint -> LlavaModel: strict, memory-mapped, with one table of key rules.

Three layouts reach us:
  (a) hub files written by transformers 4.x: `language_model.model.*`, `language_model.lm_head.*`,
      `vision_tower.vision_model.*` (HF CLIP spelling, `pre_layrnorm`), `multi_modal_projector.*`;
  (b) transformers 5 `save_pretrained`: as (a) but `vision_tower.*` without `vision_model`;
  (c) transformers 5 in-memory names: `model.language_model.*`, `model.vision_tower.*`,
      `model.multi_modal_projector.*`, `lm_head.*`.
KEY_RULES rewrites each checkpoint key in order; every rule that matches applies, and a
rule with replacement None drops the key. HF CLIP stores q, k and v separately while
open_clip packs them into one `in_proj`; those keys are tagged `[q]`, `[k]`, `[v]` by the
table and concatenated by `fuse_qkv`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import LlavaConfig
from .llava import LlavaModel

log = logging.getLogger(__name__)

KEY_RULES: list[tuple[str, str | None]] = [
    # layouts -> one naming (the model's own module tree)
    (r"^model\.language_model\.", "language_model."),  # (c)
    (r"^language_model\.model\.", "language_model."),  # (a), (b)
    (r"^lm_head\.", "language_model.lm_head."),  # (c); (a)/(b) already say language_model.lm_head.
    (r"^model\.vision_tower\.", "vision_tower."),  # (c)
    (r"^vision_tower\.vision_model\.", "vision_tower."),  # (a)
    (r"^(model\.)?multi_modal_projector\.", "projector."),  # all
    (r"\.rotary_emb\.inv_freq$", None),  # a buffer some old files carry; recomputed from the config
    # HF CLIPVisionTransformer -> open_clip VisionTransformer
    (r"^vision_tower\.embeddings\.position_ids$", None),  # an index buffer, not a weight
    (r"^vision_tower\.embeddings\.patch_embedding\.", "vision_tower.visual.conv1."),
    (r"^vision_tower\.embeddings\.class_embedding$", "vision_tower.visual.class_embedding"),
    (r"^vision_tower\.embeddings\.position_embedding\.weight$", "vision_tower.visual.positional_embedding"),
    (r"^vision_tower\.pre_layrnorm\.", "vision_tower.visual.ln_pre."),
    (r"^vision_tower\.post_layernorm\.", "vision_tower.visual.ln_post."),
    (r"^vision_tower\.encoder\.layers\.(\d+)\.", r"vision_tower.visual.transformer.resblocks.\1."),
    (r"(resblocks\.\d+)\.layer_norm1\.", r"\1.ln_1."),
    (r"(resblocks\.\d+)\.layer_norm2\.", r"\1.ln_2."),
    (r"(resblocks\.\d+)\.mlp\.fc1\.", r"\1.mlp.c_fc."),
    (r"(resblocks\.\d+)\.mlp\.fc2\.", r"\1.mlp.c_proj."),
    (r"(resblocks\.\d+)\.self_attn\.out_proj\.", r"\1.attn.out_proj."),
    (r"(resblocks\.\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", r"\1.attn.in_proj_\3[\2]"),  # fuse_qkv
]
_COMPILED = [(re.compile(p), r) for p, r in KEY_RULES]


def map_key(key: str) -> str | None:
    """A checkpoint key -> the model's parameter name (None: dropped)."""
    for pattern, repl in _COMPILED:
        if pattern.search(key):
            if repl is None:
                return None
            key = pattern.sub(repl, key)
    return key


_QKV = re.compile(r"^(.*)\[([qkv])\]$")


def fuse_qkv(parts: dict[str, dict[str, torch.Tensor]], missing: list[str]) -> dict[str, torch.Tensor]:
    """{'...in_proj_weight': {'q': t, 'k': t, 'v': t}} -> {'...in_proj_weight': cat(q, k, v)} (dim 0)."""
    fused = {}
    for name, qkv in parts.items():
        absent = [f"{name}[{p}]" for p in "qkv" if p not in qkv]
        if absent:
            missing.extend(absent)
            continue
        fused[name] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)  # (3D, D) or (3D,)
    return fused


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what and where."""


def _checkpoint_files(folder: Path, allow_pickle: bool) -> tuple[list[Path], str]:
    """The weight files of a checkpoint folder, and their format ('safetensors' or 'pickle')."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(absent)}")
        return files, "safetensors"
    if single.is_file():
        return [single], "safetensors"
    pickles = sorted(folder.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{folder} holds only pickle weights ({pickles[0].name}); unpickling can run arbitrary "
                "code. Convert to safetensors, or pass allow_pickle=True if you trust the file")
        return pickles, "pickle"
    raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or "
                          "pytorch_model*.bin")


def _iter_tensors(files: list[Path], fmt: str, device: str):
    """Yield (file, key, lazy tensor getter, shape, dtype) without reading any tensor data."""
    for f in files:
        if fmt == "pickle":
            sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            for k, t in sd.items():
                yield f, k, (lambda t=t: t), tuple(t.shape), t.dtype
            continue
        try:
            handle = safe_open(str(f), framework="pt", device=device)
            keys = list(handle.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
        for k in keys:
            sl = handle.get_slice(k)
            dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
            yield f, k, (lambda h=handle, k=k: h.get_tensor(k)), tuple(sl.get_shape()), dtype


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                       "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The floating dtype most of a checkpoint's tensors are stored in."""
    folder = Path(path)
    files, fmt = _checkpoint_files(folder, allow_pickle=True)
    counts: dict[torch.dtype, int] = {}
    for _, _, _, _, dtype in _iter_tensors(files, fmt, "cpu"):
        if dtype is not None and dtype.is_floating_point:
            counts[dtype] = counts.get(dtype, 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32


def default_dtype(stored: torch.dtype, device: str | torch.device) -> torch.dtype:
    """The checkpoint's dtype on GPU; on CPU bf16 in place of fp16 (fp16 matmuls crawl on CPU)."""
    if torch.device(device).type == "cpu" and stored == torch.float16:
        return torch.bfloat16
    return stored


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    allow_pickle: bool = False) -> LlavaModel:
    """Build a LlavaModel from a llava-hf checkpoint folder, strictly: every tensor placed, every
    parameter filled, or one CheckpointError listing what is missing, unexpected or mis-shaped."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    cfg = LlavaConfig.from_json(folder / "config.json")
    files, fmt = _checkpoint_files(folder, allow_pickle)
    device = torch.device(device)
    if dtype is None:
        dtype = default_dtype(checkpoint_dtype(folder), device)

    with torch.device("meta"):
        model = LlavaModel(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = cfg.text.tie_word_embeddings
    if tied:
        expected.pop("language_model.lm_head.weight")

    loaded: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unexpected, mismatched, missing = [], [], []
    read_device = "cpu" if fmt == "pickle" else str(device)
    for f, key, get, shape, _ in _iter_tensors(files, fmt, read_device):
        name = map_key(key)
        if name is None or (tied and name == "language_model.lm_head.weight"):
            continue  # dropped by a rule, or the tied copy of the embeddings
        m = _QKV.match(name)
        target = m.group(1) if m else name
        if target not in expected:
            unexpected.append(f"{key} (in {f.name})")
            continue
        if m:  # one third of a packed in_proj: rows [i*D, (i+1)*D)
            want = (expected[target][0] // 3,) + expected[target][1:]
            if shape != want:
                mismatched.append(f"{key}: checkpoint {list(shape)}, model {target} needs {list(want)}")
                continue
            qkv.setdefault(target, {})[m.group(2)] = _read(get, f, key).to(dtype)
            continue
        if shape != expected[target]:
            mismatched.append(f"{key}: checkpoint {list(shape)}, model {target} needs {list(expected[target])}")
            continue
        loaded[target] = _read(get, f, key).to(device=device, dtype=dtype)
    loaded.update(fuse_qkv(qkv, missing))
    missing.extend(sorted(set(expected) - set(loaded)))
    if missing or unexpected or mismatched:
        raise CheckpointError(_report(folder, missing, unexpected, mismatched))

    model.load_state_dict(loaded, strict=True, assign=True)
    model.language_model.rotary.__init__(cfg.text)  # non-persistent buffer: rebuilt off the meta device
    model.language_model.rotary.to(device)
    if tied:
        model.language_model.lm_head.weight = model.language_model.embed_tokens.weight
    stray = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not stray, f"left on the meta device: {stray}"
    log.info("loaded %s: %d tensors from %d file(s) as %s on %s", folder, len(loaded), len(files), dtype, device)
    return model.eval()


def _read(get, f: Path, key: str) -> torch.Tensor:
    try:
        return get()
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{f}: cannot read tensor {key!r} ({e}); is the file truncated?") from None


def _report(folder: Path, missing: list, unexpected: list, mismatched: list, limit: int = 20) -> str:
    lines = [f"{folder}: the checkpoint does not fit the model its config.json describes"]
    for title, items in (("missing from the checkpoint", missing), ("unexpected in the checkpoint", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines += [f"    {x}" for x in items[:limit]]
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more")
    return "\n".join(lines)
