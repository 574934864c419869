"""The recipe's stage 3 (reading) from a finished stage 2, with its settings varied: the run's
projector and LoRA adapters train on, with a fresh schedule, on a mix where most images are
words and documents; then the synthetic suite.

The seventh weights' tower can be read (a fresh reader on its frozen tokens reads 23% of test
words, `benchmarks/tower_reading.py`) while the model reads none of 37 OCR questions. In stage
2 a sixth of the images are words, about 700 in the whole stage: this tests whether more words
are what the decoder needs to learn to spell from the tower.

    python benchmarks/reading_phase.py runs/long/long_pages_from-long_pages --out runs/read/ocr12 \
        --steps 800 --tower-blocks 0 --threads 1
    python benchmarks/reading_phase.py RUN --out runs/read/ocr12_tower1 --steps 800 --threads 1  # the recipe's

RUN must hold train/stage0_visual.safetensors and a finished train/stage2.ckpt (from a run made
before stage 2 wrote train/stage2_tuned.safetensors; from a newer one, `llava-core train --stage
3` does the same), or be a parts folder such as weights/: the phase then continues from those
weights, their LoRA adapters unmerged (`python benchmarks/reading_phase.py weights --out
runs/read2/cont800 --seed 2`). Options left out keep the recipe's stage-3 settings; `--ocr 2
--document 2` gives stage 2's mix, and `--mix position=6,relation=4` sets other weights; `--side-mix
position=1,relation=1 --side-every 2` makes every other window of 8 steps place questions alone. The script writes
RUN's stage-2 output into OUT/train as the recipe does and runs the recipe's stage 3 there
(`run_recipe(OUT, recipe, stages=(3,))`): OUT/train/stage3.{jsonl,ckpt}, OUT/parts (with
training.json), then OUT/eval.json and OUT/predictions.jsonl (`llava-core
eval OUT/parts --suite synthetic -n N --dtype float32`). `--resume` continues an interrupted
phase. (The two arms of 2026-12-06 ran this before stage 3 entered the recipe, with the same
settings, their files named stage2.*.)
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def phase_config(recipe, args):
    """The recipe's stage-3 config with the options given, `args.steps` steps, no time budget."""
    cfg = copy.deepcopy(recipe.stage3)
    for key, value in (("ocr", args.ocr), ("document", args.document), *parse_mix(args.mix, cfg.mix).items()):
        if value is not None:
            cfg.mix[key] = value
    side = parse_mix(args.side_mix, cfg.mix, "--side-mix")
    if bool(side) != bool(args.side_every) or (args.side_every or 0) < 0:
        raise SystemExit("--side-mix and --side-every >= 1 go together (e.g. --side-mix position=1,relation=1 "
                         "--side-every 2)")
    cfg.side_mix, cfg.side_every = side, args.side_every or 0
    if args.tower_blocks is not None:
        cfg.train_tower_blocks = args.tower_blocks
    if args.seed is not None:  # the phase's data; the adapters it starts from are the run's
        cfg.seed = args.seed
    cfg.loop = replace(cfg.loop, steps=args.steps, stop_at=None, budget_s=None)
    return cfg


def parse_mix(text: str | None, known: dict | None = None, flag: str = "--mix") -> dict[str, float]:
    """--mix "position=6,relation=4" -> {"position": 6.0, "relation": 4.0}; with `known` (a mix),
    a type it lacks is refused by name rather than silently added."""
    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")  # no "=": value is "", which float() refuses
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"{flag} {text!r}: expected KEY=WEIGHT pairs, got {item!r}") from None
        if known is not None and key.strip() not in known:
            raise SystemExit(f"{flag}: {key.strip()!r} is not a question type of the mix ({', '.join(sorted(known))})")
    return out


