"""Stage 1, feature alignment (LLaVA's pretraining stage): only the projector learns.

The vision tower and the decoder are frozen (requires_grad False; the tower runs under
no_grad, the decoder still passes gradients back to its input embeddings); the projector
learns to map patch tokens to embeddings from which the frozen decoder can write the
image's caption. The loss is taken on the answer tokens only, per-answer normalised, with
the lm_head run only at those positions. The data is mostly detailed captions of shape
scenes, plus OCR and document questions so text images are aligned too.

    python -m llava_core.train --out runs/r1 --stage 1 --budget-minutes 10   # after stage 0 in runs/r1
    torchrun --nproc_per_node 2 -m llava_core.train --out runs/r1 --stage 1 --budget-minutes 10
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..data import DataConfig
from .batches import ChatBatches, answer_loss
from .common import LoopConfig, autocast_dtype, compiled_blocks, resolve_compile, set_trainable, setup_torch, train_loop
from .dist import Dist, init_distributed, to_device, wrap_ddp

log = logging.getLogger(__name__)

STAGE1_MIX = {"caption_detailed": 0.6, "caption_short": 0.15, "ocr": 0.15, "document": 0.1}


@dataclass
class Stage1Config:
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    mix: dict = field(default_factory=lambda: dict(STAGE1_MIX))
    bucket: int = 8  # batches per length-sorted window
    max_len: int | None = None  # cut sequences longer than this (None: keep all)
    match_scale: bool = True  # start the projector at the token embeddings' scale
    # "bfloat16": run the step's forward under torch.autocast (weights, gradients and the
    # optimizer stay fp32); "auto": bfloat16 where the CPU has native bf16, else fp32
    # (common.resolve_autocast). The frozen decoder's matmuls are most of a step.
    autocast: str | None = None
    # True / "auto": the decoder's blocks through torch.compile during the stage (common.resolve_compile)
    compile: bool | str = False
    split: str = "train"
    offset: int = 10_000_000  # first sample index: away from stage 0's pairs
    seed: int = 0
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(budget_s=480, warmup=15, ckpt_every=100))


class AnswerStep(nn.Module):
    """One batch -> (loss, metrics): frozen tower under no_grad, projector, decoder, answer loss.

    A module so DistributedDataParallel can wrap it; `train_tower` lets gradients into the tower.
    `autocast` (None, "auto", "bfloat16") runs the forward in that dtype where
    torch.autocast chooses to (matmuls, attention); the backward follows it. On a CPU with
    native bf16 a stage-2 step of the default model took 0.64x the fp32 time
    (benchmarks/train_step_dtype.py)."""

    def __init__(self, model, train_tower: bool = False, autocast: str | None = None):
        super().__init__()
        self.model = model
        self.train_tower = train_tower
        self.autocast = autocast_dtype(autocast, model.device.type)  # "auto" for where the model is

    def forward(self, input_ids, labels, pixel_values, segments=None):
        from .batches import Batch

        m = self.model
        compute = (torch.autocast(pixel_values.device.type, dtype=self.autocast) if self.autocast is not None
                   else contextlib.nullcontext())
        with compute:
            with torch.set_grad_enabled(self.train_tower and torch.is_grad_enabled()):
                feats = m.vision_tower(pixel_values.to(m.dtype))  # (B, P, Dv)
            image_features = m.projector(feats)  # (B, P, C)
            return answer_loss(m, Batch(input_ids, labels, pixel_values, [], segments), image_features)


@torch.no_grad()
def match_embedding_scale(model, pixel_values: torch.Tensor) -> float:
    """Scale the projector's last linear layer so its outputs have the mean norm of the decoder's
    token embeddings. A fresh projector on a fresh tower emits vectors ~4x longer than SmolLM2's
    embeddings, which drown the text tokens around them. Returns the factor applied: 1.0 when
    the projector has no linear layer (identity) or when scaling its last one does not scale
    the output (a conv block after it, as in ldp) - then the weights are left as they were."""
    linears = [m for m in model.projector.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return 1.0
    last = linears[-1]
    emb = model.language_model.embed_tokens.weight
    norms = emb.norm(dim=-1)
    target = norms[norms > 0].mean()  # rows added for new tokens are zero
    feats = model.vision_tower(pixel_values.to(model.dtype))  # (B, P, Dv)
    before = model.projector(feats).norm(dim=-1).mean()  # of (B, M, C)
    factor = float(target / before)
    saved = {k: v.clone() for k, v in last.state_dict().items()}
    last.weight.mul_(factor)
    if last.bias is not None:
        last.bias.mul_(factor)
    after = float(model.projector(feats).norm(dim=-1).mean())
    if abs(after / float(target) - 1) > 0.2:
        last.load_state_dict(saved)
        return 1.0
    return factor


def freeze_for_stage1(model) -> list[nn.Parameter]:
    set_trainable(model, False)
    set_trainable(model.projector, True)
    model.vision_tower.eval()
    model.language_model.eval()
    return list(model.projector.parameters())


def train_stage1(out_dir: str | Path, model, processor, cfg: Stage1Config, resume: bool = False,
                 dist: Dist | None = None, threads: int | None = 2):
    """Train `model.projector` in place, on `dist.device` (the model is moved there); writes
    stage1.{jsonl,png,ckpt} under out_dir."""
    dist = dist or init_distributed()
    setup_torch(threads, cfg.seed)
    model.to(dist.device)
    params = freeze_for_stage1(model)
    data = DataConfig(image_size=model.cfg.vision.image_size, seed=cfg.seed, mix=dict(cfg.mix))
    batches = ChatBatches(processor, data, cfg.batch_size, split=cfg.split, offset=cfg.offset,
                          bucket=cfg.bucket, max_len=cfg.max_len, seed=cfg.seed, rank=dist.rank, world=dist.world)
    step_module = wrap_ddp(AnswerStep(model, autocast=cfg.autocast), dist)  # checks cfg.autocast first
    if cfg.match_scale:  # before the loop: a resumed run then loads its checkpoint over it
        factor = match_embedding_scale(model, batches(0).pixel_values.to(dist.device))
        log.info("stage1: projector output scaled by %.3f to the token embeddings' norm", factor)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    def step_fn(step, total=None):
        b = to_device(batches(step), dist.device)
        loss, metrics = step_module(b.input_ids, b.labels, b.pixel_values, b.segments)
        loss.backward()
        return {"loss": float(loss.detach()), "samples": b.size * dist.world, "seq_len": b.input_ids.shape[1],
                **metrics}

    state = lambda: {k: v.detach().clone() for k, v in model.projector.state_dict().items()}  # noqa: E731
    with compiled_blocks(model.language_model, resolve_compile(cfg.compile, dist.device.type)):
        result = train_loop("stage1", out_dir, cfg.loop, step_fn, opt, params, state=state,
                            load_state=lambda s: model.projector.load_state_dict(s, strict=True),
                            resume=resume, dist=dist, meta={"stage1": asdict(cfg)})
    set_trainable(model.projector, False)
    return result
