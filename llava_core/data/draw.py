"""Pillow rasterisation of shapes: unit polygons scaled, rotated and filled.

`render_shapes` with supersample=1 is the fast training path (hard edges, exact
colours inside each shape). With supersample > 1 the canvas is drawn larger and
box-reduced, which anti-aliases the edges; the shifted split uses that.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from .vocab import COLOURS


def _regular(n: int, start_deg: float, radii=(1.0,)) -> list[tuple[float, float]]:
    """Vertices of a regular n-gon (or star, with alternating radii) of circumradius 1."""
    pts = []
    for i in range(n * len(radii)):
        a = math.radians(start_deg + 360.0 * i / (n * len(radii)))
        rad = radii[i % len(radii)]
        pts.append((rad * math.cos(a), rad * math.sin(a)))
    return pts


def _heart(n: int = 48) -> list[tuple[float, float]]:
    """The classic parametric heart, scaled into [-0.95, 0.95]^2 (y down)."""
    raw = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        raw.append((x, y))
    xs, ys = [p[0] for p in raw], [p[1] for p in raw]
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    s = 1.9 / max(max(xs) - min(xs), max(ys) - min(ys))
    return [((x - cx) * s, (y - cy) * s) for x, y in raw]


_A = 0.34  # half-width of a cross arm
UNIT_POLYGONS = {  # circumradius ~1, centred, y down; the centre is inside every shape
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -0.866), (1.0, 0.866), (-1.0, 0.866)],
    "star": [(x, y + 0.095) for x, y in _regular(5, -90, (1.0, 0.42))],
    "diamond": [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)],
    "hexagon": _regular(6, 0),
    "cross": [(-_A, -1), (_A, -1), (_A, -_A), (1, -_A), (1, _A), (_A, _A), (_A, 1), (-_A, 1),
              (-_A, _A), (-1, _A), (-1, -_A), (-_A, -_A)],
    "heart": _heart(),
}


def shape_polygon(shape: str, cx: float, cy: float, r: float, rotation: float = 0.0) -> list[tuple[float, float]]:
    """The polygon of `shape` centred at (cx, cy) with circumradius r, rotated by degrees."""
    pts = UNIT_POLYGONS[shape]
    if rotation:
        c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
        pts = [(x * c - y * s, x * s + y * c) for x, y in pts]
    return [(cx + x * r, cy + y * r) for x, y in pts]


def draw_shape(draw: ImageDraw.ImageDraw, obj: dict, scale: float = 1.0) -> None:
    """Fill one scene object; `scale` maps scene pixels to canvas pixels."""
    fill = COLOURS[obj["colour"]]
    cx, cy, r = obj["cx"] * scale, obj["cy"] * scale, obj["r"] * scale
    if obj["shape"] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(shape_polygon(obj["shape"], cx, cy, r, obj.get("rotation", 0.0)), fill=fill)


def render_shapes(objects: list[dict], w: int, h: int, background=(255, 255, 255),
                  supersample: int = 1) -> Image.Image:
    """An RGB w x h image of the objects; supersample > 1 anti-aliases by drawing larger."""
    img = Image.new("RGB", (w * supersample, h * supersample), background)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        draw_shape(draw, obj, supersample)
    return img.reduce(supersample) if supersample > 1 else img
