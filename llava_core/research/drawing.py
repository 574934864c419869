"""What the probes found, for a person to look at: attention over the image as a heat map, the
logit lens as a text table and as a coloured grid. Every picture is written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_path
from ..model.processor import load_image
from .probe import LogitLens

RAMP = ((0.0, (20, 20, 110)), (0.3, (30, 110, 230)), (0.55, (60, 210, 200)), (0.8, (250, 220, 50)),
        (1.0, (215, 30, 30)))


def colour_ramp(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1], any shape -> uint8 RGB (..., 3), linear between the RAMP stops."""
    stops = np.array([p for p, _ in RAMP])
    colours = np.array([c for _, c in RAMP], dtype=np.float64)  # (S, 3)
    v = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.interp(v, stops, colours[:, i]) for i in range(3)], axis=-1)  # (..., 3)
    return rgb.round().astype(np.uint8)


def save_attention_png(attn_map: torch.Tensor, image, path: str | Path,
                       box: tuple[float, float, float, float] | None = None, alpha: float = 0.5) -> Path:
    """Write `image` with the (grid_h, grid_w) map over it as a heat map (min..max of the map over the
    ramp), blended with `alpha`, at the image's size. box: where the grid lies in the image
    (`ImageAttention.box`; default the whole image). Written atomically."""
    if attn_map.dim() != 2:
        raise ValueError(f"an attention map is (grid_h, grid_w), got shape {tuple(attn_map.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: must be in [0, 1]")
    image = load_image(image)
    W, H = image.size
    left, top, right, bottom = (round(v) for v in (box or (0, 0, W, H)))
    if right <= left or bottom <= top:
        raise ValueError(f"box {box} is empty")
    a = attn_map.detach().float().cpu().numpy()
    span = float(a.max() - a.min())
    a = (a - a.min()) / span if span > 0 else np.zeros_like(a)  # (gh, gw) in [0, 1]
    heat = Image.fromarray((a * 255).round().astype(np.uint8))  # L, (gw, gh)
    heat = heat.resize((right - left, bottom - top), resample=Image.Resampling.BILINEAR)
    layer = image.copy()
    layer.paste(Image.fromarray(colour_ramp(np.asarray(heat) / 255.0)), (left, top))  # clipped at the edges
    out = Image.blend(image, layer, alpha)
    path = Path(path)
    with atomic_path(path) as tmp:
        out.save(tmp, format="PNG")
    return path


# --- logit lens -------------------------------------------------------------------------------------

def token_label(tokenizer, i: int, width: int = 12) -> str:
    """A token for display: its text, escaped; a lone byte of a multi-byte character as its piece (<0xE6>)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor will do
    text = tokenizer.decode([int(i)])
    if "\ufffd" in text and hasattr(tokenizer, "convert_ids_to_tokens"):
        text = tokenizer.convert_ids_to_tokens(int(i))
    text = repr(text)[1:-1]
    return text if len(text) <= width else text[:width - 2] + ".."


def layer_name(row: int) -> str:
    return "emb" if row == 0 else str(row)


def format_lens(lens: LogitLens, tokenizer) -> str:
    """The lens as a text table, one block per position: layer, p(chosen), top-k with probabilities."""
    k = lens.top_ids.shape[-1]
    blocks = []
    for j, pos in enumerate(lens.positions):
        lines = [f"position {pos}: chosen '{token_label(tokenizer, lens.chosen[j])}'",
                 f"{'layer':>5}  {'p(chosen)':>9}  top-{k}"]
        for row in range(lens.top_ids.shape[0]):
            tops = "  ".join(f"'{token_label(tokenizer, t)}' {p:.3f}"
                             for t, p in zip(lens.top_ids[row, j].tolist(), lens.top_probs[row, j].tolist()))
            lines.append(f"{layer_name(row):>5}  {lens.chosen_probs[row, j].item():>9.4f}  {tops}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def save_lens_png(lens: LogitLens, tokenizer, path: str | Path, cell: tuple[int, int] = (132, 24)) -> Path:
    """The lens as a grid: a row per layer (input embeddings at the top), a column per position; each
    cell names the layer's top token and is coloured by the probability of the chosen token."""
    cw, ch = cell
    n_rows, n_cols = lens.top_ids.shape[0], len(lens.positions)
    label_w = 44
    im = Image.new("RGB", (label_w + n_cols * cw, (n_rows + 1) * ch), "white")
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()

    def text(xy, s, fill):  # ASCII only: the default font may lack other glyphs
        draw.text(xy, s.encode("ascii", "backslashreplace").decode("ascii"), fill=fill, font=font)

    for j, pos in enumerate(lens.positions):
        text((label_w + j * cw + 4, 5), f"{pos}: {token_label(tokenizer, lens.chosen[j])}", "black")
    colours = colour_ramp(lens.chosen_probs.numpy())  # (L+1, P, 3)
    for row in range(n_rows):
        y = (row + 1) * ch
        text((4, y + 5), layer_name(row), "black")
        for j in range(n_cols):
            x = label_w + j * cw
            rgb = tuple(int(c) for c in colours[row, j])
            draw.rectangle((x, y, x + cw - 1, y + ch - 1), fill=rgb, outline="white")
            ink = "black" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else "white"
            top = token_label(tokenizer, lens.top_ids[row, j, 0], width=10)
            text((x + 4, y + 5), f"{top} {lens.chosen_probs[row, j].item():.2f}", ink)
    path = Path(path)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
    return path
