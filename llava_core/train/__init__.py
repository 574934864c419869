"""LLaVA's training recipe for the default model (Liu et al. 2023), on this project's CPUs.

    stage0_clip.py      CLIP stand-in: contrastive + auxiliary pretraining of the vision tower
    stage1_align.py     feature alignment: the projector alone (tower and decoder frozen)
    stage2_instruct.py  visual instruction tuning: projector + LoRA (peft) on the decoder
    recipe.py           the default recipe as dataclasses; run_recipe; the `train` CLI helpers
    common.py           loop, schedule, JSONL metrics, atomic checkpoints, resume, PNG curves, DDP
    batches.py          samples -> tensors: images, answer-only labels, length-bucketed batches
    probe.py            linear probes of a vision tower

    from llava_core.train import run_recipe, default_recipe
    run_recipe("runs/r1", default_recipe())        # stages 0-2, parts in runs/r1/parts

Under `torchrun --nproc_per_node N -m llava_core.train.recipe --out DIR` each stage wraps its
trainable module in DistributedDataParallel (gloo) and reads its rank's share of the samples.
"""

from .recipe import RECIPES, Recipe, add_train_args, default_recipe, run_recipe, run_train

__all__ = ["Recipe", "RECIPES", "default_recipe", "run_recipe", "add_train_args", "run_train"]
