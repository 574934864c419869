"""Shape scenes: 1-6 objects on a 3x3 grid, each a unique (colour, shape) pair.

A scene is a list of object dicts in canonical order (row-major by cell), which is
also the order of the detailed caption. Cells make position words unambiguous: an
object never leaves its cell, so "left" means column 0 and "directly left of X" means
the nearest object in X's row with a smaller column.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .vocab import CELL_NAMES, SIZES


@dataclass
class SceneConfig:
    min_objects: int = 1
    max_objects: int = 6
    small_radius: tuple[float, float] = (0.07, 0.085)  # circumradius / min(canvas w, h): 31-38 px wide at 224
    large_radius: tuple[float, float] = (0.115, 0.14)  # 52-63 px wide at 224; a cell is 74.7 px
    margin: float = 0.02  # least gap between an object's circle and its cell border, / min(w, h)

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            raise ValueError(f"SceneConfig: need 1 <= min_objects ({self.min_objects}) <= "
                             f"max_objects ({self.max_objects}) <= 9 grid cells")
        if self.large_radius[1] + self.margin > 1 / 6:
            raise ValueError(f"SceneConfig: large_radius {self.large_radius[1]} + margin {self.margin} "
                             "does not fit in a grid cell (1/6 of the short side)")


def sample_layout(rng: random.Random, cfg: SceneConfig, pairs: tuple, must: tuple = ()) -> list[tuple]:
    """(cell, colour, shape, size) per object, by cell; with `must`, at least one pair is from it."""
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    cells = sorted(rng.sample(range(9), n))
    chosen = rng.sample(pairs, n)
    if must and not any(p in must for p in chosen):
        chosen[rng.randrange(n)] = rng.choice(must)
    return [(cell, c, s, rng.choice(SIZES)) for (c, s), cell in zip(chosen, cells)]


def layout_key(layout: list[tuple]) -> str:
    """The discrete content of a scene, which decides its split."""
    return "shapes|" + ";".join(f"{cell}:{c}:{s}:{size}" for cell, c, s, size in layout)


def make_objects(layout: list[tuple]) -> list[dict]:
    """Object dicts (not yet placed) in canonical order."""
    return [{"colour": c, "shape": s, "size": size, "cell": cell, "row": cell // 3, "col": cell % 3,
             "position": CELL_NAMES[cell]} for cell, c, s, size in layout]


def place(rng: random.Random, objects: list[dict], w: int, h: int, cfg: SceneConfig,
          max_rotation: float = 0.0) -> None:
    """Give each object a centre, radius and rotation (degrees) on a w x h canvas, in place."""
    base = min(w, h)
    cw, ch = w / 3, h / 3
    for o in objects:
        lo, hi = cfg.small_radius if o["size"] == "small" else cfg.large_radius
        r = rng.uniform(lo, hi) * base
        jx = max(0.0, cw / 2 - r - cfg.margin * base)
        jy = max(0.0, ch / 2 - r - cfg.margin * base)
        o.update(cx=round((o["col"] + 0.5) * cw + rng.uniform(-jx, jx), 1),
                 cy=round((o["row"] + 0.5) * ch + rng.uniform(-jy, jy), 1),
                 r=round(r, 1),
                 rotation=round(rng.uniform(-max_rotation, max_rotation), 1) if max_rotation else 0.0)
