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

Auxiliary heads (`aux_weight > 0`, cheap: linear layers on tokens already computed): on the
feature layer's patch tokens, the mean over each 3x3 grid cell predicts that cell's colour,
shape and size (or empty), each patch the colour and shape of the object over it, and each
patch the character drawn over it (or none). Contrastive learning alone, in the hundred-odd
steps measured here, left cell colour *less* linearly readable than a random tower (0.81 vs
0.93) and shape, count and characters at chance; these heads ask the very tokens the projector
will see to make those facts linearly readable. Shape is still the slowest to come.

The reader (`reader > 0` blocks): a small causal transformer reads each image's caption, token
by token, after the feature layer's patch tokens in row-major order, as the decoder will read
them (captioning pretraining, CapPa's and LocCa's objective). Linear heads ask a token what lies
on it; the reader asks the tokens, in sequence, for the text in order and for where each
object is, which is what OCR and left/right answers need.

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
from ..data.vocab import CELL_PHRASES, SIZES, TEXT_BACKGROUNDS
from ..model.config import VisionConfig
from ..model.processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ..model.vision import VisionTower
from .augment import augment_batch
from .batches import images_to_tensor
from .common import LoopConfig, setup_torch, train_loop, trainable_state
from .dist import Dist, Prefetch, init_distributed, to_device, wrap_ddp

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


# --- auxiliary heads ----------------------------------------------------------------------

CELL_TARGETS = {"colour": ["empty", *COLOURS], "shape": ["empty", *SHAPES], "size": ["empty", *SIZES]}
OCR_CHARS = ["none"] + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [str(d) for d in range(10)]


def cell_pool_matrix(vision: VisionConfig) -> torch.Tensor:
    """(9, P): row c averages the patch tokens whose centres fall in grid cell c (row-major)."""
    g, p, s = vision.grid, vision.patch_size, vision.image_size
    centres = torch.arange(g) * p + p / 2  # (g,)
    band = (centres * 3 / s).long().clamp(max=2)  # (g,) which third each patch centre lies in
    cell = band[:, None] * 3 + band[None, :]  # (g, g)
    m = F.one_hot(cell.reshape(-1), 9).T.float()  # (9, P)
    return m / m.sum(1, keepdim=True)


def cell_targets(samples: list[dict]) -> dict[str, torch.Tensor]:
    """(B, 9) class ids per cell for shape scenes (colour and size: 0 for an empty cell; shape:
    -100 there, so its head spends itself on telling shapes apart); -100 for other images."""
    out = {k: torch.full((len(samples), 9), -100, dtype=torch.long) for k in CELL_TARGETS}
    for b, s in enumerate(samples):
        if s["meta"]["kind"] != "shapes" or s["meta"].get("zoomed"):  # zoomed: objects left their cells
            continue
        for k in CELL_TARGETS:
            out[k][b] = 0
        out["shape"][b] = -100  # shape is learnt on objects only; colour and size say "empty"
        for o in s["meta"]["objects"]:
            for k, names in CELL_TARGETS.items():
                out[k][b, o["cell"]] = names.index(o[k])
    return out


def patch_targets(samples: list[dict], vision: VisionConfig) -> dict[str, torch.Tensor]:
    """(B, P) per-patch colour and shape class of the object over the patch, 0 for background,
    -100 for text images. A patch belongs to an object when its centre lies within 0.8 of the
    object's circumradius, and the patch nearest each object's centre always does, so small
    objects between patch centres are not lost."""
    g, p = vision.grid, vision.patch_size
    centres = torch.arange(g, dtype=torch.float32) * p + p / 2
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")  # (g, g)
    out = {k: torch.full((len(samples), g * g), -100, dtype=torch.long) for k in ("colour", "shape")}
    for b, smp in enumerate(samples):
        if smp["meta"]["kind"] != "shapes":
            continue
        out["colour"][b] = 0  # background; shape stays -100 there: it is learnt on objects only
        for o in smp["meta"]["objects"]:
            d = ((cx - o["cx"]) ** 2 + (cy - o["cy"]) ** 2).sqrt().flatten()  # (P,)
            inside = d <= 0.8 * o["r"]
            inside[d.argmin()] = True
            for k in ("colour", "shape"):
                out[k][b, inside] = CELL_TARGETS[k].index(o[k])
    return out


