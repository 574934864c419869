"""LLaVA's training recipe for the default model (Liu et al. 2023), on this project's CPUs.

    stage0_clip.py      CLIP stand-in: contrastive + auxiliary pretraining of the vision tower
    stage1_align.py     feature alignment: the projector alone (tower and decoder frozen)
    stage2_instruct.py  visual instruction tuning: projector + LoRA (peft) on the decoder; the
                        recipe's stage 3 (reading) runs it again on a mix of words and documents
    recipe.py           the default recipe as dataclasses; run_recipe (options: cli/train.py)
    common.py           loop, schedule, JSONL metrics, atomic checkpoints, resume, PNG curves
    dist.py             device (cpu/cuda), torchrun process group, DDP, batches drawn ahead
    batches.py          samples -> tensors: images, answer-only labels, length-bucketed batches
    tower_probe.py      linear probes of a vision tower

    from llava_core.train import run_recipe, default_recipe
    run_recipe("runs/r1", default_recipe())        # stages 0-3, parts in runs/r1/parts

    python -m llava_core.train --out runs/r1 [--budget-minutes 135] [--stage all] [--resume]

Under `torchrun --nproc_per_node N -m llava_core.train --out DIR` each stage wraps its
trainable module in DistributedDataParallel (gloo; nccl with --device cuda) and reads its
rank's share of the samples.
"""

__all__ = ["Recipe", "RECIPES", "default_recipe", "run_recipe"]


def __getattr__(name):
    # Lazy, so `python -m llava_core.train.recipe` (or a stage module) does not import itself twice.
    if name in __all__:
        from . import recipe
        return getattr(recipe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
