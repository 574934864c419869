"""Seconds per stage-2 training step of the default model, fp32 against bf16 autocast.

    python benchmarks/train_step_dtype.py [--steps 6] [--threads 2] [--rounds 2]

Builds the recipe's model (SmolLM2 decoder from the installed package, a fresh tower and
projector), adds stage 2's LoRA adapters, draws `--steps` stage-2 batches (4 images, up to 8
questions each, as the recipe does) and times forward + backward on the same batches with
`AnswerStep(autocast=None)` and `AnswerStep(autocast="bfloat16")`, alternating the two
`--rounds` times, since this VM's speed drifts. Prints the CPU's torch capability, the median
seconds per step of each and their ratio, and the loss of the last batch under each.
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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from llava_core.data import DataConfig
    from llava_core.train.batches import ChatBatches
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

    times: dict[str, list[float]] = {"fp32": [], "bf16 autocast": []}
    last_loss = {}
    steps = {"fp32": AnswerStep(model), "bf16 autocast": AnswerStep(model, autocast="bfloat16")}
    for name, step in steps.items():  # warm-up: first calls allocate and pick kernels
        step(bs[0].input_ids, bs[0].labels, bs[0].pixel_values, bs[0].segments)[0].backward()
    for _ in range(args.rounds):
        for name, step in steps.items():
            for b in bs:
                t = time.perf_counter()
                loss, _ = step(b.input_ids, b.labels, b.pixel_values, b.segments)
                loss.backward()
                times[name].append(time.perf_counter() - t)
                last_loss[name] = float(loss.detach())
            model.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in times:
        print(f"{k:>14}: {med[k]:.2f} s/step (median of {len(times[k])}), last loss {last_loss[k]:.4f}")
    print(f"bf16 autocast / fp32: {med['bf16 autocast'] / med['fp32']:.2f}x the time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
