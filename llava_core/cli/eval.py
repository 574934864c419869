"""`llava-core eval` (accuracy per question type, or on your JSONL) and `llava-core export`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .common import PROG, check_device

log = logging.getLogger(__name__)


def add_eval_args(parser) -> None:
    """Arguments of `llava-core eval MODEL --suite synthetic | --jsonl FILE [--out results.json]`."""
    parser.add_argument("model", help="'default', a llava-hf checkpoint folder or a parts folder")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--suite", choices=["synthetic", "natural"],
                      help="the synthetic test/heldout/shifted splits; 'natural': the same splits asked the "
                           "questions the synthetic suite leaves out (what shapes are there, is there a star, "
                           "the colour of an absent shape)")
    what.add_argument("--jsonl", type=Path, help="lines of {image, question, answers}: VQA soft accuracy")
    parser.add_argument("--splits", default="test,heldout,shifted", help="synthetic splits, comma-separated")
    parser.add_argument("-n", "--n-per-split", type=int, default=200, help="synthetic questions per split")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--predictions", type=Path, help="write every question and prediction as JSONL here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy per question type (synthetic suite) or on your JSONL",
                       description="Score a model on the synthetic test/heldout/shifted splits (exact match "
                                   "per question type) or on a JSONL of {image, question, answers} "
                                   "(VQA-style soft accuracy).")
    add_eval_args(p)
    p.set_defaults(run=cmd_eval)


def cmd_eval(args) -> int:
    check_device(args.device)
    run_eval(args)
    return 0


def run_eval(args) -> dict:
    """The `eval` command: load, score, print the table, write --out / --predictions."""
    import torch

    from ..checkpoints.loader import load_pretrained
    from ..default.cache import resolve_model
    from ..eval import evaluate_jsonl, evaluate_synthetic, format_table, save_json, save_jsonl
    from ..model.processor import LlavaProcessor

    folder = resolve_model(args.model)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_pretrained(folder, dtype=dtype, device=args.device)
    processor = LlavaProcessor.from_pretrained(folder)
    rows: list[dict] = []
    if args.jsonl is not None:
        results = evaluate_jsonl(model, processor, args.jsonl, args.batch_size, args.max_new_tokens, rows)
    else:
        from ..data import NATURAL_MIX, DataConfig

        splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
        data = DataConfig(image_size=model.cfg.vision.image_size, mix=dict(NATURAL_MIX)) \
            if args.suite == "natural" else None
        results = evaluate_synthetic(model, processor, splits, args.n_per_split, args.batch_size, args.seed,
                                     args.max_new_tokens, data_config=data, predictions=rows)
    print(format_table(results))
    if args.out is not None:
        save_json(results, args.out)
        log.info("wrote %s", args.out)
    if args.predictions is not None:
        save_jsonl(rows, args.predictions)
    return results


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a model as a llava-hf folder transformers can load",
                       description="Write MODEL ('default' or a folder) to DST as a llava-hf checkpoint "
                                   "that transformers' LlavaForConditionalGeneration and LlavaProcessor load.")
    p.add_argument("model", help="'default', a parts folder or a llava-hf checkpoint folder")
    p.add_argument("dst", help="destination folder (must not exist, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint folder at DST")
    p.set_defaults(run=cmd_export)


def cmd_export(args) -> int:
    from ..default.cache import export_model
    dst = export_model(args.model, args.dst, overwrite=args.overwrite)
    print(f"{PROG}: wrote {dst}", file=sys.stderr)
    return 0
