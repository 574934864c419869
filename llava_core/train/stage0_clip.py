"""Stage 0, the stand-in for CLIP pretraining: a small open_clip CLIP trained contrastively
on synthetic (image, caption) pairs, whose visual half then becomes the LLaVA vision tower.

The visual module is built exactly as `VisionTower` builds it (quick-GELU, LayerNorm with the
config's eps, pre-norm blocks, same widths and heads), so its weights load 1:1 into
`LlavaModel.vision_tower.visual`; only CLIP's output projection `proj` is dropped, as LLaVA
reads patch tokens before it. Pooling for the contrastive embedding ("avg" over patch tokens
by default, or CLIP's "tok") changes no weight.

Captions name every object with size, colour, shape and cell (the data's detailed caption),
or the text of an OCR scene and its colours, or a document's title, rows and total. The text
tower reads them with a small word-and-character tokenizer: known lower-case words are one
token each, upper-case text and digits are spelt out, so the image features must carry the
characters themselves.

What else stage 0 asks of the feature layer's patch tokens, linear heads and a caption
reader, and the per-patch targets they learn from: `stage0_heads.py`.

    python -m llava_core.train --out runs/r1 --stage 0 --budget-minutes 15   # no decoder needed
    torchrun --nproc_per_node 2 -m llava_core.train --out runs/r1 --stage 0 --budget-minutes 15
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import COLOURS, SHAPES, DataConfig, make_sample
from ..data.page import make_page, page_caption
from ..data.vocab import CELL_PHRASES, SIZES, TEXT_BACKGROUNDS
from ..model.config import VisionConfig
from ..model.processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ..model.vision import VisionTower
from .augment import augment_batch
from .batches import images_to_tensor
from .common import LoopConfig, setup_torch, train_loop, trainable_state
from .dist import Dist, Prefetch, init_distributed, to_device, wrap_ddp
from .stage0_heads import AuxHeads, Reader, cell_targets, char_targets, patch_targets

log = logging.getLogger(__name__)


# --- captions and their tokenizer ---------------------------------------------------------

def caption_of(sample: dict) -> str:
    """A caption naming everything in a sample's image."""
    meta = sample["meta"]
    if meta["kind"] == "shapes":
        from ..data.questions import detailed_caption
        return detailed_caption(meta["objects"])
    if meta["kind"] == "text":
        return f"the text {meta['text']} in {meta['text_colour']} on {meta['background']}"
    if meta["kind"] == "page":
        return page_caption(meta)
    rows = " , ".join(f"{item} {value}" for item, value in meta["rows"])
    return f"a document titled {meta['title']} in {meta['title_colour']} : {rows} , total {meta['total']}"


_WORDS = sorted({"there", "is", "are", "shape", "shapes", "a", "an", "and", "in", "at", "on", "the", "of",
                 "text", "document", "titled", "total", *COLOURS, *SHAPES, *SIZES,
                 *(w for p in CELL_PHRASES for w in p.split()),
                 *(w for b in TEXT_BACKGROUNDS for w in b.split())})
_CHARS = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + \
    [str(d) for d in range(10)] + list(",.:;-!?'()/&+=#%$")
_SPLIT = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")


class CaptionTokenizer:
    """Words of the caption vocabulary as one token; upper-case text, digits and unknown words
    spelt out character by character. Ids: 0 pad, 1 start, then words, chars, unknown; end last."""

    def __init__(self, context_length: int = 64):
        self.context_length = context_length
        self.pad_id, self.sot_id = 0, 1
        self.vocab = {w: i + 2 for i, w in enumerate(_WORDS)}
        for c in _CHARS:
            self.vocab.setdefault(c, len(self.vocab) + 2)
        self.unk_id = len(self.vocab) + 2
        self.eot_id = self.unk_id + 1
        self.vocab_size = self.eot_id + 1

    def tokens(self, text: str) -> list[int]:
        out = [self.sot_id]
        for piece in _SPLIT.findall(text):
            if piece.lower() in self.vocab and not piece.isupper():
                out.append(self.vocab[piece.lower()])
            elif piece.isalpha() and len(piece) > 1:
                out += [self.vocab.get(c, self.unk_id) for c in piece]
            else:
                out.append(self.vocab.get(piece, self.unk_id))
        out = out[:self.context_length - 1] + [self.eot_id]
        return out

    def __call__(self, texts: list[str]) -> torch.Tensor:
        ids = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for b, t in enumerate(texts):
            tok = self.tokens(t)
            ids[b, :len(tok)] = torch.tensor(tok)
        return ids  # (B, L), the end token is the largest id: open_clip's "argmax" pooling finds it


# --- the CLIP model -----------------------------------------------------------------------

@dataclass
class TextTowerConfig:
    width: int = 192
    heads: int = 3
    layers: int = 2  # the captions are short and regular; 4 layers cost 1.45x the step time
    context_length: int = 64


