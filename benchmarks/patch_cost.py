"""What smaller patches would cost the default recipe: seconds per optimizer step of each
stage with the shipped tower at 32-px patches (49 image tokens) and at 16-px patches (196),
and the shipped step counts' time at each.

    python benchmarks/patch_cost.py                 # 32 and 16 px, 8 timed steps a stage
    python benchmarks/patch_cost.py --patches 32 16 14 --steps 12

Why: the shipped model reads no text (OCR 0%) because a 32-px patch holds a whole glyph or
parts of two (weights/README.md); 16-px patches give a glyph about four. This prints what that
does to the recipe's hour on the machine it runs on. Each patch size trains a few steps of
stages 0, 1 and 2 from scratch (the recipe's own code, batches and settings; only
VisionConfig.patch_size changes) in a temporary folder; a step's time is the median of the
per-step times in the stage's JSONL after the first two steps. Run it with nothing else on
the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SKIP = 2  # first steps left out of the median (allocator, thread-pool warm-up)


def step_seconds(jsonl: Path) -> float:
    from llava_core.train.common import read_jsonl

    t = [r["elapsed_s"] for r in read_jsonl(jsonl)]  # at the end of steps 1, 2, ...
    dt = [b - a for a, b in zip(t, t[1:])][SKIP - 1:]
    if not dt:
        raise SystemExit(f"{jsonl}: too few steps to time; raise --steps")
    return statistics.median(dt)


def time_patch(patch: int, steps: int, folder: Path) -> dict[int, float]:
    from llava_core.train.common import LoopConfig
    from llava_core.train.recipe import default_recipe, run_recipe

    r = default_recipe()
    if r.vision.image_size % patch:
        raise SystemExit(f"--patches {patch}: does not divide the {r.vision.image_size}-px image")
    r.vision = replace(r.vision, patch_size=patch)
    r.budget_minutes, r.probe, r.eval_samples = None, False, 0
    for cfg in r.stage_configs().values():
        cfg.loop = LoopConfig(steps=steps, warmup=1, ckpt_every=10 ** 6, log_every=10 ** 6)
    run_recipe(folder, r)
    return {k: step_seconds(folder / "train" / f"stage{k}.jsonl") for k in (0, 1, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--patches", type=int, nargs="+", default=[32, 16], help="patch sizes in px (first: baseline)")
    p.add_argument("--steps", type=int, default=8, help="steps per stage (the first two are not timed)")
    args = p.parse_args()
    if args.steps < SKIP + 2:
        raise SystemExit(f"--steps {args.steps}: needs at least {SKIP + 2}")
    from llava_core.train.recipe import default_recipe

    shipped = default_recipe().replay(json.loads((ROOT / "weights" / "training.json").read_text()))
    counts = {k: cfg.loop.stop_at for k, cfg in shipped.stage_configs().items()}
    image = shipped.vision.image_size
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for patch in args.patches:
            times[patch] = time_patch(patch, args.steps, Path(tmp) / f"p{patch}")
    base = args.patches[0]
    print(f"\nseconds per step (median of {args.steps - SKIP}); shipped step counts {counts}")
    print(f"{'patch':>6} {'tokens':>7} " + " ".join(f"{'stage ' + str(k):>9} {'x':>5}" for k in (0, 1, 2))
          + f" {'shipped steps, min':>19}")
    for patch, t in times.items():
        cols = " ".join(f"{t[k]:9.3f} {t[k] / times[base][k]:5.2f}" for k in (0, 1, 2))
        total = sum(counts[k] * t[k] for k in (0, 1, 2)) / 60
        print(f"{patch:>6} {(image // patch) ** 2:>7} {cols} {total:19.1f}")


if __name__ == "__main__":
    main()
