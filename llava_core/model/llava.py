"""LLaVA assembled: vision tower -> projector -> image features spliced into the token stream -> decoder.

Liu et al. 2023 ("Visual Instruction Tuning", "Improved Baselines with Visual Instruction
Tuning"). Each `<image>` placeholder in the prompt has already been expanded by the
processor into `num_image_tokens` copies of `image_token_index`; the projected patch
features replace those embeddings one for one, in order of appearance.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import LlavaConfig
from .kv_cache import KVCache
from .llama import LlamaDecoder
from .projector import build_projector
from .vision import VisionTower


class ImageTokenMismatch(ValueError):
    """The prompt's image tokens and the images' features do not pair up one for one."""


def vision_tower_for(cfg: LlavaConfig) -> VisionTower:
    """A fresh vision tower as `cfg` describes it (its feature layers; CLS kept for "full")."""
    return VisionTower(cfg.vision, cfg.feature_layers, keep_cls=cfg.vision_feature_select_strategy == "full")


def projector_for(cfg: LlavaConfig) -> nn.Module:
    """A fresh projector of `cfg`'s kind, from its vision features to its text width, sized for its
    vision tokens per image."""
    return build_projector(cfg.projector, cfg.vision_feature_dim, cfg.text.hidden_size, cfg.num_vision_tokens)


class LlavaModel(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = vision_tower_for(cfg)
        self.projector = projector_for(cfg)
        self.language_model = LlamaDecoder(cfg.text)

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: (N, 3, H, W) -> (N, M, C), M = num_image_tokens
        return self.projector(self.vision_tower(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, C) with image features placed at the image-token positions."""
        is_image = input_ids == self.cfg.image_token_index  # (B, T)
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, C)
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values)
        n_tokens = int(is_image.sum())
        n_feats = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_feats:
            n_images = 0 if image_features is None else image_features.shape[0]
            raise ImageTokenMismatch(
                f"the prompt holds {n_tokens} image tokens (id {self.cfg.image_token_index}) but "
                f"{n_images} image(s) give {n_feats} features ({self.cfg.num_image_tokens} per image); "
                "expand each <image> with the processor, one per image")
        if n_feats:
            feats = image_features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)  # (N*M, C)
            embeds = embeds.masked_scatter(is_image[..., None], feats)
        return embeds

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)  # (B, T, V)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T), pixel_values (N, 3, H, W) for the N images in reading order,
        attention_mask (B, T) with 0 on left padding -> logits (B, T, V)."""
        embeds = self.embed(input_ids, pixel_values)
        hidden = self.language_model(embeds, attention_mask=attention_mask, cache=cache)
        return self.logits(hidden)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        max_len = max_len or self.cfg.text.max_position_embeddings
        return KVCache.for_model(self.cfg.text, batch, max_len, self.dtype, self.device)
