"""`llava-core token-order MODEL`: reorder the image tokens and see whether the decoder reads
position from a token's content or its place (research/token_order.py measures it)."""

from __future__ import annotations

import json


def add_token_order(sub) -> None:
    p = sub.add_parser("token-order", help="does the decoder read position from image tokens' content or place?",
                       description="Reorder the image tokens after the projector (rows reversed, columns "
                                   "reversed, transposed) and print, per order, how far the answers to "
                                   "left/right and top/bottom questions follow the reorder.")
    p.add_argument("model", help="a llava-hf folder, a parts folder, or 'default'")
    p.add_argument("--n", type=int, default=30, help="shape scenes (each asked both questions per order)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="also write the table as JSON here")
    p.set_defaults(run=cmd_token_order)


def cmd_token_order(args) -> int:
    from ..atomic import atomic_write_text
    from ..checkpoints.loader import load_pretrained
    from ..default.cache import resolve_model
    from ..model.processor import LlavaProcessor
    from ..research.token_order import format_route, position_route

    folder = resolve_model(args.model)
    model = load_pretrained(folder).eval()
    table = position_route(model, LlavaProcessor.from_pretrained(folder), args.n, args.split)
    print(format_route(table))
    if args.out:
        atomic_write_text(args.out, json.dumps(table, indent=1))
    return 0
