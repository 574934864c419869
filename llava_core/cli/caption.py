"""`llava-core caption`: caption a folder of images into a JSONL file, in batches, resumably.

Registered by cli/main.py's build_parser; the same shapes as the other subcommands (`add_caption` /
`cmd_caption(args) -> exit code`, heavy imports inside the command, bad input raised as
OSError / ValueError for cli/main.py to print as one line). Each record is appended with one
write and fsynced, so a crash leaves at most a torn last line, which the next run cuts off.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .common import PROG, add_model_args, add_sampling_args, load_model, sampling_options

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def add_caption(sub) -> None:
    p = sub.add_parser("caption", help="caption every image in a folder into a JSONL file (resumable)",
                       description="Caption a folder of images in batches. Images already in --out are "
                                   "skipped, so an interrupted run continues where it stopped; each record "
                                   "is written whole; unreadable images are reported and skipped.")
    add_model_args(p, image=None)
    p.add_argument("folder", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output JSONL: one {image, caption} per line")
    p.add_argument("--task", choices=("caption", "detailed_caption", "ocr"), default="caption")
    p.add_argument("--batch-size", type=int, default=4)
    add_sampling_args(p, max_new_tokens=64)
    p.set_defaults(run=cmd_caption)


def cmd_caption(args) -> int:
    from tqdm import tqdm

    from ..model.processor import load_image
    from ..runtime.generate import generate, task_prompt

    root = Path(args.folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder of images")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    sampling = sampling_options(args)
    out = Path(args.out)
    done = read_done(out)
    todo = [p for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES
            and p.relative_to(root).as_posix() not in done]
    if not todo:
        print(f"{PROG}: nothing to do: {len(done)} images already in {out}", file=sys.stderr)
        return 0
    model, processor = load_model(args)
    prompt = task_prompt(args.task)
    skipped = 0
    with tqdm(total=len(todo), desc="captioning", unit="img") as bar:
        for start in range(0, len(todo), args.batch_size):
            batch, images = [], []
            for path in todo[start:start + args.batch_size]:
                try:
                    images.append(load_image(path))
                    batch.append(path)
                except (OSError, ValueError) as e:
                    skipped += 1
                    tqdm.write(f"{PROG}: skipped {path}: {e}", file=sys.stderr)
                    bar.update(1)
            if not batch:
                continue
            captions = generate(model, processor, [prompt] * len(batch), [[im] for im in images], **sampling)
            for path, caption in zip(batch, captions):
                append_record(out, {"image": path.relative_to(root).as_posix(), "caption": caption})
            bar.update(len(batch))
    print(f"{PROG}: wrote {len(todo) - skipped} captions to {out}"
          + (f"; skipped {skipped} unreadable image(s)" if skipped else ""), file=sys.stderr)
    return 0


def read_done(out: Path) -> set[str]:
    """Images already captioned in out. A torn last line (a crash mid-write) is cut off."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data[:data.rfind(b"\n") + 1]
        with open(out, "r+b") as f:
            f.truncate(len(keep))
        data = keep
    done = set()
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                done.add(json.loads(line)["image"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{out}:{n}: not a caption record; use another --out") from None
    return done


def append_record(out: Path, record: dict) -> None:
    """One JSON line written with a single write on an O_APPEND file, then flushed to disk."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
