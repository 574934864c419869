"""LLaVA-NeXT's config: LLaVA-1.5's plus the any-resolution grid, read from a llava-hf `config.json`
whose model_type is `llava_next`.

A subclass rather than fields on LlavaConfig: the 1.5 path keeps its one fixed count of image
tokens per image (`num_image_tokens`), and only a LlavaNextConfig answers the per-image question
(`image_tokens(height, width)`), so code that assumes a fixed count cannot be handed a NeXT
config by mistake without isinstance saying so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .anyres import image_token_count, num_tiles
from .config import ConfigError, LlavaConfig, parse_projector

# transformers' LlavaNextConfig default (llava-v1.6 at 336 px): 1x2, 2x1, 2x2, 3x1 and 1x3 tiles
NEXT_DEFAULT_PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]


@dataclass
class LlavaNextConfig(LlavaConfig):
    MODEL_TYPE: ClassVar[str] = "llava_next"
    # (height, width) resolutions an image may be tiled at; each side a multiple of the tower's image_size
    image_grid_pinpoints: list = field(default_factory=lambda: list(NEXT_DEFAULT_PINPOINTS))

    def __post_init__(self):
        # transformers writes image_seq_length=576 for every NeXT config and never reads it; the
        # count here depends on each image's size, so there is nothing to cross-check.
        self.image_seq_length = None
        super().__post_init__()
        if self.vision_feature_select_strategy != "default":
            raise ConfigError(f"vision_feature_select_strategy={self.vision_feature_select_strategy!r}: "
                              "llava_next stitches each tile's square patch grid, which a CLS token "
                              "does not fit (transformers' LlavaNext fails on it too); use 'default'")
        family, _ = parse_projector(self.projector.kind)
        if family not in ("linear", "mlpNx_gelu", "identity"):
            raise ConfigError(f"projector {self.projector.kind!r}: llava_next needs one token per patch "
                              "(linear, mlpNx_gelu or identity) to stitch and unpad the tile grid")
        tile = self.vision.image_size
        pins = []
        for p in self.image_grid_pinpoints or []:
            if (not isinstance(p, (list, tuple)) or len(p) != 2 or not all(isinstance(x, int) for x in p)
                    or min(p) < tile or p[0] % tile or p[1] % tile):
                raise ConfigError(f"image_grid_pinpoints entry {p!r}: expected [height, width], each a "
                                  f"multiple of vision_config.image_size {tile}")
            pins.append((p[0], p[1]))
        if not pins:
            raise ConfigError("image_grid_pinpoints is empty: llava_next needs at least one resolution")
        self.image_grid_pinpoints = pins

    def image_tokens(self, image_hw: tuple[int, int]) -> int:
        """Image tokens the model makes of an image of (height, width) pixels."""
        return image_token_count(image_hw, self.image_grid_pinpoints, self.vision.image_size,
                                 self.vision.patch_size)

    def image_tiles(self, image_hw: tuple[int, int]) -> int:
        """Tower-sized tiles of one image (the base image included)."""
        return num_tiles(image_hw, self.image_grid_pinpoints, self.vision.image_size)

    @classmethod
    def _extra_from_hf_dict(cls, d: dict, source: str) -> dict:
        pins = d.get("image_grid_pinpoints")
        return {} if pins is None else {"image_grid_pinpoints": pins}


def read_config(path: str | Path) -> LlavaConfig:
    """A checkpoint folder's (or file's) config.json -> LlavaConfig or LlavaNextConfig, by model_type."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        model_type = json.loads(file.read_text()).get("model_type", "llava") if file.is_file() else "llava"
    except (json.JSONDecodeError, AttributeError):
        model_type = "llava"  # LlavaConfig.from_json reports the file's fault
    known = {LlavaConfig.MODEL_TYPE: LlavaConfig, LlavaNextConfig.MODEL_TYPE: LlavaNextConfig}
    if model_type not in known:
        raise ConfigError(f"{file}: model_type={model_type!r} is not supported ({', '.join(known)})")
    return known[model_type].from_json(path)


__all__ = ["LlavaNextConfig", "NEXT_DEFAULT_PINPOINTS", "read_config"]