def build_clip(vision: VisionConfig, text: TextTowerConfig, embed_dim: int = 256, pool: str = "avg",
               sincos_init: bool = True):
    """open_clip.CLIP whose `visual` has exactly VisionTower's modules (plus `proj`)."""
    import open_clip

    vocab = CaptionTokenizer(text.context_length).vocab_size
    vision_cfg = dict(layers=vision.num_hidden_layers, width=vision.hidden_size,
                      head_width=vision.hidden_size // vision.num_attention_heads,
                      mlp_ratio=vision.intermediate_size / vision.hidden_size,
                      patch_size=vision.patch_size, image_size=vision.image_size, pool_type=pool,
                      norm_kwargs={"eps": vision.layer_norm_eps})
    text_cfg = dict(context_length=text.context_length, vocab_size=vocab, width=text.width,
                    heads=text.heads, layers=text.layers, pool_type="argmax",
                    norm_kwargs={"eps": vision.layer_norm_eps})
    model = open_clip.CLIP(embed_dim=embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg,
                           quick_gelu=vision.hidden_act == "quick_gelu")
    if sincos_init:  # start the (still learnable) position embedding from 2D sin-cos
        from open_clip.pos_embed import get_2d_sincos_pos_embed
        pe = get_2d_sincos_pos_embed(vision.hidden_size, vision.grid, cls_token=True)  # (1+P, D)
        with torch.no_grad():
            model.visual.positional_embedding.copy_(torch.from_numpy(pe).float())
    assert model.visual.transformer.resblocks[0].mlp.c_fc.out_features == vision.intermediate_size
    return model


def visual_state(clip) -> dict[str, torch.Tensor]:
    """CLIP's visual weights as VisionTower.visual names them: everything but `proj`."""
    return {k: v for k, v in clip.visual.state_dict().items() if k != "proj"}


def load_visual(tower: VisionTower, state: dict[str, torch.Tensor]) -> None:
    """Strict copy into `tower.visual`; one error lists missing, unexpected and mis-shaped keys."""
    own = tower.visual.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: stage 0 {list(state[k].shape)}, tower {list(own[k].shape)}"
              for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"stage-0 visual weights do not fit the vision tower: missing {missing}, "
                         f"unexpected {unexpected}, shape mismatches {shapes}")
    tower.visual.load_state_dict(state, strict=True)


# --- the stage ----------------------------------------------------------------------------

@dataclass
class Stage0Config:
    batch_size: int = 64  # more, smaller steps: the aux heads gain more from steps than from batch
    lr: float = 1e-3
    weight_decay: float = 0.1
    embed_dim: int = 192
    pool: str = "avg"  # contrastive pooling: "avg" of patch tokens or CLIP's "tok" (CLS)
    sincos_init: bool = True  # 2D sin-cos initial values for the learnable position embedding
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    mix: dict = field(default_factory=lambda: {"caption_detailed": 0.6, "ocr": 0.2, "document": 0.2})
    augment: float = 0.0  # share of images augmented (train/augment.py: paper, zoom-out, blur, noise)
    aux_weight: float = 1.0  # weight of the auxiliary heads (cells, patches, characters); 0: contrastive only
    # also ask each patch token for its own row and column. Tried with the shipped run's steps:
    # position became 99.9% readable per token, answers did not improve (benchmarks/default_model.md)
    aux_position: bool = False
    feature_layer: int = -1  # the layer the aux heads and the reader read (the LLaVA feature layer)
    reader: int = 0  # blocks of the caption reader on the patch tokens (0: no reader); its loss weighs 1
    pages: float = 0.0  # share of each batch drawn as character pages (data/page.py) instead of from the mix
    split: str = "train"
    offset: int = 0  # first sample index
    seed: int = 0
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(budget_s=600, warmup=50, ckpt_every=200))


