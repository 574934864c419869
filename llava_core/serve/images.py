"""Images named in a request: data URLs (PNG, JPEG, WebP), or files under the operator's
`--allow-dir`. The size is read from the header and refused before any pixel is decoded (a
small file may declare a huge image: a decompression bomb); http(s) URLs are refused (the
server assumes no network)."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, ImageOps

from ..model.image_io import to_rgb
from .protocol import APIError, Limits

FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}


def load_image_url(url: object, limits: Limits, allow_dir: Path | None, param: str) -> Image.Image:
    """One `image_url.url` -> an RGB PIL image, or an APIError (400) naming `param`."""
    if not isinstance(url, str) or not url:
        raise APIError(f"{param} must be a non-empty string", param=param)
    if url.startswith("data:"):
        return _decode(_data_url_bytes(url, param), limits, param, FORMATS[_mime(url, param)])
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https", "ftp"):
        raise APIError(f"{param}: {scheme} URLs are not fetched (this server has no network); send the image "
                       "as a data URL (data:image/png;base64,...)", param=param, code="unsupported_image_url")
    if scheme not in ("", "file") and len(scheme) > 1:  # a one-letter scheme is a Windows drive
        raise APIError(f"{param}: unsupported URL scheme {scheme!r}; use a data URL", param=param)
    return _decode(_local_bytes(url, limits, allow_dir, param), limits, param, None)


def _mime(url: str, param: str) -> str:
    head = url[5:url.find(",")] if "," in url else url[5:]
    mime = head.split(";")[0].strip().lower()
    if mime not in FORMATS:
        raise APIError(f"{param}: a data URL of type {mime or 'text/plain'!r} is not an image; "
                       "send image/png, image/jpeg or image/webp", param=param, code="invalid_image")
    if ";base64" not in head.lower():
        raise APIError(f"{param}: the image data URL must be base64 (data:{mime};base64,...)", param=param)
    return mime


def _data_url_bytes(url: str, param: str) -> bytes:
    _mime(url, param)
    if "," not in url:
        raise APIError(f"{param}: a data URL needs a comma before its data", param=param)
    try:
        return base64.b64decode(url.split(",", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise APIError(f"{param}: the data URL's base64 is malformed", param=param, code="invalid_image") from None


def _local_bytes(url: str, limits: Limits, allow_dir: Path | None, param: str) -> bytes:
    if allow_dir is None:
        raise APIError(f"{param}: local files are refused (start the server with --allow-dir DIR to serve "
                       "images from DIR)", param=param, code="local_files_disabled")
    raw = unquote(urlparse(url).path) if url.startswith("file:") else url
    root = allow_dir.resolve()
    path = (root / raw).resolve()  # an absolute raw replaces root; ../ and symlinks are resolved away
    if not path.is_relative_to(root):
        raise APIError(f"{param}: {raw!r} lies outside the allowed directory", param=param,
                       code="path_not_allowed")
    if not path.is_file():
        raise APIError(f"{param}: {raw!r}: no such file in the allowed directory", param=param,
                       code="image_not_found")
    if path.stat().st_size > limits.max_body_bytes:
        raise APIError(f"{param}: {raw!r} is {path.stat().st_size} bytes, over the {limits.max_body_bytes}-byte "
                       "limit", param=param, code="image_too_large")
    return path.read_bytes()


def _decode(data: bytes, limits: Limits, param: str, expected: str | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
            if im.format not in ("PNG", "JPEG", "WEBP"):
                raise APIError(f"{param}: a {im.format} image; send PNG, JPEG or WebP", param=param,
                               code="invalid_image")
            if expected and im.format != expected:
                raise APIError(f"{param}: the data URL says {expected} but the data is {im.format}", param=param,
                               code="invalid_image")
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise APIError(f"{param}: the image is {w}x{h} = {w * h} pixels, over the limit of "
                               f"{limits.max_image_pixels} (--max-image-pixels)", param=param,
                               code="image_too_large")
            if w < 1 or h < 1:
                raise APIError(f"{param}: the image is {w}x{h}", param=param, code="invalid_image")
            im.load()
            # as the library opens a file: turned as its EXIF orientation says, then high bit
            # depths scaled and alpha over white
            return to_rgb(ImageOps.exif_transpose(im))
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise APIError(f"{param}: the image is over the limit of {limits.max_image_pixels} pixels "
                       f"(--max-image-pixels); PIL: {e}", param=param, code="image_too_large") from None
    except Exception as e:  # PIL raises many kinds on broken data
        raise APIError(f"{param}: not a readable image ({type(e).__name__}: {e})", param=param,
                       code="invalid_image") from None
