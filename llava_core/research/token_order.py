"""Token-order interventions: does the decoder read *where* a thing is from an image token's
content, or from the token's place in the sequence?

The decoder sees an image as grid_h x grid_w tokens in row-major order. Rotary positions give
each token a place but leave its value vector alone, so there are two routes to "where": the
token's content (the tower's position embedding survives into its features) or its place
(attention that prefers early or late image tokens). Reordering the tokens after the projector
keeps every token's content and moves only its place. If an answer follows the reorder, the
decoder read the place; if it stays, the content.

`reordered(model, mode)` puts a reorder in place for the passes run inside it; `position_route`
measures, for left/right and top/bottom questions about objects in the outer columns and rows
of synthetic shape scenes, the next-token logit gap between the two answers under each reorder.

    llava-core token-order default --n 30
"""

from __future__ import annotations

import contextlib
import statistics
from typing import Iterator

import torch

MODES = ("none", "rows_reversed", "cols_reversed", "transposed")
# (question form, first answer, second answer, object key, value meaning the first answer)
AXES = (("left/right", "left", "right", "col", 0), ("top/bottom", "top", "bottom", "row", 0))


def reorder_grid(x: torch.Tensor, grid_h: int, grid_w: int, mode: str) -> torch.Tensor:
    """x: (N, P, C) image tokens in row-major order, P = grid_h * grid_w, or 1 + that with a
    leading CLS token (kept first), or twice that (mlpNx_gelu_cols: the grid row-major, then
    column-major), or grid_h * (grid_w + 1) (mlpNx_gelu_newline: a newline token ending each row,
    which stays at the end of its row) -> the same tokens in the order `mode` names."""
    if mode not in MODES:
        raise ValueError(f"reorder_grid: mode={mode!r}, expected one of {MODES}")
    n = grid_h * grid_w
    if x.shape[1] == grid_h * (grid_w + 1) and grid_h > 1 and grid_w > 1:  # not CLS + grid, not 2 grids
        if mode == "transposed" and grid_h != grid_w:
            raise ValueError(f"reorder_grid: transposing a {grid_h}x{grid_w} grid with a newline ending each "
                             "row would change the number of rows, so of newlines")
        rows = x.unflatten(1, (grid_h, grid_w + 1))  # (N, H, W + 1, C)
        g = reorder_grid(rows[:, :, :grid_w].flatten(1, 2), grid_h, grid_w, mode)  # (N, H*W, C)
        return torch.cat([g.unflatten(1, (grid_h, grid_w)), rows[:, :, grid_w:]], dim=2).flatten(1, 2)
    if x.shape[1] == 2 * n:
        # the column-major run is the transposed grid in row-major order, where rows are columns
        twin = {"rows_reversed": "cols_reversed", "cols_reversed": "rows_reversed"}.get(mode, mode)
        return torch.cat([reorder_grid(x[:, :n], grid_h, grid_w, mode),
                          reorder_grid(x[:, n:], grid_w, grid_h, twin)], dim=1)
    cls = x.shape[1] - n
    if cls not in (0, 1):
        raise ValueError(f"reorder_grid: {x.shape[1]} tokens per image in shape {tuple(x.shape)}, "
                         f"expected a {grid_h}x{grid_w} grid ({n}), CLS optional")
    g = x[:, cls:].reshape(x.shape[0], grid_h, grid_w, x.shape[2])  # (N, H, W, C)
    if mode == "rows_reversed":
        g = g.flip(1)
    elif mode == "cols_reversed":
        g = g.flip(2)
    elif mode == "transposed":  # column-major: a column becomes a run of neighbouring places
        g = g.transpose(1, 2)
    return torch.cat([x[:, :cls], g.reshape(x.shape[0], n, x.shape[2])], dim=1)