class PairBatches:
    """Batch `step` of (pixel_values, caption ids, aux targets) for this rank; a pure function of step."""

    def __init__(self, vision: VisionConfig, cfg: Stage0Config, rank: int = 0, world: int = 1):
        self.data = DataConfig(image_size=vision.image_size, seed=cfg.seed, mix=dict(cfg.mix))
        self.tok = CaptionTokenizer(cfg.text.context_length)
        self.cfg, self.rank, self.world, self.vision = cfg, rank, world, vision

    def samples(self, step: int) -> list[dict]:
        B = self.cfg.batch_size
        first = self.cfg.offset + (step * self.world + self.rank) * B
        n_pages = round(B * self.cfg.pages)
        return [make_page(first + i, self.cfg.seed, self.vision.image_size) if i < n_pages
                else make_sample(self.cfg.split, first + i, self.data) for i in range(B)]

    def __call__(self, step: int):
        samples = self.samples(step)
        images = [s["image"] for s in samples]
        if self.cfg.augment > 0:
            x = images_to_tensor(images, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # (B, 3, S, S) in [0, 1]
            g = torch.Generator().manual_seed(1_000_003 * self.cfg.seed + step * self.world + self.rank)
            x, samples = augment_batch(x, samples, self.cfg.augment, g)
            mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
            px = (x - mean) / std
        else:
            px = images_to_tensor(images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        text = self.tok([caption_of(s) for s in samples])
        targets = cell_targets(samples)
        targets["char"] = char_targets(samples, self.vision)
        targets.update({f"patch_{k}": v for k, v in patch_targets(samples, self.vision).items()})
        targets["ocr"] = torch.tensor([s["meta"]["kind"] == "text" for s in samples])
        return px, text, targets


def encode_text(clip, text: torch.Tensor) -> torch.Tensor:
    """CLIP.encode_text on the batch cut after its longest caption: with the causal mask and
    end-token pooling the trailing padding changes nothing, and the text tower costs as much
    as the image tower at full context length."""
    L = int((text != 0).sum(1).max())
    text = text[:, :L]  # (B, L)
    x = clip.token_embedding(text) + clip.positional_embedding[:L]  # (B, L, W)
    x = clip.transformer(x, attn_mask=clip.attn_mask[:L, :L])
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)]  # (B, W) at the end token
    return x @ clip.text_projection


class Stage0Model(nn.Module):
    """CLIP plus the auxiliary heads; forward returns the loss and metrics of one batch."""

    def __init__(self, vision: VisionConfig, cfg: Stage0Config, dist: Dist):
        super().__init__()
        from open_clip.loss import ClipLoss

        self.clip = build_clip(vision, cfg.text, cfg.embed_dim, cfg.pool, cfg.sincos_init)
        self.block = vision.num_hidden_layers + cfg.feature_layer if cfg.feature_layer < 0 else cfg.feature_layer - 1
        self.aux = AuxHeads(vision, cfg.aux_position) if cfg.aux_weight > 0 else None
        self.aux_weight = cfg.aux_weight
        self.reader = Reader(vision, CaptionTokenizer(cfg.text.context_length), cfg.text.width, cfg.text.heads,
                             cfg.reader) if cfg.reader > 0 else None
        self.loss = ClipLoss(local_loss=dist.enabled, gather_with_grad=dist.enabled, rank=dist.rank,
                             world_size=dist.world)

    def forward(self, px, text, targets):
        visual = self.clip.visual
        patches = None
        if self.aux is not None or self.reader is not None:
            out = visual.forward_intermediates(px, indices=[self.block], output_fmt="NLC",
                                               intermediates_only=False)
            img, patches = out["image_features"], out["image_intermediates"][0]  # patches: (B, P, D)
        else:
            img = visual(px)
        img = F.normalize(img, dim=-1)
        txt = F.normalize(encode_text(self.clip, text), dim=-1)
        scale = self.clip.logit_scale.exp().clamp(max=100)
        loss = self.loss(img, txt, scale)
        metrics = {"clip_loss": round(float(loss.detach()), 5), "scale": round(float(scale.detach()), 3)}
        with torch.no_grad():
            right = (img @ txt.T).argmax(1) == torch.arange(len(img), device=img.device)
            metrics["i2t_acc"] = round(float(right.float().mean()), 4)
        if self.aux is not None:
            aux, acc = self.aux(patches, targets)
            loss = loss + self.aux_weight * aux
            metrics.update(acc)
        if self.reader is not None:
            read, acc = self.reader(patches, text, targets["ocr"])
            loss = loss + read
            metrics.update(reader_loss=round(float(read.detach()), 5), **acc)
        return loss, metrics


def train_stage0(out_dir: str | Path, vision: VisionConfig, cfg: Stage0Config, resume: bool = False,
                 dist: Dist | None = None, threads: int | None = 2, workers: int = 0):
    """Train the CLIP stand-in on `dist.device`; return it. Writes stage0.{jsonl,png,ckpt} under
    out_dir. `workers` > 0 draws the batches ahead in that many processes (the same batches:
    for a GPU, which would otherwise wait ~0.2 s a step for Pillow)."""
    dist = dist or init_distributed()
    setup_torch(threads, cfg.seed)
    model = Stage0Model(vision, cfg, dist).to(dist.device)
    ddp = wrap_ddp(model, dist)
    batches = Prefetch(PairBatches(vision, cfg, dist.rank, dist.world), workers)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    model.train()

    def step_fn(step, total=None):
        px, text, targets = to_device(batches(step), dist.device)
        loss, metrics = ddp(px, text, targets)
        loss.backward()
        return {"loss": float(loss.detach()), "samples": px.shape[0] * dist.world, **metrics}

    try:
        train_loop("stage0", out_dir, cfg.loop, step_fn, opt, list(model.parameters()),
                   state=lambda: trainable_state(model), load_state=lambda s: model.load_state_dict(s, strict=True),
                   resume=resume, dist=dist, meta={"vision": asdict(vision), "stage0": asdict(cfg)})
    finally:
        batches.close()
    model.eval()
    return model
