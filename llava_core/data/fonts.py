"""Bold fonts for rendered text, found by file name and cached per size.

The first candidate Pillow can open wins (it searches the system font folders for a
bare file name); failing all, Pillow's bundled scalable font is used with a stroke
to make it bold. Layout uses Pillow's BASIC engine so glyph placement does not depend
on whether libraqm is installed.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from PIL import ImageFont

log = logging.getLogger(__name__)

CANDIDATES = {
    "sans": ("DejaVuSans-Bold.ttf", "LiberationSans-Bold.ttf", "FreeSansBold.ttf", "Arial Bold.ttf", "arialbd.ttf"),
    "serif": ("DejaVuSerif-Bold.ttf", "LiberationSerif-Bold.ttf", "FreeSerifBold.ttf", "timesbd.ttf"),
    "regular": ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "FreeSans.ttf", "arial.ttf"),
}


@lru_cache(maxsize=None)
def font_file(family: str = "sans", path: str | None = None) -> str | None:
    """The font file used for `family` (an explicit `path` wins), or None for Pillow's own."""
    for name in ((path,) if path else CANDIDATES[family]):
        try:
            ImageFont.truetype(name, 12)
            return name
        except OSError:
            continue
    if path:
        raise FileNotFoundError(f"font {path!r} could not be opened by Pillow")
    log.warning("no %s TTF found (%s); using Pillow's bundled font with a stroke",
                family, ", ".join(CANDIDATES[family]))
    return None


@lru_cache(maxsize=256)
def load_font(size: int, family: str = "sans", path: str | None = None) -> tuple[ImageFont.FreeTypeFont, int]:
    """(font, stroke width) for `size` px; the stroke is >0 only for the bundled fallback."""
    name = font_file(family, path)
    if name is None:
        return ImageFont.load_default(size=size), (max(1, size // 14) if family != "regular" else 0)
    return ImageFont.truetype(name, size, layout_engine=ImageFont.Layout.BASIC), 0


def font_name(family: str = "sans", path: str | None = None) -> str:
    """A short name of the font in use, for sample metadata."""
    return font_file(family, path) or "pillow-default"
