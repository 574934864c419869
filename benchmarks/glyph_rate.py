"""How fast does a fresh vision tower learn to recognise glyphs, from OCR scenes or from
character pages? Trains the default recipe's tower (from scratch, as stage 0 builds it) with a
linear head on the per-patch character targets alone, and prints the share of OCR test
scenes' inked patches whose character it names, every `--every` steps.

    python benchmarks/glyph_rate.py --source pages --steps 300
    python benchmarks/glyph_rate.py --source ocr --steps 300

Batches of 64, AdamW at 1e-3 after a 30-step warm-up, seed 0; the same 128 test scenes for both.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from llava_core.data import DataConfig, make_sample
    from llava_core.data.page import make_page
    from llava_core.model.processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from llava_core.train.batches import images_to_tensor
    from llava_core.train.recipe import default_recipe
    from llava_core.train.stage0_clip import TextTowerConfig, build_clip
    from llava_core.train.stage0_heads import OCR_CHARS, char_targets

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", choices=("pages", "ocr"), required=True, help="what the tower trains on")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50, help="test every this many steps")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    vision = default_recipe().vision
    visual = build_clip(vision, TextTowerConfig(), 192).visual
    visual.output_tokens = True
    head = nn.Sequential(nn.LayerNorm(vision.hidden_size), nn.Linear(vision.hidden_size, len(OCR_CHARS)))
    params = [*visual.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    ocr = DataConfig(image_size=vision.image_size, mix={"ocr": 1.0})

    def batch(samples):
        px = images_to_tensor([s["image"] for s in samples], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        return px, char_targets(samples, vision)  # (B, 3, S, S), (B, P)

    def train_batch(step: int, B: int = 64):
        if args.source == "pages":
            return batch([make_page(step * B + i, 0, vision.image_size) for i in range(B)])
        return batch([make_sample("train", step * B + i, ocr) for i in range(B)])

    test = [batch([make_sample("test", k * 64 + i, ocr) for i in range(64)]) for k in range(2)]
    t0 = time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 30)
        px, t = train_batch(step)
        logits = head(visual(px)[1])  # (B, P, K)
        loss = F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            right = inked = 0
            with torch.no_grad():
                for px, t in test:
                    ink = t > 0
                    right += int((head(visual(px)[1]).argmax(-1)[ink] == t[ink]).sum())
                    inked += int(ink.sum())
            print(f"{args.source} step {step + 1}: OCR test inked patches named {100 * right / inked:.1f}% "
                  f"(of {inked}; train loss {loss.item():.3f}; {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
