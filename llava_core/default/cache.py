"""Names -> folders: what a model argument (`default`, a parts folder, a checkpoint folder)
resolves to, and the cache of assembled checkpoints behind it.

    resolve_model("default")   the repo's weights/ (or $LLAVA_CORE_WEIGHTS), assembled once
    resolve_model(PARTS)       any parts folder, assembled once
    resolve_model(CKPT)        a llava-hf checkpoint folder, as it is
    export_model(NAME, DST)    a folder transformers' LlavaForConditionalGeneration loads

Assemblies live in $LLAVA_CORE_CACHE (default ~/.cache/llava_core), one folder per parts hash
(`default-<hash>`), finished when its marker file exists; after each new assembly the cache
keeps the $LLAVA_CORE_CACHE_KEEP (default 3) most recently used. What an assembly contains is
parts.py's business (`assemble`, the parts format).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from ..atomic import atomic_folder
from ..checkpoints.export import complete_processor_files
from . import parts as pf
from .parts import ASSEMBLY_FORMAT, MARKER, parts_hash

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("LLAVA_CORE_CACHE") or Path.home() / ".cache" / "llava_core").expanduser()


def default_parts_folder() -> Path:
    """$LLAVA_CORE_WEIGHTS, else the repo's weights/ folder beside the package."""
    import llava_core

    env = os.environ.get("LLAVA_CORE_WEIGHTS")
    return Path(env).expanduser() if env else Path(llava_core.__file__).resolve().parent.parent / "weights"


def _label(parts: Path) -> str:
    if parts.resolve() == default_parts_folder().resolve():
        return "default"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", parts.resolve().name) or "parts"


def is_assembled(folder: Path, digest: str | None = None) -> bool:
    """A finished assembly: the marker exists (it is written last) and names these parts."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker.get("format") == ASSEMBLY_FORMAT and (digest is None or marker.get("parts_hash") == digest)


@contextlib.contextmanager
def _lock(path: Path, wait: bool = True):
    """An exclusive lock file, so two processes do not assemble (or remove) the same folder at
    once. Yields True when held; with wait=False, False at once if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            import fcntl
            fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not on POSIX: no lock
            pass
        except BlockingIOError:
            yield False
            return
        yield True


def assemble_cached(parts: Path) -> Path:
    """The cache folder of `parts`, assembled now unless a finished one is already there.
    A new assembly then removes all but the `cache_keep()` most recently used ones."""
    keep = cache_keep()  # a bad setting fails before a minute of assembly, not after
    digest = parts_hash(parts)
    out = cache_dir() / f"{_label(parts)}-{digest}"
    if is_assembled(out, digest):
        with contextlib.suppress(OSError):  # a read-only cache is used as it is
            (out / MARKER).touch()  # its time of last use, for prune_cache
        return out
    with _lock(out.parent / f".{out.name}.lock"):
        if not is_assembled(out, digest):  # another process may have finished it meanwhile
            if out.exists():
                log.warning("%s: an unfinished assembly (no %s); redoing it", out, MARKER)
            log.info("first use of %s: assembling the checkpoint into %s", parts, out)
            pf.assemble(parts, out)  # (looked up on the module: tests swap it)
    prune_cache(keep)
    return out


def cache_keep() -> int:
    """How many assembled checkpoints the cache keeps: $LLAVA_CORE_CACHE_KEEP, else 3 (each
    default model is ~0.5 GB; every new set of parts, a retrained model say, makes another)."""
    raw = os.environ.get("LLAVA_CORE_CACHE_KEEP", "3")
    try:
        keep = int(raw)
    except ValueError:
        keep = -1
    if keep < 1:
        raise ValueError(f"LLAVA_CORE_CACHE_KEEP={raw!r}: give a whole number of checkpoints, 1 or more")
    return keep


def prune_cache(keep: int) -> list[Path]:
    """Remove all but the `keep` most recently used assemblies in cache_dir() (by their
    marker's time; older formats count too), skipping any whose lock another process holds.
    Returns what it removed."""
    root = cache_dir()
    used = {}
    for d in root.iterdir() if root.is_dir() else []:
        with contextlib.suppress(OSError):  # not ours, or removed meanwhile by another process
            used[d] = (d / MARKER).stat().st_mtime
    done = sorted(used, key=used.get, reverse=True)
    removed = []
    for d in done[keep:]:
        with _lock(root / f".{d.name}.lock", wait=False) as held:
            if held:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
                log.info("cache: removed %s (keeping the %d most recently used)", d, keep)
    return removed


def resolve_model(path_or_name: str | Path) -> Path:
    """'default' -> the assembled default model; a parts folder -> its assembly; a checkpoint
    folder -> itself."""
    if str(path_or_name) == "default":
        parts = default_parts_folder()
        if not (parts / "parts.safetensors").is_file():
            raise FileNotFoundError(f"the default model's parts are not at {parts} (no parts.safetensors); "
                                    "set LLAVA_CORE_WEIGHTS to a parts folder")
        return assemble_cached(parts)
    path = Path(path_or_name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path_or_name}: no such checkpoint folder (give a llava-hf checkpoint "
                                "folder, a parts folder, or 'default')")
    if (path / "parts.safetensors").is_file():
        return assemble_cached(path)
    return path


def export_model(name_or_path: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """Copy a model ('default', a parts folder or a checkpoint) to `dst` as a folder that
    transformers' LlavaForConditionalGeneration and AutoProcessor load."""
    src = resolve_model(name_or_path).resolve()
    dst = Path(dst)
    if dst.resolve() == src or src in dst.resolve().parents:
        raise ValueError(f"export: {dst} is inside the model folder {src}")
    with atomic_folder(dst, overwrite=overwrite) as tmp:
        for f in sorted(src.iterdir()):
            if f.name == MARKER or f.name.startswith("."):
                continue
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        complete_processor_files(tmp)
    log.info("exported %s -> %s", src, dst)
    return dst
