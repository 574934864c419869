"""A PNG contact sheet of samples with their conversation under each, for people to look at."""

from __future__ import annotations

import math
import textwrap

from PIL import Image, ImageDraw

from .fonts import load_font

PAD = 6  # px between cells
LINE_HEIGHT = 13
FONT_SIZE = 11


def grid_size(n: int, cols: int = 4, thumb: int = 224, text_lines: int = 10) -> tuple[int, int]:
    """(width, height) of the sheet save_grid writes for n samples."""
    rows = math.ceil(n / cols)
    return min(n, cols) * (thumb + PAD) + PAD, rows * (thumb + text_lines * LINE_HEIGHT + 2 * PAD) + PAD


def _lines(sample: dict, width_chars: int, text_lines: int) -> list[str]:
    out = [f"[{sample['qtype']}]"]
    for turn in sample["conversation"]:
        tag = "Q: " if turn["role"] == "user" else "A: "
        out += textwrap.wrap(tag + turn["content"], width_chars) or [tag]
    if len(out) > text_lines:
        out = out[:text_lines - 1] + [out[text_lines - 1][:max(0, width_chars - 3)] + "..."]
    return out


def save_grid(samples: list[dict], path, cols: int = 4, thumb: int = 224, text_lines: int = 10) -> Image.Image:
    """Write samples (thumbnails of `thumb` px, text below) to `path` as PNG; returns the sheet."""
    if not samples:
        raise ValueError("save_grid: no samples")
    sheet = Image.new("RGB", grid_size(len(samples), cols, thumb, text_lines), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font, _ = load_font(FONT_SIZE, "regular")
    width_chars = max(8, int(thumb / (0.6 * FONT_SIZE)))
    cell_h = thumb + text_lines * LINE_HEIGHT + 2 * PAD
    for i, sample in enumerate(samples):
        x, y = PAD + (i % cols) * (thumb + PAD), PAD + (i // cols) * cell_h
        img = sample["image"].copy()
        img.thumbnail((thumb, thumb))
        sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        draw.rectangle((x - 1, y - 1, x + thumb, y + thumb), outline=(180, 180, 180))
        for j, line in enumerate(_lines(sample, width_chars, text_lines)):
            draw.text((x, y + thumb + PAD + j * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    sheet.save(path, format="PNG")
    return sheet
