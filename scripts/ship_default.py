"""Ship a trained run as the default model: copy its parts into weights/ and record the guard.

    python scripts/ship_default.py runs/r2            # runs/r2/parts -> weights/, then the guard
    python scripts/ship_default.py runs/r2 --dry-run  # only print what would change

The guard (read by tests/test_shipped_model.py) is measured here on the copied weights through
the same path a user takes (`resolve_model("default")`): test questions 0-59 at seed 0, their
answers and accuracy, a floor 5 points below that accuracy and the share of answers that must
come out the same again (0.9). It goes into weights/training.json next to the run's summary.
Every file is written to a temporary name and renamed into place (llava_core.atomic);
weights/README.md and weights/examples/ are not touched (the model card is written by hand
from the run's numbers).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from llava_core.atomic import atomic_path, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
GUARD_N, FLOOR_MARGIN, MIN_AGREEMENT = 60, 0.05, 0.9


def copy_parts(parts: Path, weights: Path, dry_run: bool) -> list[str]:
    if not (parts / "parts.safetensors").is_file() or not (parts / "training.json").is_file():
        raise SystemExit(f"{parts}: not a finished run's parts folder (parts.safetensors, training.json)")
    names = []
    for src in sorted(p for p in parts.rglob("*") if p.is_file()):
        rel = src.relative_to(parts)
        names.append(rel.as_posix())
        if dry_run:
            continue
        dst = weights / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    return names


def measure_guard(weights: Path) -> dict:
    import os

    import torch

    from llava_core.checkpoints.loader import load_pretrained
    from llava_core.default.cache import resolve_model
    from llava_core.eval import evaluate_synthetic
    from llava_core.model.processor import LlavaProcessor

    os.environ["LLAVA_CORE_WEIGHTS"] = str(weights)  # "default" names this parts folder
    folder = resolve_model("default")
    model = load_pretrained(folder, dtype=torch.float32)
    processor = LlavaProcessor.from_pretrained(folder)
    rows: list[dict] = []
    res = evaluate_synthetic(model, processor, splits=("test",), n_per_split=GUARD_N, seed=0, predictions=rows)
    acc = round(res["test"]["overall"]["acc"], 4)
    return {"n": GUARD_N, "split": "test", "seed": 0, "acc": acc, "floor": round(acc - FLOOR_MARGIN, 4),
            "min_agreement": MIN_AGREEMENT, "predictions": [r["prediction"] for r in rows]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="a finished `llava-core train` output folder (holds parts/)")
    p.add_argument("--weights", type=Path, default=ROOT / "weights")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    names = copy_parts(args.run / "parts", args.weights, args.dry_run)
    print(("would copy" if args.dry_run else "copied") + f" {len(names)} files into {args.weights}: {names}")
    if args.dry_run:
        return 0
    guard = measure_guard(args.weights)
    path = args.weights / "training.json"
    summary = json.loads(path.read_text())
    summary["guard"] = guard
    atomic_write_text(path, json.dumps(summary, indent=2))
    print(f"guard: {guard['acc']:.1%} on test questions 0-{GUARD_N - 1}, floor {guard['floor']:.1%}; "
          f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
