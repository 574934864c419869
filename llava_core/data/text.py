"""OCR scenes: one word, number or letter string (3-6 characters) in big bold type."""

from __future__ import annotations

import random
import string

from PIL import Image, ImageDraw

from .fonts import font_name, load_font
from .vocab import COLOURS, TEXT_BACKGROUNDS, TEXT_COLOURS, WORDS

OCR_QS = ("What does the text say?", "What is written in the image?", "Read the text in the image.",
          "What word or number is shown?", "Transcribe the text in the picture.")
TEXT_COLOUR_QS = ("What colour is the text?", "What colour are the letters?",
                  "In what colour is the text written?", "Which colour is the writing?")
TEXT_LENGTH_QS = ("How many characters does the text have?", "How many characters are written?",
                  "Count the characters in the text.", "How long is the text, in characters?")


def sample_text(rng: random.Random) -> dict:
    """What to write: half dictionary words, a quarter numbers, a quarter random capitals."""
    u, n = rng.random(), rng.randint(3, 6)
    if u < 0.5:
        kind, text = "word", rng.choice(WORDS)
    elif u < 0.75:
        kind, text = "number", str(rng.randint(10 ** (n - 1), 10 ** n - 1))
    else:
        kind, text = "letters", "".join(rng.choice(string.ascii_uppercase) for _ in range(n))
    return {"kind": "text", "text_kind": kind, "text": text,
            "text_colour": rng.choice(TEXT_COLOURS), "background": rng.choice(tuple(TEXT_BACKGROUNDS))}


def text_key(meta: dict) -> str:
    return f"text|{meta['text']}|{meta['text_colour']}|{meta['background']}"


def place_text(rng: random.Random, meta: dict, w: int, h: int, family: str = "sans",
               font_path: str | None = None) -> None:
    """Pick a font size (16-24% of the short side, shrunk to fit) and a position, in place."""
    size = int(rng.uniform(0.16, 0.24) * min(w, h)) // 2 * 2
    font, stroke = load_font(size, family, font_path)
    width = font.getlength(meta["text"]) + 2 * stroke
    if width > 0.88 * w:
        size = int(size * 0.88 * w / width) // 2 * 2
        font, stroke = load_font(size, family, font_path)
    x0, y0, x1, y1 = font.getbbox(meta["text"], stroke_width=stroke)
    margin = 0.04 * min(w, h)
    x = round(rng.uniform(margin, max(margin, w - margin - (x1 - x0))) - x0)
    y = round(rng.uniform(margin, max(margin, h - margin - (y1 - y0))) - y0)
    meta.update(font=font_name(family, font_path), font_size=size, stroke=stroke, origin=[x, y],
                bbox=[x + x0, y + y0, x + x1, y + y1])


def render_text(meta: dict, w: int, h: int, family: str = "sans", font_path: str | None = None,
                background=None) -> Image.Image:
    """The text of a placed OCR scene on its background (or an explicit one)."""
    img = Image.new("RGB", (w, h), background or TEXT_BACKGROUNDS[meta["background"]])
    font, stroke = load_font(meta["font_size"], family, font_path)
    fill = COLOURS[meta["text_colour"]]
    ImageDraw.Draw(img).text(tuple(meta["origin"]), meta["text"], fill=fill, font=font,
                             stroke_width=stroke, stroke_fill=fill)
    return img


def ask_ocr(rng: random.Random, meta: dict):
    return rng.choice(OCR_QS), meta["text"], "ocr_read"


def ask_text_colour(rng: random.Random, meta: dict):
    return rng.choice(TEXT_COLOUR_QS), meta["text_colour"], "ocr_colour"


def ask_text_length(rng: random.Random, meta: dict):
    return rng.choice(TEXT_LENGTH_QS), str(len(meta["text"])), "ocr_length"
