"""llava-hf checkpoint -> LlavaModel: strict and streamed.

Any of the three llava-hf layouts (hub 4.x files, transformers 5 saves, in-memory names) loads;
keymap.py's one table maps each checkpoint key to a parameter name; HF CLIP's separate q, k
and v come back tagged `[q]`, `[k]`, `[v]` and are read straight into their rows of
open_clip's packed `in_proj` (`qkv_rows`).

Every name and shape is checked before any tensor data is read. Each tensor is then read
from the file into memory the model owns, converting dtype a bounded chunk at a time, so
peak memory is the model plus one chunk: no second copy of the weights (as an mmap of the
file, a pre-conversion copy, or q/k/v awaiting a cat), and no parameter that breaks
(SIGBUS) or silently changes when the checkpoint file is later rewritten in place.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..model.llava import LlavaModel
from ..model.llava_next import LlavaNextModel
from ..model.next_config import LlavaNextConfig, read_config
from .keymap import map_key, qkv_rows

log = logging.getLogger(__name__)

_QKV = re.compile(r"^(.*)\[([qkv])\]$")  # a name keymap tags for qkv_rows


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


def _iter_tensors(files: list[Path], fmt: str):
    """Yield (file, key, read, shape, dtype) without reading tensor data; read(dest) fills a
    tensor of that shape (any dtype, any device) with the stored values."""
    for f in files:
        if fmt == "pickle":
            try:
                sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except (OSError, RuntimeError, ValueError, EOFError) as e:
                raise CheckpointError(f"{f}: not a readable torch checkpoint ({e})") from None
            for k, t in sd.items():
                yield f, k, (lambda dest, t=t: dest.copy_(t)), tuple(t.shape), t.dtype
            continue
        try:  # safe_open checks the header and that the data exactly covers the rest of the file
            with safe_open(str(f), framework="pt") as handle:
                meta = {k: (sl.get_dtype(), tuple(sl.get_shape())) for k in handle.keys()
                        for sl in [handle.get_slice(k)]}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e}){_size_hint(f)}") from None
        data_start, header = _header(f)
        for k, (code, shape) in meta.items():
            dtype = _SAFETENSORS_DTYPES.get(code)
            start = data_start + header[k]["data_offsets"][0]
            yield f, k, (lambda dest, f=f, s=start, dt=dtype: _read_into(f, s, dt, dest)), shape, dtype


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                       "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                       "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_CHUNK_BYTES = 1 << 26  # a dtype conversion reads through a buffer this large (64 MiB)


def _header(f: Path) -> tuple[int, dict[str, dict]]:
    """(byte where tensor data starts, {key: {"dtype", "shape", "data_offsets"}}) of a safetensors file."""
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")  # header length, u64 little-endian
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def _size_hint(f: Path) -> str:
    """'; the file has N bytes, its header describes M' when the header is readable but the sizes differ."""
    try:
        start, header = _header(f)
        end = start + max((v["data_offsets"][1] for v in header.values()), default=0)
    except Exception:  # only a hint; safe_open's error stands on its own
        return ""
    size = f.stat().st_size
    return f"; the file has {size} bytes, its header describes {end} (truncated?)" if size != end else ""


def _read_into(f: Path, start: int, stored: torch.dtype, dest: torch.Tensor) -> None:
    """Fill dest (contiguous) from the bytes at `start` of f, stored as `stored` (little-endian,
    as safetensors writes and every platform torch runs on reads)."""
    flat = dest.view(-1)
    with open(f, "rb", buffering=0) as fh:
        if stored == dest.dtype and dest.device.type == "cpu":
            _readinto(fh, start, flat.view(torch.uint8), f)  # straight into the parameter
            return
        step = max(1, _CHUNK_BYTES // stored.itemsize)
        buf = torch.empty(min(step, flat.numel()), dtype=stored)
        for i in range(0, flat.numel(), step):
            part = buf[:min(step, flat.numel() - i)]
            _readinto(fh, start + i * stored.itemsize, part.view(torch.uint8), f)
            flat[i:i + part.numel()].copy_(part)  # converts dtype, moves to dest's device


def _readinto(fh, offset: int, dest: torch.Tensor, f: Path) -> None:
    """Read exactly dest.numel() bytes at `offset` into the uint8 tensor dest."""
    view = memoryview(dest.numpy()).cast("B")
    fh.seek(offset)
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{f}: ends at byte {offset + done}, but a tensor needs bytes up to "
                                  f"{offset + len(view)}; the file was truncated or rewritten while loading")
        done += n


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The floating dtype that holds most of a checkpoint's weight bytes (not most tensors: a
    checkpoint may keep its many small norms in fp32 and its matrices in fp16)."""
    folder = Path(path)
    files, fmt = _checkpoint_files(folder, allow_pickle=True)
    nbytes: dict[torch.dtype, int] = {}
    for _, _, _, shape, dtype in _iter_tensors(files, fmt):
        if dtype is not None and dtype.is_floating_point:
            nbytes[dtype] = nbytes.get(dtype, 0) + math.prod(shape) * dtype.itemsize
    return max(nbytes, key=nbytes.get) if nbytes else torch.float32