@contextlib.contextmanager
def reordered(model, mode: str) -> Iterator[None]:
    """Inside the block, model.image_features returns its tokens reordered by `mode`; the model's
    own method is back on exit, also after an error. Passes through model.image_features see it
    (forward, generation, evaluation); the training steps call the tower and projector
    themselves and do not."""
    if mode not in MODES:
        raise ValueError(f"reordered: mode={mode!r}, expected one of {MODES}")
    grid = model.cfg.vision.grid
    before = model.__dict__.get("image_features")  # an outer reorder, when nested
    own = model.image_features
    model.image_features = lambda pixel_values: reorder_grid(own(pixel_values), grid, grid, mode)
    try:
        yield
    finally:
        if before is None:
            del model.image_features  # the instance attribute; the class's method shows again
        else:
            model.image_features = before


def _first_token(tokenizer, word: str) -> int:
    return tokenizer.encode(word, add_special_tokens=False)[0]


def scenes(n: int, image_size: int, split: str = "test", seed: int = 0) -> list[tuple]:
    """(image, object) for the first n shape scenes of `split` holding an object outside the
    middle column and row (its first such object)."""
    from ..data import DataConfig, make_sample

    cfg = DataConfig(image_size=image_size, seed=seed)
    out, i = [], 0
    while len(out) < n:
        if i > 200 * n:
            raise RuntimeError(f"scenes: found {len(out)} of {n} corner objects in {i} {split} samples")
        s = make_sample(split, i, cfg)
        i += 1
        if s["meta"]["kind"] == "shapes":
            corner = [o for o in s["meta"]["objects"] if o["col"] != 1 and o["row"] != 1]
            if corner:
                out.append((s["image"], corner[0]))
    return out


@torch.no_grad()
def logit_gaps(model, processor, items: list[tuple]) -> dict:
    """{axis: [(true answer, logit(first) - logit(second))]}: one question per object and axis,
    the first wording of LR_QS / TB_QS, as one user turn (`processor.prompt`) ready for the answer."""
    from ..data.questions import LR_QS, TB_QS, colour_shape

    out = {}
    for (axis, first, second, key, first_value), template in zip(AXES, (LR_QS[0], TB_QS[0])):
        a, b = _first_token(processor.tokenizer, first), _first_token(processor.tokenizer, second)
        if a == b:
            raise ValueError(f"logit_gaps: {first!r} and {second!r} start with the same token ({a}) "
                             "in this tokenizer, so their logit gap says nothing")
        rows = []
        for image, obj in items:
            text = processor.prompt(template.format(obj=colour_shape(obj)), 1)
            enc = processor(text=[text], images=[[image]], return_tensors="pt")
            px = enc["pixel_values"].to(model.device, model.dtype)
            logits = model(enc["input_ids"].to(model.device), pixel_values=px)[0, -1].float()  # (V,)
            rows.append((first if obj[key] == first_value else second, float(logits[a] - logits[b])))
        out[axis] = rows
    return out


def position_route(model, processor, n: int = 30, split: str = "test", seed: int = 0,
                   modes=MODES) -> dict:
    """{mode: {axis: {"gap | first", "gap | second", "separation"}}}: the mean logit gap
    (first answer minus second) when the first / the second answer is right, and their
    difference. Separation > 0: the model tells the two apart; a sign that flips under a reorder
    of that axis means it read the token's place, not its content."""
    items = scenes(n, model.cfg.vision.image_size, split, seed)
    table = {}
    for mode in modes:
        with reordered(model, mode):
            gaps = logit_gaps(model, processor, items)
        table[mode] = {}
        for axis, first, second, _, _ in AXES:
            m1 = statistics.mean([g for ans, g in gaps[axis] if ans == first] or [float("nan")])
            m2 = statistics.mean([g for ans, g in gaps[axis] if ans == second] or [float("nan")])
            table[mode][axis] = {f"gap | {first}": m1, f"gap | {second}": m2, "separation": m1 - m2}
    return table


def format_route(table: dict) -> str:
    lines = ["| image tokens | " + " | ".join(f"{axis} separation" for axis, *_ in AXES) + " |",
             "|---|" + "---|" * len(AXES)]
    for mode, row in table.items():
        lines.append(f"| {mode} | " + " | ".join(f"{row[axis]['separation']:+.2f}" for axis, *_ in AXES) + " |")
    return "\n".join(lines)