def tuned_from_parts(recipe, parts: Path, dest: Path) -> None:
    """Stage 2's three files in dest, taken from a parts folder (e.g. weights/): its tower,
    projector and LoRA adapters, unmerged, so that stage 3 continues from shipped weights."""
    import torch

    from llava_core.default.parts import _put_vision
    from llava_core.train.recipe import _build_default, _save_tensors, _tuned_state
    from llava_core.train.stage2_instruct import add_lora_from_parts

    model = _build_default(recipe)
    _put_vision(model, parts / "parts.safetensors", torch.float32)
    add_lora_from_parts(model.language_model, parts, recipe.stage2)
    dest.mkdir(parents=True, exist_ok=True)
    _save_tensors(model.vision_tower.visual.state_dict(), dest / "stage0_visual.safetensors")
    _save_tensors(model.projector.state_dict(), dest / "stage1_projector.safetensors")
    _save_tensors(_tuned_state(model), dest / "stage2_tuned.safetensors")


def tuned_from_run(recipe, train: Path, dest: Path) -> None:
    """Stage 2's three files in dest as run_recipe writes them, from an older run's finished
    train/stage2.ckpt and its stage-0 tower and stage-1 projector files."""
    import torch
    from safetensors.torch import load_file

    from llava_core.train.recipe import _build_default, _save_tensors, _tuned_state
    from llava_core.train.stage0_clip import load_visual
    from llava_core.train.stage2_instruct import add_lora, lora_config

    ck = torch.load(train / "stage2.ckpt", map_location="cpu", weights_only=False)
    if not ck.get("done") and ck["step"] < (ck["total"] or 0):
        raise SystemExit(f"{train / 'stage2.ckpt'}: stage 2 stopped at step {ck['step']} of {ck['total']}")
    model = _build_default(recipe)
    load_visual(model.vision_tower, load_file(str(train / "stage0_visual.safetensors")))
    add_lora(model.language_model, lora_config(recipe.stage2))
    out = model.load_state_dict(ck["state"], strict=False)
    if out.unexpected_keys or any(k not in dict(model.named_parameters()) for k in ck["state"]):
        raise SystemExit(f"{train / 'stage2.ckpt'}: state does not fit the model ({out.unexpected_keys[:3]})")
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("stage0_visual.safetensors", "stage1_projector.safetensors"):  # read before stage 3 loads `tuned`
        shutil.copyfile(train / f, dest / f)
    _save_tensors(_tuned_state(model), dest / "stage2_tuned.safetensors")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished run (train/stage0_visual.safetensors, train/stage2.ckpt) "
                   "or a parts folder (weights/)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--ocr", type=float, help="weight of word images in the mix (stage 2: 2)")
    p.add_argument("--document", type=float, help="weight of documents (stage 2: 2)")
    p.add_argument("--mix", help="other weights of the mix, e.g. position=6,relation=4")
    p.add_argument("--side-mix", help="a mix drawn alone in every --side-every-th window of 8 steps, "
                   "e.g. position=1,relation=1")
    p.add_argument("--side-every", type=int, help="e.g. 2: every other window of 8 steps is --side-mix's")
    p.add_argument("--tower-blocks", type=int, help="train the tower's last k blocks too")
    p.add_argument("--seed", type=int, help="the phase's data seed (default: the recipe's, 0)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-n", type=int, default=200, help="questions per split in the evaluation")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    from llava_core.train.recipe import default_recipe, run_recipe

    recipe = default_recipe()
    recipe.stage3 = phase_config(recipe, args)
    recipe.budget_minutes, recipe.threads, recipe.eval_samples = None, args.threads, 0
    dest = args.out / "train"
    if not (dest / "stage2_tuned.safetensors").is_file():  # written once; --resume reuses it
        if (args.run / "parts.safetensors").is_file():
            tuned_from_parts(recipe, args.run, dest)
        else:
            tuned_from_run(recipe, args.run / "train", dest)
    summary = run_recipe(args.out, recipe, stages=(3,), resume=args.resume)
    print(f"{args.out}: stage 3 in {summary['stages']['3']['seconds']:.0f} s", flush=True)
    subprocess.run([sys.executable, "-m", "llava_core.cli.main", "eval", str(args.out / "parts"),
                    "--suite", "synthetic", "-n", str(args.n), "--dtype", "float32",
                    "--out", str(args.out / "eval.json"), "--predictions", str(args.out / "predictions.jsonl")],
                   check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
