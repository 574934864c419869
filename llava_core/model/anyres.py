"""LLaVA-NeXT's "any resolution" geometry, as pure functions of image sizes (no tensors).

Liu et al. 2024 (LLaVA-NeXT, "llava-v1.6"). An image of (height, width) is fitted into the
resolution from `image_grid_pinpoints` that keeps most of its pixels and wastes least; it is
resized inside that resolution keeping its aspect ratio, padded to it (centred, black), and cut
into tower-sized tiles, row by row. The tower also sees the whole image squashed to one tile
(the base image). The tiles' feature grids are stitched back into one grid, the rows and
columns that only saw padding are cut off again ("unpadding"), and a learned newline vector
follows each row. The per-image token count is therefore a function of the image's size:

    tokens = g * g                      (base image: g x g patches per tile)
           + rows * (cols + 1)          (the unpadded stitched grid, one newline per row)

Sizes are (height, width) throughout, as transformers' helpers take them.
"""

from __future__ import annotations

import math


def select_best_resolution(image_hw: tuple[int, int], pinpoints: list) -> tuple[int, int]:
    """The (height, width) of `pinpoints` that shows most of the image's pixels once it is scaled
    to fit inside (capped at its own pixel count: no credit for upscaling), ties going to the
    resolution with least unused area. The first such resolution in list order wins."""
    h, w = image_hw
    best, best_shown, best_waste = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        shown = min(int(w * scale) * int(h * scale), w * h)
        waste = pw * ph - shown
        if shown > best_shown or (shown == best_shown and waste < best_waste):
            best, best_shown, best_waste = (ph, pw), shown, waste
    return best


def fit_within(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image resized to touch `target_hw` on one side, keeping its aspect
    ratio; the other side is rounded up (and capped at the target)."""
    h, w = image_hw
    th, tw = target_hw
    if tw / w < th / h:
        return min(math.ceil(h * tw / w), th), tw
    return th, min(math.ceil(w * th / h), tw)


def padding(inner_hw: tuple[int, int], outer_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) that centre `inner_hw` in `outer_hw`; an odd remainder goes to
    the bottom / right."""
    top, extra_h = divmod(outer_hw[0] - inner_hw[0], 2)
    left, extra_w = divmod(outer_hw[1] - inner_hw[1], 2)
    return top, top + extra_h, left, left + extra_w


def tile_grid(image_hw: tuple[int, int], pinpoints: list, tile: int) -> tuple[int, int]:
    """(rows, cols) of `tile`-pixel tiles the image is cut into."""
    ph, pw = select_best_resolution(image_hw, pinpoints)
    return ph // tile, pw // tile


def num_tiles(image_hw: tuple[int, int], pinpoints: list, tile: int) -> int:
    """Tiles the vision tower sees for one image: the base image plus the grid's tiles."""
    rows, cols = tile_grid(image_hw, pinpoints, tile)
    return 1 + rows * cols


def unpad_box(image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The part of a stitched (rows, cols) feature grid that shows the image, not its padding:
    (row0, row1, col0, col1), half-open. Only the side the image did not fill is cut, by the
    same amount at both ends (transformers' rounding: the scaled length rounded to 7 decimals,
    truncated, the difference halved and floored)."""
    h, w = image_hw
    rows, cols = grid_hw
    if w / h > cols / rows:  # wider than the grid: padding above and below
        kept = int(round(h * (cols / w), 7))
        cut = (rows - kept) // 2
        return cut, rows - cut, 0, cols
    kept = int(round(w * (rows / h), 7))
    cut = (cols - kept) // 2
    return 0, rows, cut, cols - cut


def image_token_count(image_hw: tuple[int, int], pinpoints: list, tile: int, patch: int) -> int:
    """Image tokens for one image of `image_hw` (drop-CLS features, newline after each row)."""
    g = tile // patch  # patches per tile side
    rows, cols = tile_grid(image_hw, pinpoints, tile)
    r0, r1, c0, c1 = unpad_box(image_hw, (rows * g, cols * g))
    return g * g + (r1 - r0) * (c1 - c0 + 1)


__all__ = ["select_best_resolution", "fit_within", "padding", "tile_grid", "num_tiles", "unpad_box",
           "image_token_count"]
