"""LLaVA-NeXT (llava-v1.6) assembled: LLaVA-1.5's parts, fed tiles of any-resolution images.

Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge". The processor
(processor_next.py) turns each image into tower-sized tiles: the whole image squashed to one
tile (the base), then the tiles of its best-fit resolution, row by row (anyres.py). Here every
tile goes through the same vision tower and projector as LLaVA-1.5; the base tile's g x g
features come first, then the tiles' features are stitched into one (rows*g, cols*g) grid,
cut back to the image's aspect ratio, and written out row by row, each row followed by the
learned `image_newline` vector. Those features replace the prompt's image tokens in order, as
in LLaVA-1.5; only their number differs from image to image.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .anyres import tile_grid, unpad_box
from .kv_cache import KVCache
from .llava import ImageTokenMismatch, LlavaModel
from .next_config import LlavaNextConfig


class LlavaNextModel(LlavaModel):
    def __init__(self, cfg: LlavaNextConfig):
        super().__init__(cfg)
        self.image_newline = nn.Parameter(torch.zeros(cfg.text.hidden_size))  # (C,), filled by the loader

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values (N, P, 3, S, S): each image's tiles, base first, zero tiles padding the
        batch to P; image_sizes (N, 2) (height, width) -> per image its features (M_i, C)."""
        sizes = [tuple(int(x) for x in hw) for hw in image_sizes]
        counts = [self.cfg.image_tiles(hw) for hw in sizes]
        if pixel_values.dim() != 5 or len(sizes) != pixel_values.shape[0] or max(counts) > pixel_values.shape[1]:
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} and image_sizes {sizes}: expected "
                             f"(N, P, 3, H, W) with one (height, width) per image and P >= {max(counts, default=0)} "
                             f"tiles ({counts} per image)")
        tiles = torch.cat([px[:n] for px, n in zip(pixel_values, counts)])  # (sum n, 3, S, S)
        feats = self.projector(self.vision_tower(tiles)).split(counts)  # per image (n, g*g, C)
        return [self._arrange(f, hw) for f, hw in zip(feats, sizes)]

    def _arrange(self, feats: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        # feats (1 + R*Q, g*g, C): the base tile, then R x Q tiles row by row -> (M, C)
        g = self.cfg.vision.grid
        R, Q = tile_grid(image_hw, self.cfg.image_grid_pinpoints, self.cfg.vision.image_size)
        C = feats.shape[-1]
        grid = feats[1:].view(R, Q, g, g, C)  # (tile row, tile col, patch row, patch col, C)
        grid = grid.permute(0, 2, 1, 3, 4).reshape(R * g, Q * g, C)  # (R*g, Q*g, C): one patch grid
        r0, r1, c0, c1 = unpad_box(image_hw, (R * g, Q * g))
        grid = grid[r0:r1, c0:c1]  # (rows, cols, C): the image without its padding
        newline = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, C)  # (rows, 1, C)
        rows = torch.cat([grid, newline], dim=1)  # (rows, cols + 1, C)
        return torch.cat([feats[0], rows.reshape(-1, C)])  # (g*g + rows*(cols+1), C)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_features: list[torch.Tensor] | None = None,
              image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, C) with each image's features at its image tokens, in order."""
        is_image = input_ids == self.cfg.image_token_index  # (B, T)
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, C)
        if image_features is None and pixel_values is not None:
            if image_sizes is None:
                raise ValueError("llava_next needs image_sizes (N, 2) with pixel_values: each image's "
                                 "(height, width) decides its tiling and token count")
            image_features = self.image_features(pixel_values, image_sizes)
        counts = [f.shape[0] for f in image_features or []]
        n_tokens = int(is_image.sum())
        if n_tokens != sum(counts):
            raise ImageTokenMismatch(
                f"the prompt holds {n_tokens} image tokens (id {self.cfg.image_token_index}) but "
                f"{len(counts)} image(s) give {sum(counts)} features ({counts} per image); expand each "
                "<image> with the llava_next processor, which counts tokens from each image's size")
        if counts:
            feats = torch.cat(image_features).to(embeds.dtype)  # (sum M_i, C)
            embeds = embeds.masked_scatter(is_image[..., None], feats)
        return embeds

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), pixel_values (N, P, 3, S, S) and image_sizes (N, 2) for the N images
        in reading order, attention_mask (B, T) with 0 on left padding -> logits (B, T, V)."""
        embeds = self.embed(input_ids, pixel_values, image_sizes=image_sizes)
        hidden = self.language_model(embeds, attention_mask=attention_mask, cache=cache)
        return self.logits(hidden)


__all__ = ["LlavaNextModel"]
