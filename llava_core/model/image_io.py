"""Images in, RGB PIL images out: every file, mode and array shape the processor accepts, and
a clear ProcessorError for everything else (docs/robustness.md lists the cases).

Files are opened lazily and their size checked against Pillow's `Image.MAX_IMAGE_PIXELS`
(read at call time, so raising or clearing it in Pillow applies here) before any pixel is
decoded; a larger image is refused, not merely warned about. EXIF orientation is applied to
files as transformers' `image_utils.load_image` does (a PIL image passed in is taken as it
is, as transformers' image processors take it). An animated file gives its first frame.
16-bit and 32-bit grayscale are scaled to 8 bits (Pillow's own convert clips them).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

URL_PREFIXES = ("http://", "https://", "ftp://", "data:")


class ProcessorError(ValueError):
    """Prompts, images or a truncation that cannot be turned into model inputs."""


def load_image(image, convert_rgb: bool = True) -> Image.Image:
    """A PIL image, a file path, or a (H, W[, C]) uint8 / [0, 1] float array -> an RGB PIL image.

    Transparency is composited onto white, as transformers 5 does. The original LLaVA repo's
    `.convert('RGB')` drops alpha instead, so translucent pixels differ between the two."""
    if isinstance(image, (str, Path)):
        image = open_image_file(image)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"an image must be a PIL image, a path or a numpy array, got {type(image).__name__}")
    check_image_size(image.size, "the image")
    if not convert_rgb:
        if image.mode != "RGB":
            raise ProcessorError(f"a {image.mode} image with do_convert_rgb=false: the vision tower takes RGB")
        return image
    return to_rgb(image)


def check_image_size(wh: tuple[int, int], name) -> None:
    w, h = wh
    if w < 1 or h < 1:
        raise ProcessorError(f"{name}: {w}x{h} has no pixels")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:
        raise ProcessorError(f"{name}: {w}x{h} = {w * h} pixels is over the limit of {limit} "
                             "(Pillow's Image.MAX_IMAGE_PIXELS, a guard against decompression bombs); "
                             "shrink the image first")


def open_image_file(path: str | Path) -> Image.Image:
    """Decode an image file (its first frame), refusing URLs, folders, empty files and bombs."""
    if isinstance(path, str) and path.lower().startswith(URL_PREFIXES):
        raise ProcessorError(f"{path}: URLs are not fetched; download the image and pass the file")
    p = Path(path)
    if p.is_dir():
        raise ProcessorError(f"{path}: is a folder, not an image file")
    try:
        if p.is_file() and p.stat().st_size == 0:
            raise ProcessorError(f"{path}: an empty file (0 bytes), not an image")
        with warnings.catch_warnings():  # Pillow warns between 1x and 2x its limit; we refuse instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            f = Image.open(p)
        with f:
            check_image_size(f.size, path)  # before a pixel is decoded
            f.seek(0)  # the first frame of an animation
            f.load()
            image = ImageOps.exif_transpose(f)  # a copy, turned as the EXIF orientation says
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except Image.DecompressionBombError as e:  # Pillow's own check in open(), past twice the limit
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        raise ProcessorError(f"{path}: {pixels.group(1) if pixels else 'too many'} pixels is over the limit of "
                             f"{Image.MAX_IMAGE_PIXELS} (Pillow's Image.MAX_IMAGE_PIXELS, a guard against "
                             "decompression bombs); shrink the image first") from None
    except ProcessorError:
        raise
    except Exception as e:  # whatever a decoder raises on a malformed file (OSError, SyntaxError, ...)
        raise ProcessorError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: high bit depths scaled (not clipped), transparency composited onto white."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = Image.fromarray(_to_uint8(image))  # -> L
    if "A" in image.getbands() or "transparency" in image.info:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ProcessorError(f"a {image.mode} image cannot be converted to RGB ({e})") from None


def _to_uint8(image: Image.Image) -> np.ndarray:
    """I;16* and I read as 16-bit data (0..65535 -> 0..255, values outside clipped); F as [0, 1]
    floats like float arrays (outside clipped, NaN as 0)."""
    if image.mode == "F":
        x = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    x = np.asarray(image).astype(np.float64)
    return np.round(np.clip(x, 0, 65535) * (255 / 65535)).astype(np.uint8)


def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ProcessorError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        if a.size and not np.isfinite(a).all():
            raise ProcessorError("a float image array holds NaN or infinite values")
        if a.size and (a.min() < 0 or a.max() > 1):
            raise ProcessorError(f"a float image array must hold values in [0, 1], got [{a.min()}, {a.max()}]")
        a = np.round(a * 255)
    elif not np.issubdtype(a.dtype, np.integer):
        raise ProcessorError(f"an image array of dtype {a.dtype} is not an image (uint8, or floats in [0, 1])")
    elif a.dtype != np.uint8 and a.size and (a.min() < 0 or a.max() > 255):
        raise ProcessorError(f"an integer image array must hold values in [0, 255], got [{a.min()}, {a.max()}]")
    return Image.fromarray(a.astype(np.uint8))


def resize_then_crop(im: Image.Image, size: tuple[int, int], crop_hw: tuple[int, int],
                     resample: int) -> Image.Image | None:
    """What a resize to `size` (w, h) then a centre crop to `crop_hw` gives, computed from the
    kept region only; None when the resize is not much larger than the crop (the caller then
    resizes and crops as usual). A 1x2000 image would otherwise become 336x672000 on its way to
    336x336. Pillow's filter still reads the source around the box and the two passes run in
    the order a plain resize runs them (horizontal, then vertical), so the pixels agree to a few
    levels (box edges in floating point; exact in most cases measured). Used only past a 16:1
    area ratio (aspect beyond 16:1 for a square crop), so ordinary images stay bit-exact."""
    (w, h), (rw, rh), (ch, cw) = im.size, size, crop_hw
    if rw < cw or rh < ch or rw * rh <= 16 * cw * ch:
        return None
    left, top = (rw - cw) // 2, (rh - ch) // 2  # center_crop's offsets
    sx, sy = w / rw, h / rh
    im = im.resize((cw, h), resample=resample, box=(left * sx, 0, (left + cw) * sx, h))  # (h, cw)
    return im.resize((cw, ch), resample=resample, box=(0, top * sy, cw, (top + ch) * sy))  # (ch, cw)
