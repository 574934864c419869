"""Small rendered documents: a title, two or three (item, value) rows and a TOTAL row."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from .fonts import font_name, load_font
from .vocab import COLOURS, DOC_ITEMS, DOC_TITLES

TITLE_QS = ("What is the title?", "What is the title of this document?",
            "What heading is written at the top?", "Read the title of the table.")
TOTAL_QS = ("What is the total?", "What total is shown at the bottom?",
            "What is the value in the TOTAL row?", "What number does the TOTAL line show?")
VALUE_QS = ("What is the value for {item}?", "What number is next to {item}?",
            "How much is {item}?", "What value does the {item} row show?")
ROWS_QS = ("How many items are listed?", "How many rows are there above the total?",
           "Count the items in the table.", "How many entries does the table have, not counting the total?")


def sample_document(rng: random.Random) -> dict:
    items = rng.sample(DOC_ITEMS, rng.randint(2, 3))
    rows = [[item, rng.randint(1, 19)] for item in items]
    return {"kind": "document", "title": rng.choice(DOC_TITLES), "rows": rows,
            "total": sum(v for _, v in rows), "title_colour": rng.choice(("black", "blue", "red"))}


def document_key(meta: dict) -> str:
    return f"doc|{meta['title']}|" + ";".join(f"{i}={v}" for i, v in meta["rows"])


def layout_document(rng: random.Random, meta: dict, w: int, h: int, family: str = "sans",
                    font_path: str | None = None) -> None:
    """Font sizes and the top of the page (shifted down at random into the free space), in place."""
    s = min(w, h)
    title_size, row_size = round(0.12 * s) // 2 * 2, round(0.095 * s) // 2 * 2
    pitch = round(0.13 * s)
    height = round(0.03 * s) + round(1.25 * title_size) + pitch * (len(meta["rows"]) + 1) + round(0.06 * s)
    margin = round(0.05 * s)
    top = margin + round(rng.uniform(0, max(0, h - 2 * margin - height)))
    meta.update(font=font_name(family, font_path), title_size=title_size, row_size=row_size,
                pitch=pitch, margin=margin, top=top)


def render_document(meta: dict, w: int, h: int, family: str = "sans", font_path: str | None = None,
                    background=(255, 255, 255)) -> Image.Image:
    """Title centred, rows with left-aligned items and right-aligned values, ruled TOTAL."""
    s, m, pitch = min(w, h), meta["margin"], meta["pitch"]
    img = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(img)
    ink = COLOURS["black"]
    draw.rectangle((m // 2, m // 2, w - 1 - m // 2, h - 1 - m // 2), outline=ink, width=max(1, s // 112))
    tfont, tstroke = load_font(meta["title_size"], family, font_path)
    tcol = COLOURS[meta["title_colour"]]
    y = meta["top"] + round(0.03 * s)
    draw.text(((w - tfont.getlength(meta["title"])) / 2, y), meta["title"], fill=tcol, font=tfont,
              stroke_width=tstroke, stroke_fill=tcol)
    y += round(1.25 * meta["title_size"])
    draw.line((m, y, w - m, y), fill=ink, width=max(1, s // 112))
    rfont, rstroke = load_font(meta["row_size"], family, font_path)
    pad = round(0.06 * s)
    lines = [(item, str(v)) for item, v in meta["rows"]] + [("TOTAL", str(meta["total"]))]
    for i, (item, value) in enumerate(lines):
        if i == len(lines) - 1:
            draw.line((m, y + pitch * i + 2, w - m, y + pitch * i + 2), fill=ink, width=max(1, s // 112))
        yy = y + pitch * i + round(0.025 * s)
        draw.text((m + pad, yy), item, fill=ink, font=rfont, stroke_width=rstroke, stroke_fill=ink)
        draw.text((w - m - pad - rfont.getlength(value), yy), value, fill=ink, font=rfont,
                  stroke_width=rstroke, stroke_fill=ink)
    return img


def ask_title(rng: random.Random, meta: dict):
    return rng.choice(TITLE_QS), meta["title"], "doc_title"


def ask_total(rng: random.Random, meta: dict):
    return rng.choice(TOTAL_QS), str(meta["total"]), "doc_total"


def ask_value(rng: random.Random, meta: dict):
    item, value = rng.choice(meta["rows"])
    return rng.choice(VALUE_QS).format(item=item), str(value), "doc_value"


def ask_rows(rng: random.Random, meta: dict):
    return rng.choice(ROWS_QS), str(len(meta["rows"])), "doc_rows"


DOC_ASKERS = (ask_title, ask_total, ask_value, ask_rows)