def default_dtype(stored: torch.dtype, device: str | torch.device) -> torch.dtype:
    """The checkpoint's dtype on GPU; on CPU bf16 in place of fp16 (fp16 matmuls crawl on CPU)."""
    if torch.device(device).type == "cpu" and stored == torch.float16:
        return torch.bfloat16
    return stored


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    allow_pickle: bool = False, quantize: str | None = None,
                    check_finite: bool = True) -> LlavaModel:
    """Build a LlavaModel from a llava-hf checkpoint folder, strictly: every tensor placed, every
    parameter filled, or one CheckpointError listing what is missing, unexpected or mis-shaped.
    check_finite: refuse a tensor holding NaN or inf as it is read (see _check_finite).
    quantize "int8" / "nf4": the decoder's projections through bitsandbytes on CUDA (int8 on the
    CPU: weight-only int8); see checkpoints/quantize.py."""
    if quantize is not None:
        from .quantize import check_quantize, quantize_loaded

        device = torch.device(device)
        check_quantize(quantize, device, dtype)
        if device.type == "cuda":  # read in fp16 into CPU memory; quantize_loaded moves it
            model = load_pretrained(path, dtype or torch.float16, "cpu", allow_pickle, check_finite=check_finite)
        else:
            model = load_pretrained(path, dtype, device, allow_pickle, check_finite=check_finite)
        return quantize_loaded(model, quantize, device, dtype)
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    cfg = read_config(folder / "config.json")  # LlavaConfig, or LlavaNextConfig for model_type llava_next
    files, fmt = _checkpoint_files(folder, allow_pickle)
    device = torch.device(device)
    if dtype is None:
        dtype = default_dtype(checkpoint_dtype(folder), device)

    with torch.device("meta"):
        model = LlavaNextModel(cfg) if isinstance(cfg, LlavaNextConfig) else LlavaModel(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = cfg.text.tie_word_embeddings
    if tied:
        expected.pop("language_model.lm_head.weight")

    # 1. names and shapes only: every problem in one error before any data is read
    plan: list[tuple[str, str | None, Path, str, object]] = []  # (target, q/k/v part, file, key, read)
    seen: dict[tuple[str, str | None], str] = {}
    unexpected, mismatched, missing = [], [], []
    for f, key, read, shape, stored in _iter_tensors(files, fmt):
        name = map_key(key)
        if name is None or (tied and name == "language_model.lm_head.weight"):
            continue  # dropped by a rule, or the tied copy of the embeddings
        m = _QKV.match(name)
        target, part = (m.group(1), m.group(2)) if m else (name, None)
        if target not in expected:
            unexpected.append(f"{key} (in {f.name})")
            continue
        twin = seen.get((target, part)) or seen.get((target, None)) or (part is None and _any_part(seen, target))
        if twin:
            unexpected.append(f"{key} (in {f.name}): a second source for {target}, after {twin}")
            continue
        want = expected[target] if part is None else (expected[target][0] // 3,) + expected[target][1:]
        if shape != want:
            mismatched.append(f"{key} (in {f.name}): checkpoint {list(shape)}, model {target} needs {list(want)}")
        elif stored is None:
            mismatched.append(f"{key} (in {f.name}): stored in a dtype llava_core cannot read")
        else:
            plan.append((target, part, f, key, read))
        seen[target, part] = f"{key} (in {f.name})"
    for target in expected:
        parts = {p for t, p in seen if t == target}
        if parts and parts != {"q", "k", "v"} and None not in parts:  # a packed in_proj short of a part
            sibling = _any_part(seen, target).split(" (in ")[0]
            missing += [re.sub(r"\b[qkv]_proj\.", f"{p}_proj.", sibling) + f" (packed into {target})"
                        for p in "qkv" if p not in parts]
        elif not parts:
            missing.append(target)
    if missing or unexpected or mismatched:
        raise CheckpointError(_report(folder, missing, unexpected, mismatched))

    # 2. read each tensor into memory the model will own (packed q/k/v straight into their rows)
    loaded: dict[str, torch.Tensor] = {}
    for target, part, f, key, read in plan:
        if target not in loaded:
            loaded[target] = torch.empty(expected[target], dtype=dtype, device=device)
        dest = loaded[target] if part is None else qkv_rows(loaded[target], part)
        _read(read, dest, f, key)
        if check_finite:
            _check_finite(dest, f, key)

    if tied:  # the module tree still holds lm_head.weight; point it at the embeddings
        loaded["language_model.lm_head.weight"] = loaded["language_model.embed_tokens.weight"]
    model.load_state_dict(loaded, strict=True, assign=True)
    model.language_model.rotary.__init__(cfg.text)  # non-persistent buffer: rebuilt off the meta device
    model.language_model.rotary.to(device)
    if tied:
        model.language_model.lm_head.weight = model.language_model.embed_tokens.weight
    stray = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not stray, f"left on the meta device: {stray}"
    log.info("loaded %s: %d tensors from %d file(s) as %s on %s", folder, len(loaded), len(files), dtype, device)
    return model.eval()


def _any_part(seen: dict, target: str) -> str | None:
    return next((seen[target, p] for p in "qkv" if (target, p) in seen), None)


def _read(read, dest: torch.Tensor, f: Path, key: str) -> None:
    try:
        read(dest)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{f}: cannot read tensor {key!r} ({e})") from None


def _check_finite(t: torch.Tensor, f: Path, key: str) -> None:
    """Refuse a tensor with NaN or inf values, naming it. A sum carries any NaN or inf through and
    runs at memory speed (an isfinite mask is ~40x slower on CPU); only a non-finite sum (a
    damaged tensor, or a finite fp16 sum past 65504) pays for the exact count. On CPU numpy sums
    the dtypes it has, on one thread: torch's parallel sum costs a few ms per call to wake its
    threads on a busy machine, which over hundreds of small tensors outweighed the reading."""
    if not t.is_floating_point():
        return
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float16, torch.float64):
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(t.detach().numpy().sum()):
                return
    elif bool(t.sum().isfinite()):
        return
    bad = ~torch.isfinite(t)
    n = int(bad.sum())
    if n:
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(f"{f}: tensor {key!r} holds {n} non-finite value(s) (NaN or inf), the first at "
                              f"index {list(where)}; the checkpoint is damaged (load_pretrained("
                              "check_finite=False) loads it anyway)")


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
