"""The shifted split's rendering path: other canvases, anti-aliased rotated shapes, a serif
font, off-white paper, then letterbox, blur, noise and JPEG.

Shapes are drawn with Pillow at `supersample`x and box-reduced (anti-aliased edges,
unlike the hard-edged training path) and rotated by up to `max_rotation` degrees. We
use Pillow rather than matplotlib: it keeps the package free of a plotting dependency
and costs a few ms per image instead of tens; what the model sees changes the same way
(soft edges, other geometry, other statistics).
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter


@dataclass
class ShiftConfig:
    long_side: tuple[int, int] = (240, 320)  # canvas long side, px
    aspects: tuple[float, ...] = (1.0, 4 / 3, 3 / 4, 5 / 4, 4 / 5)  # canvas w / h
    supersample: int = 3
    max_rotation: float = 12.0  # degrees; small enough that a square never reads as a diamond
    jpeg_quality: tuple[int, int] = (35, 80)
    blur: tuple[float, float] = (0.4, 0.9)  # Gaussian std, px (3x3 kernel)
    noise: tuple[float, float] = (2.0, 6.0)  # std, grey levels
    resize: str = "letterbox"  # "letterbox" to image_size x image_size, or "none" (left to the processor)

    def __post_init__(self):
        if self.resize not in ("letterbox", "none"):
            raise ValueError(f"ShiftConfig.resize={self.resize!r}: expected 'letterbox' or 'none'")


def sample_shift(rng: random.Random, cfg: ShiftConfig) -> dict:
    """Canvas size, paper colour and corruption strengths for one shifted sample."""
    long = rng.randint(*cfg.long_side)
    aspect = rng.choice(cfg.aspects)
    w, h = (long, round(long / aspect)) if aspect >= 1 else (round(long * aspect), long)
    base = rng.randint(236, 250)
    paper = tuple(min(255, base + rng.randint(-6, 6)) for _ in range(3))
    return {"canvas": [w, h], "paper": list(paper),
            "jpeg_quality": rng.randint(*cfg.jpeg_quality),
            "blur": round(rng.uniform(*cfg.blur), 2), "noise": round(rng.uniform(*cfg.noise), 2),
            "noise_seed": rng.getrandbits(32)}


def letterbox(img: Image.Image, size: int, fill) -> tuple[Image.Image, float, tuple[int, int]]:
    """Fit the long side to `size`, pad the short one with `fill`; returns (image, scale, offset)."""
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = round(w * scale), round(h * scale)
    out = Image.new("RGB", (size, size), fill)
    off = ((size - nw) // 2, (size - nh) // 2)
    out.paste(img.resize((nw, nh), Image.Resampling.BICUBIC), off)
    return out, scale, off


def blur_kernel(sigma: float) -> ImageFilter.Kernel:
    """A 3x3 Gaussian of std `sigma` (px): cheaper than ImageFilter.GaussianBlur at these radii."""
    w = math.exp(-1 / (2 * sigma * sigma))
    k = [w * w, w, w * w, w, 1.0, w, w * w, w, w * w]
    return ImageFilter.Kernel((3, 3), k, sum(k))


def corrupt(img: Image.Image, params: dict, size: int, resize: str) -> tuple[Image.Image, float, tuple[int, int]]:
    """Letterbox, blur, add noise, JPEG round-trip; returns (image, scale, offset)."""
    scale, off = 1.0, (0, 0)
    if resize == "letterbox":
        img, scale, off = letterbox(img, size, tuple(params["paper"]))
    img = img.filter(blur_kernel(params["blur"]))
    # uniform noise with std params["noise"]: cheaper to draw than Gaussian, looks the same at this level
    u = np.frombuffer(np.random.default_rng(params["noise_seed"]).bytes(img.width * img.height * 3), np.uint8)
    amp = params["noise"] * math.sqrt(3) / 127.5
    noise = (u.astype(np.float32) - 127.5) * amp
    arr = np.asarray(img, dtype=np.float32) + noise.reshape(img.height, img.width, 3)
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=params["jpeg_quality"])
    buf.seek(0)
    return Image.open(buf).convert("RGB"), scale, off
