"""What stage 0 asks of the feature layer's patch tokens besides the contrastive loss, and the
per-patch targets it asks with.

Auxiliary heads (`Stage0Config.aux_weight > 0`, cheap: linear layers on tokens already
computed): the mean over each 3x3 grid cell predicts that cell's colour, shape and size (or
empty), each patch the colour and shape of the object over it, and each patch the character
drawn over it (or none). Contrastive learning alone, in the hundred-odd steps measured here,
left cell colour *less* linearly readable than a random tower (0.81 vs 0.93) and shape, count
and characters at chance; these heads ask the very tokens the projector will see to make
those facts linearly readable. Shape is still the slowest to come.

The reader (`Stage0Config.reader > 0` blocks): a small causal transformer reads each image's
caption, token by token, after the patch tokens in row-major order, as the decoder will read
them (captioning pretraining, CapPa's and LocCa's objective). Linear heads ask a token what
lies on it; the reader asks the tokens, in sequence, for the text in order and for where
each object is, which is what OCR and left/right answers need.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import COLOURS, SHAPES
from ..data.vocab import SIZES
from ..model.config import VisionConfig

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
    """(string, x, y, font) of every line drawn in an OCR, document or page image, as the renderers
    in llava_core.data place them (same fonts, same arithmetic)."""
    from ..data.fonts import load_font

    if meta["kind"] == "text":
        font, _ = load_font(meta["font_size"], "sans", None)
        return [(meta["text"], *meta["origin"], font)]
    if meta["kind"] == "page":
        return [(text, x, y, load_font(font_size, "sans", None)[0]) for text, x, y, font_size in meta["runs"]]
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
    token: patch tokens (B, P, D) -> LayerNorm -> linear to `width`, caption ids (stage 0's
    CaptionTokenizer `tok`) embedded, learned positions over the whole sequence, `layers`
    open_clip blocks of `heads` heads."""

    def __init__(self, vision: VisionConfig, tok, width: int, heads: int, layers: int):
        super().__init__()
        from open_clip.transformer import Transformer

        w, n = width, vision.grid ** 2 + tok.context_length
        self.norm_in = nn.LayerNorm(vision.hidden_size)
        self.inp = nn.Linear(vision.hidden_size, w)
        self.embed = nn.Embedding(tok.vocab_size, w)
        self.pos = nn.Parameter(torch.randn(n, w) * 0.01)
        self.blocks = Transformer(w, layers, heads)
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
            if ocr.any():  # a word read exactly: each character the arg max given the true text before it
                exact = (right | ~chars).all(1)
                metrics["reader_ocr_exact"] = round(float(exact[ocr].float().mean()), 4)
        return loss, {k: v for k, v in metrics.items() if v is not None}
