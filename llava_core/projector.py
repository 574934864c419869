"""Projectors: vision features (B, N, Dv) -> decoder embeddings (B, M, Dt).

LLaVA-1 used one linear layer; LLaVA-1.5 a two-layer MLP with GELU (`mlp2x_gelu`),
stored by llava-hf as `multi_modal_projector.linear_{1,2}`. Each projector is a
plain module registered under a config string; `num_tokens(n)` says how many
tokens it emits for n input patches, so the processor can expand `<image>` to match.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from .config import ConfigError, ProjectorConfig
from .llama import Linear  # nn.Linear with the fp32 path for bf16 on CPUs without native bf16


class MLPProjector(nn.Module):
    """`linear` (depth 1) and `mlp{depth}x_gelu`: linear_1 -> GELU -> linear_2 -> ... ."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, bias: bool = True):
        super().__init__()
        self.depth = depth
        for i in range(1, depth + 1):
            setattr(self, f"linear_{i}", Linear(in_dim if i == 1 else out_dim, out_dim, bias=bias))
        self.act = nn.GELU()

    def num_tokens(self, n_patches: int) -> int:
        return n_patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, N, Dv) -> (B, N, Dt)
        for i in range(1, self.depth + 1):
            if i > 1:
                x = self.act(x)
            x = getattr(self, f"linear_{i}")(x)
        return x


def build_projector(cfg: ProjectorConfig, in_dim: int, out_dim: int) -> nn.Module:
    if cfg.kind == "linear":
        return MLPProjector(in_dim, out_dim, depth=1, bias=cfg.bias)
    m = re.fullmatch(r"mlp(\d+)x_gelu", cfg.kind)
    if m and int(m.group(1)) >= 1:
        return MLPProjector(in_dim, out_dim, depth=int(m.group(1)), bias=cfg.bias)
    raise ConfigError(f"projector {cfg.kind!r} is unknown; known: {', '.join(PROJECTORS)}")


# Names a config may use (mlpNx_gelu accepts any N >= 1).
PROJECTORS = ("linear", "mlp2x_gelu", "mlpNx_gelu")
