"""Character pages: lines of random capitals and digits, a dense reading exercise for stage 0.

An OCR scene puts 3-6 characters on 49 patches; a page fills the image with lines of them at
the same type sizes, so a batch carries about four times as many labelled glyphs, each at a
random offset to the patch grid. Trained on per-patch character targets alone, a fresh tower
named the character of 59% of OCR test scenes' inked patches after 300 batches of pages
against 27% after 300 batches of OCR scenes (`python benchmarks/glyph_rate.py --source
pages|ocr`). Pages with half of them in documents' small type taught it only 15%.

Pages are not a question type: nothing asks about them and no split holds them; stage 0 draws
them by index (`make_page`), beside the samples of its mix.
"""

from __future__ import annotations

import string

from PIL import Image, ImageDraw

from .fonts import font_name, load_font
from .splits import keyed_rng
from .vocab import COLOURS, TEXT_BACKGROUNDS, TEXT_COLOURS

ALPHABET = string.ascii_uppercase + string.digits
SIZE = (0.16, 0.24)  # type size, fraction of the side: OCR scenes' (documents bring small type)
MAX_CHARS = 40  # stage 0's caption context is 64 tokens, one per character


def make_page(index: int, seed: int = 0, size: int = 224) -> dict:
    """Page `index`: {"image", "meta"} with meta["runs"] = [[text, x, y, font_size], ...], the
    lines top to bottom as drawn (x, y: Pillow's text origin)."""
    rng = keyed_rng(f"{seed}:page:{index}")  # a stream apart from every split's
    font_size = max(8, int(rng.uniform(*SIZE) * size) // 2 * 2)
    font, stroke = load_font(font_size, "sans", None)
    _, top, _, bottom = font.getbbox(ALPHABET)  # the tallest glyphs' extent (Q's tail, J)
    background = rng.choice(tuple(TEXT_BACKGROUNDS))
    img = Image.new("RGB", (size, size), TEXT_BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    runs, chars, y = [], 0, rng.uniform(0, 0.3 * font_size) - top
    while y + bottom <= size and chars < MAX_CHARS:
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(3, min(8, MAX_CHARS - chars + 2))))
        left, _, right, _ = font.getbbox(text)  # left < 0 for J's overhang
        while right - left > 0.95 * size:
            text = text[:-1]
            left, _, right, _ = font.getbbox(text)
        x = round(rng.uniform(-left, size - right))
        fill = COLOURS[rng.choice(TEXT_COLOURS)]
        draw.text((x, round(y)), text, fill=fill, font=font, stroke_width=stroke, stroke_fill=fill)
        runs.append([text, x, round(y), font_size])
        chars += len(text)
        y += (bottom - top) * rng.uniform(1.15, 1.6)
    meta = {"kind": "page", "runs": runs, "background": background, "font": font_name("sans", None)}
    return {"image": img, "meta": meta}


def page_caption(meta: dict) -> str:
    """The lines in reading order, as stage 0's caption tokenizer spells them."""
    return "the text " + " , ".join(text for text, *_ in meta["runs"])
