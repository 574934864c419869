"""`llava-core train` (and `python -m llava_core.train`): run LLaVA's training recipe for the
default model. The recipe itself (stages, budget, resume) is train/recipe.py; this file turns
options into a Recipe and refuses bad ones before anything is built.

    llava-core train --recipe default --out runs/r1 [--budget-minutes N] [--stage all] [--resume]
    llava-core train --recipe default --out runs/r2 --replay weights/training.json
    llava-core train --recipe quick --out runs/q1      # stages 1-3 on the shipped tower, 28 min
    torchrun --nproc_per_node 2 -m llava_core.train --out runs/r1   # DDP (gloo)
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..train import recipe as recipes
from ..train.dist import check_device

log = logging.getLogger(__name__)


def add_train(sub) -> None:
    # Listed for --help only: main() hands `train ...` to this file's own parser (main below).
    sub.add_parser("train", help="run LLaVA's training recipe for the default model (stages 0-3)")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="default", choices=sorted(recipes.RECIPES))
    p.add_argument("--out", required=True, help="folder for logs, checkpoints and the trained parts")
    p.add_argument("--budget-minutes", type=float, help="wall-clock budget of the whole run")
    p.add_argument("--stage", default="all", choices=["0", "1", "2", "3", "all"])
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--threads", type=int, help="torch threads (default 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun each process takes GPU LOCAL_RANK)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes drawing stage 0's batches ahead (0: in the training process; ~8 on a GPU)")
    p.add_argument("--eval-samples", type=int, help="validation questions answered after the last stage")
    p.add_argument("--seed", type=int, help="seed of the whole run: initial values and data of every stage")
    p.add_argument("--tower", metavar="PARTS", help="take the vision tower of a parts folder ('default': "
                   "weights/) instead of training one in stage 0 (the quick recipe does)")
    p.add_argument("--replay", metavar="JSON", help="run the steps a finished run recorded (weights/training.json "
                   "or train/summary.json) instead of a time budget: reproduces that run's model")


def run_train(args: argparse.Namespace) -> int:
    recipe = recipes.RECIPES[args.recipe]()
    if args.budget_minutes is not None:
        recipe.budget_minutes = args.budget_minutes
    for key in ("threads", "eval_samples"):
        if getattr(args, key, None) is not None:
            setattr(recipe, key, getattr(args, key))
    if args.tower:
        recipe.stage0, recipe.tower = None, args.tower
    if args.seed is not None:
        recipe.set_seed(args.seed)
    if args.replay:
        recipe.replay(json.loads(Path(args.replay).read_text()))
    stages = recipes.STAGES if args.stage == "all" else (int(args.stage),)
    summary = recipes.run_recipe(args.out, recipe, stages=stages, resume=args.resume, device=args.device,
                                 workers=args.workers)
    log.info("training finished in %.0f s; summary in %s", summary["elapsed_s"],
             Path(args.out) / "train" / "summary.json")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llava-core train", description=recipes.__doc__.split("\n")[0])
    add_args(p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = p.parse_args(argv)
    try:  # a bad argument is one line now, not a traceback after the model is built
        check_device(args.device)
    except ValueError as e:
        p.error(f"--device: {e}")
    if args.tower and args.tower != "default" and not (Path(args.tower) / "parts.safetensors").is_file():
        p.error(f"--tower {args.tower}: no parts.safetensors there (expected a parts folder such as weights/, "
                "or 'default')")
    if args.workers < 0:
        p.error(f"--workers {args.workers}: expected 0 (draw in the training process) or more")
    return run_train(args)
