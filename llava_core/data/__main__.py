"""python -m llava_core.data --split train --n 16 --out grid.png: a PNG grid of samples."""

from __future__ import annotations

import argparse

from .dataset import MIXES, DataConfig, make_sample
from .grid import save_grid
from .splits import SPLITS


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m llava_core.data", description=__doc__)
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--start", type=int, default=0, help="first sample index")
    p.add_argument("--mix", default="instruct", choices=tuple(MIXES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224, help="image size")
    p.add_argument("--cols", type=int, default=4)
    p.add_argument("--out", default="grid.png")
    args = p.parse_args(argv)
    cfg = DataConfig(image_size=args.size, seed=args.seed, mix=args.mix)
    samples = [make_sample(args.split, i, cfg) for i in range(args.start, args.start + args.n)]
    sheet = save_grid(samples, args.out, cols=args.cols)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height}, {args.n} {args.split} samples)")


if __name__ == "__main__":
    main()
