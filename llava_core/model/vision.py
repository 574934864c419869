"""The vision tower: open_clip's VisionTransformer shaped as CLIP ViT-L/14-336 (or smaller).

LLaVA-1.5 reads the patch tokens of the penultimate block (`vision_feature_layer=-2`),
before the final LayerNorm and projection, and drops the CLS token (`default` strategy).
Layer numbering follows transformers' `hidden_states`: index 0 is the embeddings,
index k the output of block k, -1 the last block.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer

from .config import VisionConfig
from .layers import Linear


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, feature_layers: list[int], keep_cls: bool):
        super().__init__()
        self.cfg = cfg
        self.keep_cls = keep_cls
        self.visual = VisionTransformer(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            width=cfg.hidden_size,
            layers=cfg.num_hidden_layers,
            heads=cfg.num_attention_heads,
            mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
            act_layer=QuickGELU if cfg.hidden_act == "quick_gelu" else nn.GELU,
            norm_layer=partial(LayerNorm, eps=cfg.layer_norm_eps),
            output_dim=cfg.hidden_size,
        )
        assert self.visual.transformer.resblocks[0].mlp.c_fc.out_features == cfg.intermediate_size
        self.visual.proj = None  # CLIPVisionModel has no output projection; LLaVA never uses it
        for block in self.visual.transformer.resblocks:  # the MLP's two thirds of the FLOPs: bf16
            for lin in (block.mlp.c_fc, block.mlp.c_proj):  # products in fp32 on CPUs without bf16
                lin.__class__ = Linear  # same parameters and names (llama.Linear is an nn.Linear)
        self.feature_layers = feature_layers
        self.block_indices = [self.block_index(layer) for layer in feature_layers]

    def block_index(self, layer: int) -> int:
        """transformers' hidden_states index -> 0-based open_clip block index."""
        n = self.cfg.num_hidden_layers
        return n + layer if layer < 0 else layer - 1

    def hidden_states(self, pixel_values: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """Tokens (CLS first) after each requested layer: a list of (B, 1+P, D), in request order."""
        blocks = [self.block_index(layer) for layer in layers]
        out = self.visual.forward_intermediates(
            pixel_values, indices=sorted(set(blocks)), stop_early=True, intermediates_only=True,
            output_fmt="NLC", output_extra_tokens=True)
        by_block = {b: torch.cat([cls, patches], dim=1)  # (B, 1+P, D)
                    for b, cls, patches in zip(sorted(set(blocks)), out["image_intermediates_prefix"],
                                               out["image_intermediates"])}
        return [by_block[b] for b in blocks]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: (B, 3, H, W) -> features (B, P or 1+P, D * len(feature_layers))
        pixel_values = pixel_values.to(self.visual.conv1.weight.dtype)
        states = self.hidden_states(pixel_values, self.feature_layers)
        x = torch.cat(states, dim=-1)  # (B, 1+P, D*k)
        return x if self.keep_cls else x[:, 1:]
