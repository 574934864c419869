"""`llava-core convert`: an original LLaVA checkpoint (liuhaotian/llava-v1.5-*) -> a llava-hf folder.

Registered by cli.main's build_parser through `add_commands`; the conversion itself is
`checkpoints.convert_original.convert_original`. Bad input is raised as OSError / ValueError for
cli.main to print as one line.
"""

from __future__ import annotations

import sys

from .common import PROG


def add_commands(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert an original LLaVA checkpoint (+ its CLIP tower) into a llava-hf folder",
        description="Convert an original LLaVA checkpoint folder (haotian-liu/LLaVA layout: config.json with "
                    "mm_* fields, model.mm_projector.* weights, no vision tower inside) together with the CLIP "
                    "vision folder it names (e.g. openai/clip-vit-large-patch14-336) into a llava-hf folder that "
                    "llava_core and transformers load. Written to a temporary folder beside DST and renamed "
                    "when complete.")
    p.add_argument("src", help="the original LLaVA checkpoint folder")
    p.add_argument("dst", help="the llava-hf folder to write (must not exist or be empty, unless --force)")
    p.add_argument("--vision-tower", required=True, metavar="CLIP_DIR",
                   help="the CLIP vision folder (config.json, preprocessor_config.json, vision_model.* weights)")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint folder at DST")
    p.add_argument("--trust-pickle", action="store_true",
                   help="read pytorch_model*.bin files (unpickling can run code: only for files you trust)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="stored dtype of the converted weights (default: float16, as llava-hf ships them)")
    p.set_defaults(run=cmd_convert)


def cmd_convert(args) -> int:
    import torch

    from ..checkpoints.convert_original import convert_original

    dst = convert_original(args.src, args.dst, args.vision_tower, dtype=getattr(torch, args.dtype),
                           overwrite=args.force, trust_pickle=args.trust_pickle)
    print(f"{PROG} convert: wrote {dst}", file=sys.stderr)
    return 0
