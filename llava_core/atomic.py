"""Files and folders that are never half-written: write to a temp file (or folder) beside the
target, then rename it into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path`; on success it replaces `path` (mode 0644), on failure it
    is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def atomic_save_file(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def write_json(path: Path, obj) -> None:
    """JSON with a trailing newline, into a folder that is itself being written atomically."""
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _replaceable(folder: Path) -> bool:
    """An existing folder we may replace: empty, or a checkpoint (it has config.json)."""
    return not any(folder.iterdir()) or (folder / "config.json").is_file()


@contextlib.contextmanager
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
