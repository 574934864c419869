"""Seconds per stage-2 training step of the default model: fp32, bf16 autocast, and each with the
decoder's blocks through torch.compile (`compile` in the stage configs).

    python benchmarks/train_step_dtype.py [--steps 6] [--threads 2] [--rounds 2] [--no-compile]

Builds the recipe's model (SmolLM2 decoder from the installed package, a fresh tower and
projector), adds stage 2's LoRA adapters, draws `--steps` stage-2 batches (4 images, up to 8
questions each, as the recipe does) and times forward + backward on the same batches with
`AnswerStep(autocast=None)` and `AnswerStep(autocast="bfloat16")`, eager and inside
`common.compiled_blocks` (the compile is paid in a warm-up step, as a stage's first step pays
it), alternating the arms `--rounds` times, since this VM's speed drifts. Prints the CPU's
torch capability, the median seconds per step of each, the ratios, and the loss of the last
batch under each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import torch  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="the two eager arms only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from llava_core.data import DataConfig
    from llava_core.train.batches import ChatBatches
    from llava_core.train.common import compiled_blocks
    from llava_core.train.recipe import _build_default, _default_processor, default_recipe
    from llava_core.train.stage1_align import AnswerStep
    from llava_core.train.stage2_instruct import add_lora, lora_config, mix_at

    recipe = default_recipe()
    cfg = recipe.stage2
    model = _build_default(recipe)
    processor = _default_processor(model.cfg)
    add_lora(model.language_model, lora_config(cfg))
    for p in model.projector.parameters():
        p.requires_grad_(True)
    model.eval()
    data = DataConfig(image_size=model.cfg.vision.image_size, seed=0, mix=dict(cfg.mix))
    batches = ChatBatches(processor, data, cfg.batch_size, mix_at=lambda s: mix_at(cfg, s, None),
                          offset=cfg.offset, bucket=cfg.bucket, seed=0, turns=cfg.turns)
    bs = [batches(s) for s in range(args.steps)]
    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}; threads {args.threads}; "
          f"{args.steps} batches of {bs[0].size} images, {sum(b.input_ids.numel() for b in bs)} tokens in all")

    arms = {"fp32": (None, False), "bf16 autocast": ("bfloat16", False)}
    if not args.no_compile:
        arms.update({"fp32 compiled": (None, True), "bf16 compiled": ("bfloat16", True)})
    steps = {name: AnswerStep(model, autocast=dt) for name, (dt, _) in arms.items()}
    times: dict[str, list[float]] = {name: [] for name in arms}
    last_loss = {}

    def run(name, batches_) -> list[tuple[float, float]]:
        """(seconds, loss) of each batch's forward + backward under arm `name`."""
        out = []
        with compiled_blocks(model.language_model, arms[name][1]):
            for b in batches_:
                t = time.perf_counter()
                loss, _ = steps[name](b.input_ids, b.labels, b.pixel_values, b.segments)
                loss.backward()
                out.append((time.perf_counter() - t, float(loss.detach())))
        model.zero_grad(set_to_none=True)
        return out

    for name in arms:  # warm-up: first calls allocate, pick kernels and compile
        t = run(name, bs[:1])[0][0]
        print(f"{name:>14}: first step {t:.1f} s")
    for _ in range(args.rounds):
        for name in arms:
            for t, loss in run(name, bs):
                times[name].append(t)
                last_loss[name] = loss
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in times:
        print(f"{k:>14}: {med[k]:.2f} s/step (median of {len(times[k])}), last loss {last_loss[k]:.4f}")
    print(f"bf16 autocast / fp32: {med['bf16 autocast'] / med['fp32']:.2f}x the time")
    if not args.no_compile:
        print(f"compiled / eager: fp32 {med['fp32 compiled'] / med['fp32']:.2f}x, "
              f"bf16 {med['bf16 compiled'] / med['bf16 autocast']:.2f}x the time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
