"""`llava-core attention` and `llava-core lens`: the probes of research/probe.py from the command line.

Registered by cli/main.py's build_parser through `add_commands`; same shapes as the other subcommands
(`add_<name>` / `cmd_<name>(args) -> exit code`, heavy imports inside the commands, bad input
raised as OSError / ValueError for cli/main.py to print as one line).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .common import PROG, add_model_args, check_image, load_model


def add_commands(sub) -> None:
    add_attention(sub)
    add_lens(sub)


def _add_probe_args(p, max_new_tokens: int) -> None:
    add_model_args(p)
    p.add_argument("question", help="the question about the image")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"length of the greedy answer probed (default: {max_new_tokens})")


def _check_common(args) -> None:
    if not args.question.strip():
        raise ValueError("the probe needs a question")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")


# --- attention -------------------------------------------------------------------------------------


def add_attention(sub) -> None:
    p = sub.add_parser("attention", help="where the answer looked: attention over the image as a heat map",
                       description="Answer the question greedily, then average the decoder's attention from the "
                                   "positions that chose each answer token to the image's patches, and save it "
                                   "over the image as a PNG. Prints the answer and the PNG's path.")
    _add_probe_args(p, max_new_tokens=32)
    p.add_argument("--out", required=True, help="the PNG to write (the image's size)")
    p.add_argument("--layers", type=int, nargs="+", default=None, metavar="L",
                   help="decoder blocks to average, 0-based, negatives from the end (default: all)")
    p.add_argument("--heads", type=int, nargs="+", default=None, metavar="H",
                   help="attention heads to average (default: all)")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the heat map (default: 0.5)")
    p.set_defaults(run=cmd_attention)


def cmd_attention(args) -> int:
    _check_common(args)
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha {args.alpha}: must be in [0, 1]")
    image = check_image(args.image)
    model, processor = load_model(args)
    from ..research.drawing import save_attention_png
    from ..research.probe import image_attention

    result = image_attention(model, processor, image, args.question, layers=args.layers, heads=args.heads,
                             max_new_tokens=args.max_new_tokens)
    path = save_attention_png(result.map, image, Path(args.out), box=result.box, alpha=args.alpha)
    print(result.answer)
    print(path)
    return 0


# --- lens --------------------------------------------------------------------------------------------


def add_lens(sub) -> None:
    p = sub.add_parser("lens", help="logit lens: what each decoder layer would predict for the answer",
                       description="Answer the question greedily, then read every decoder layer's hidden state "
                                   "through the final norm and lm_head at the positions that chose each answer "
                                   "token; print the top tokens and the chosen token's probability per layer.")
    _add_probe_args(p, max_new_tokens=8)
    p.add_argument("--top-k", type=int, default=5, help="tokens listed per layer (default: 5)")
    p.add_argument("--out", default=None, help="also save the table as a PNG grid here")
    p.set_defaults(run=cmd_lens)


def cmd_lens(args) -> int:
    _check_common(args)
    if args.top_k < 1:
        raise ValueError(f"--top-k {args.top_k}: must be >= 1")
    image = check_image(args.image)
    model, processor = load_model(args)
    from ..research.drawing import format_lens, save_lens_png
    from ..research.probe import answer_prompt, logit_lens

    run = answer_prompt(model, processor, image, args.question, max_new_tokens=args.max_new_tokens)
    lens = logit_lens(model, run.input_ids, run.pixel_values, run.choosing_positions, k=args.top_k)
    print(f"answer: {run.answer}\n")
    print(format_lens(lens, processor.tokenizer))
    if args.out:
        path = save_lens_png(lens, processor.tokenizer, Path(args.out))
        print(f"{PROG}: wrote {path}", file=sys.stderr)
    return 0
