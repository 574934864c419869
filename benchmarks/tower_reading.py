"""Can a vision tower's tokens be read? Trains a fresh 2-block reader on the frozen tower's
tokens of OCR scenes (llava_core.train.tower_probe.probe_reading) and prints the share of
test-split words it reads exactly, of their characters, and the test loss.

    python benchmarks/tower_reading.py default                      # the shipped model's tower
    python benchmarks/tower_reading.py runs/variants/reader         # a training run's stage-0 tower
    python benchmarks/tower_reading.py runs/a runs/b --seeds 0,1,2  # several towers, several reader seeds

A model (a name or folder `llava-core` loads) is probed at its first feature layer; a run
folder through its train/stage0_visual.safetensors, with the vision config its stage-0
checkpoint recorded. The same seed gives every tower the same reader start and data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_tower(source: str):
    from llava_core.model.config import VisionConfig
    from llava_core.model.vision import VisionTower

    train = Path(source) / "train"
    if (train / "stage0_visual.safetensors").is_file():
        from safetensors.torch import load_file

        from llava_core.train.stage0_clip import load_visual
        meta = torch.load(train / "stage0.ckpt", map_location="cpu", weights_only=False)["meta"]
        tower = VisionTower(VisionConfig(**meta["vision"]), [meta["stage0"]["feature_layer"]], keep_cls=False)
        load_visual(tower, load_file(str(train / "stage0_visual.safetensors")))
        return tower.eval()
    from llava_core.checkpoints.loader import load_pretrained
    from llava_core.default.cache import resolve_model
    return load_pretrained(resolve_model(source)).vision_tower.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("towers", nargs="+", help="model names/folders or training-run folders")
    p.add_argument("--steps", type=int, default=300, help="reader training steps (batch 32)")
    p.add_argument("--seeds", default="0", help="comma-separated reader seeds")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from llava_core.train.tower_probe import probe_reading

    for source in args.towers:
        tower = load_tower(source)
        for seed in (int(s) for s in args.seeds.split(",")):
            t = time.perf_counter()
            res = probe_reading(tower, args.steps, seed=seed, progress=sys.stderr.isatty())
            print(f"{source}  seed {seed}: words read exactly {100 * res['read_ocr_exact']:.1f}%, "
                  f"characters {100 * res['read_ocr_char']:.1f}%, test loss {res['read_loss']:.3f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
