"""`llava-core ablate`: train and compare projectors on a frozen tower and decoder
(research/ablate.py runs the sweep; this file parses its options)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..research import ablate


def add_ablate_args(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("ablate", help="train and compare projectors on a frozen tower and decoder",
                              description=ablate.__doc__.split("\n")[0])
    p.add_argument("model", help="'default' or a llava-hf checkpoint folder (its tower and decoder are used)")
    p.add_argument("--projectors", required=True, help="comma-separated projector names")
    p.add_argument("--seeds", type=int, default=1, help="seeds per projector: 0..N-1 (default 1)")
    p.add_argument("--out", required=True, help="folder for ablation.csv/.md/.png and the runs")
    p.add_argument("--budget-minutes", type=float, default=90.0, help="the whole sweep (default 90)")
    p.add_argument("--steps", type=int, help="fixed training steps per run (instead of the budget)")
    p.add_argument("--stage2", action="store_true", help="also LoRA-tune the decoder (stage 2) per run")
    p.add_argument("--data", choices=["instruct", "caption"], default="instruct")
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="skip runs already in ablation.csv")
    p.set_defaults(run=run_ablate)
    return p


def run_ablate(args: argparse.Namespace) -> int:
    projectors = [p.strip() for p in args.projectors.split(",") if p.strip()]
    if not projectors:
        raise ValueError("--projectors: give at least one projector name")
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: need at least 1")
    cfg = ablate.AblationConfig(projectors=projectors, seeds=list(range(args.seeds)), budget_minutes=args.budget_minutes,
                         steps=args.steps, stage2=args.stage2, data=args.data, eval_samples=args.eval_samples,
                         batch_size=args.batch_size, threads=args.threads)
    rows = ablate.run_sweep(args.model, args.out, cfg, resume=args.resume)
    print(ablate.markdown_table(rows))
    print(f"wrote {Path(args.out) / 'ablation.csv'}, ablation.md, ablation.png")
    return 0