def text_runs(meta: dict, size: int) -> list[tuple[str, float, float, object]]:
    """(string, x, y, font) of every line drawn in an OCR or document image, as the renderers
    in llava_core.data place them (same fonts, same arithmetic)."""
    from ..data.fonts import load_font

    if meta["kind"] == "text":
        font, _ = load_font(meta["font_size"], "sans", None)
        return [(meta["text"], *meta["origin"], font)]
    s, m, pitch = size, meta["margin"], meta["pitch"]
    tfont, _ = load_font(meta["title_size"], "sans", None)
    rfont, _ = load_font(meta["row_size"], "sans", None)
    y = meta["top"] + round(0.03 * s)
    runs = [(meta["title"], (s - tfont.getlength(meta["title"])) / 2, y, tfont)]
    y += round(1.25 * meta["title_size"])
    pad = round(0.06 * s)
    lines = [(item, str(v)) for item, v in meta["rows"]] + [("TOTAL", str(meta["total"]))]
    for i, (item, value) in enumerate(lines):
        yy = y + pitch * i + round(0.025 * s)
        runs.append((item, m + pad, yy, rfont))
        runs.append((value, s - m - pad - rfont.getlength(value), yy, rfont))
    return runs


def char_targets(samples: list[dict], vision: VisionConfig) -> torch.Tensor:
    """(B, P) per-patch character class: the character with the largest overlap with the patch
    (at least a third of the smaller of the two boxes, both ways), 0 for none; -100 for shape
    scenes. Lets the tokens in reading order carry the characters in reading order."""
    g, p = vision.grid, vision.patch_size
    out = torch.full((len(samples), g * g), -100, dtype=torch.long)
    for b, smp in enumerate(samples):
        meta = smp["meta"]
        if meta["kind"] == "shapes":
            continue
        best = torch.zeros(g * g)
        out[b] = 0
        for text, x, y, font in text_runs(meta, vision.image_size):
            _, top, _, bottom = font.getbbox(text)
            y0, y1 = y + top, y + bottom
            for i, ch in enumerate(text):
                if ch not in OCR_CHARS:
                    continue
                x0, x1 = x + font.getlength(text[:i]), x + font.getlength(text[:i + 1])
                for r in range(max(0, int(y0 // p)), min(g, int(y1 // p) + 1)):
                    dy = min(y1, (r + 1) * p) - max(y0, r * p)
                    if dy < min(p, y1 - y0) / 3:
                        continue
                    for c in range(max(0, int(x0 // p)), min(g, int(x1 // p) + 1)):
                        dx = min(x1, (c + 1) * p) - max(x0, c * p)
                        if dx >= min(p, x1 - x0) / 3 and dx * dy > best[r * g + c]:
                            best[r * g + c] = dx * dy
                            out[b, r * g + c] = OCR_CHARS.index(ch)
    return out


class AuxHeads(nn.Module):
    """Linear heads on the feature layer's patch tokens: each grid cell's mean -> colour, shape,
    size (or empty); each patch -> the colour and shape of the object over it (or background),
    or the character over it (or none); with `position`, each patch -> its own grid row and
    column, so a token read by the decoder's attention carries where it lies."""

    def __init__(self, vision: VisionConfig, position: bool = False):
        super().__init__()
        g = vision.grid
        self.register_buffer("pool", cell_pool_matrix(vision), persistent=False)
        self.norm = nn.LayerNorm(vision.hidden_size)
        self.heads = nn.ModuleDict({k: nn.Linear(vision.hidden_size, len(v)) for k, v in CELL_TARGETS.items()})
        self.chars = nn.Linear(vision.hidden_size, len(OCR_CHARS))
        self.patch = nn.ModuleDict({k: nn.Linear(vision.hidden_size, len(CELL_TARGETS[k])) for k in ("colour", "shape")})
        self.grid = g
        self.where = nn.ModuleDict({k: nn.Linear(vision.hidden_size, g) for k in ("row", "col")}) if position else None

    def forward(self, tokens: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        # tokens: (B, P, D) patch tokens of the feature layer
        x = self.norm(tokens)
        cells = torch.einsum("cp,bpd->bcd", self.pool, x)  # (B, 9, D)
        loss, acc = 0.0, {}
        heads = [(k, head(cells), targets[k]) for k, head in self.heads.items()]
        heads.append(("char", self.chars(x), targets["char"]))  # (B, P, K)
        heads += [(f"patch_{k}", head(x), targets[f"patch_{k}"]) for k, head in self.patch.items()]
        if self.where is not None:
            p = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)  # (B, P) row-major patch index
            where = {"row": p // self.grid, "col": p % self.grid}
            heads += [(k, head(x), where[k]) for k, head in self.where.items()]
        for k, logits, t in heads:
            ok = t != -100
            if ok.any():
                loss = loss + F.cross_entropy(logits[ok], t[ok])
                with torch.no_grad():
                    acc[f"aux_{k}_acc"] = round(float((logits[ok].argmax(-1) == t[ok]).float().mean()), 4)
                    if k == "char":
                        ink = t > 0
                        acc[f"aux_{k}_fg_acc"] = round(float((logits[ink].argmax(-1) == t[ink]).float().mean()), 4)
        return loss, acc


class Reader(nn.Module):
    """A causal transformer over [patch tokens ; caption tokens] that predicts each next caption
    token: patch tokens (B, P, D) -> LayerNorm -> linear to the reader's width, caption ids
    embedded, learned positions over the whole sequence, `layers` open_clip blocks."""

    def __init__(self, vision: VisionConfig, text: TextTowerConfig, layers: int):
        super().__init__()
        from open_clip.transformer import Transformer

        tok = CaptionTokenizer(text.context_length)
        w, n = text.width, vision.grid ** 2 + text.context_length
        self.norm_in = nn.LayerNorm(vision.hidden_size)
        self.inp = nn.Linear(vision.hidden_size, w)
        self.embed = nn.Embedding(tok.vocab_size, w)
        self.pos = nn.Parameter(torch.randn(n, w) * 0.01)
        self.blocks = Transformer(w, layers, text.heads)
        self.norm_out = nn.LayerNorm(w)
        self.head = nn.Linear(w, tok.vocab_size)
        self.register_buffer("mask", torch.full((n, n), float("-inf")).triu(1), persistent=False)
        spelled = torch.zeros(tok.vocab_size, dtype=torch.bool)  # ids of spelt upper-case letters and digits
        spelled[[tok.vocab[c] for c in OCR_CHARS[1:]]] = True
        self.register_buffer("spelled", spelled, persistent=False)

    def forward(self, tokens: torch.Tensor, text: torch.Tensor, ocr: torch.Tensor) -> tuple[torch.Tensor, dict]:
        # tokens: (B, P, D) patch tokens; text: (B, C) caption ids, 0-padded; ocr: (B,) OCR scenes
        P, L = tokens.shape[1], int((text != 0).sum(1).max())
        inp, tgt = text[:, :L - 1], text[:, 1:L]  # (B, L-1): start..last -> first..end
        x = torch.cat([self.inp(self.norm_in(tokens)), self.embed(inp)], 1)  # (B, P+L-1, W)
        n = x.shape[1]
        x = self.blocks(x + self.pos[:n], attn_mask=self.mask[:n, :n])
        logits = self.head(self.norm_out(x[:, P:]))  # (B, L-1, V): position P+j predicts tgt[:, j]
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=0)
        with torch.no_grad():
            right, real = logits.argmax(-1) == tgt, tgt != 0  # (B, L-1)
            chars = self.spelled[tgt]  # (B, L-1)
            metrics = {"reader_acc": round(float(right[real].float().mean()), 4),
                       "reader_char_acc": round(float(right[chars].float().mean()), 4) if chars.any() else None}
            if ocr.any():  # a word read exactly: every one of its characters right, greedy reading would agree
                exact = (right | ~chars).all(1)
                metrics["reader_ocr_exact"] = round(float(exact[ocr].float().mean()), 4)
        return loss, {k: v for k, v in metrics.items() if v is not None}


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
        return [make_sample(self.cfg.split, first + i, self.data) for i in range(B)]

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
        self.reader = Reader(vision, cfg.text, cfg.reader) if cfg.reader > 0 else None
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
