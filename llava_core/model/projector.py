"""Projectors: vision features (B, N, Dv) -> decoder embeddings (B, M, Dt).

LLaVA-1 used one linear layer; LLaVA-1.5 a two-layer MLP with GELU (`mlp2x_gelu`). Each
projector is a plain module chosen by the config string `ProjectorConfig.kind`; its
`num_tokens(N)` says how many tokens it emits for N vision tokens, and
`config.projector_tokens(kind, N)` says the same without building anything, which is how
`LlavaConfig.num_image_tokens` (and so the processor's `<image>` expansion) follows the projector.

N vision tokens of width Dv (`vision_feature_dim`) in, M tokens of width Dt (text hidden size)
out; the last two columns for ViT-L/14-336 into a 4096-d decoder (N = 576, Dv = 1024, Dt = 4096):

| kind (config string)    | M                | parameters, bias on                        | M     | params  | reference |
|-------------------------|------------------|--------------------------------------------|-------|---------|-----------|
| `linear`                | N                | Dv·Dt + Dt                                 | 576   | 4.2M    | LLaVA-1 |
| `mlp{L}x_gelu`          | N                | Dv·Dt + (L-1)·Dt² + L·Dt                   | 576   | 21.0M (L=2) | LLaVA-1.5 |
| `mlp{L}x_gelu_pos`      | N                | mlp{L}x_gelu's + 2·√N·Dt                   | 576   | 21.2M (L=2) | LLaVA-1.5 + learned row and column embeddings |
| `mlp{L}x_gelu_cols`     | 2N               | mlp{L}x_gelu's                             | 1152  | 21.0M (L=2) | LLaVA-1.5, its tokens again in column-major order |
| `mlp{L}x_gelu_newline`  | √N·(√N+1)        | mlp{L}x_gelu's + Dt                        | 600   | 21.0M (L=2) | LLaVA-1.5 + LLaVA-NeXT's learned token after each row |
| `identity`              | N                | 0 (needs Dv == Dt)                         | -     | -       | - |
| `avgpool{K}_mlp2x_gelu` | (√N/K)²          | Dv·Dt + Dt² + 2·Dt                         | 144   | 21.0M (K=2) | token-pooling baseline |
| `shuffle{K}_mlp2x_gelu` | (√N/K)²          | K²·Dv·Dt + Dt² + 2·Dt                      | 144   | 33.6M (K=2) | space-to-depth (pixel shuffle), as Idefics3 and SmolVLM |
| `cabstractor[M]`        | M, else (√N/2)²  | 8·Dv² + 60·Dv + Dv·Dt + Dt² + 2·Dt         | 144   | 29.4M   | Honeybee C-Abstractor (Cha et al. 2024) |
| `ldp`                   | (√N/2)²          | Dv·Dt + 3·Dt² + 28·Dt                      | 144   | 54.6M   | MobileVLM LDP (Chu et al. 2023) |
| `resampler{Q}`          | Q                | Q·Dv + 12·Dv² + 17·Dv + Dv·Dt + Dt² + 2·Dt | 64    | 33.6M (Q=64) | Perceiver resampler (Alayrac et al. 2022) |

The grid projectors (avgpool, shuffle, cabstractor, ldp, mlpNx_gelu_pos, _cols, _newline) fold the N tokens into a
√N x √N grid, so N must be a square (a ConfigError names N otherwise) and CLS must be gone: they refuse
`vision_feature_select_strategy="full"` (ConfigError) rather than drop CLS behind the caller's
back. The resampler and the per-token projectors take CLS like any other token.

Checkpoints. llava-hf's `LlavaMultiModalProjector` is `mlp2x_gelu`, stored as
`multi_modal_projector.linear_{1,2}.{weight,bias}`; every projector here keeps that hub prefix
and stores its own module names under it (`multi_modal_projector.` + the names below), so the
loader's and the exporter's single projector rule covers them all. config.json carries
`llava_core_projector: "<kind>"` for any kind but `mlp2x_gelu` (a field transformers does not
read: such a checkpoint loads in llava_core only).

    linear, mlpNx_gelu      linear_{1..N}.{weight,bias}
    mlpNx_gelu_pos          linear_{1..N}.*, row_embed, col_embed (each (√N, Dt))
    mlpNx_gelu_cols         linear_{1..N}.* (mlpNx_gelu's keys: its checkpoints load into either)
    mlpNx_gelu_newline      linear_{1..N}.*, image_newline (Dt)
    identity                (none)
    avgpoolK_mlp2x_gelu     linear_{1,2}.*
    shuffleK_mlp2x_gelu     linear_{1,2}.* (linear_1 is K²·Dv wide: channels of patch (0,0), (0,1), ...)
    cabstractor[M]          stage_{1,2}.{0,1}.{conv1,conv2,conv3,norm1,norm2,norm3}.*, linear_{1,2}.*
    ldp                     linear_{1,2}.*, block_{1,2}.{depthwise,pointwise,norm1,norm2}.*
    resamplerQ              query, norm_q.*, norm_kv.*, {q,k,v,o}_proj.*, norm_ff.*, ff_{1,2}.*,
                            norm_out.*, linear_{1,2}.*
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PROJECTORS, ConfigError, ProjectorConfig, grid_side, parse_projector, projector_tokens
from .layers import Linear  # nn.Linear with the fp32 path for bf16 on CPUs without native bf16

__all__ = ["PROJECTORS", "build_projector", "MLPProjector", "PositionalMLPProjector", "ColumnsMLPProjector",
           "NewlineMLPProjector", "IdentityProjector",
           "AvgPoolProjector", "ShuffleProjector",
           "CAbstractor", "LDPProjector", "ResamplerProjector"]


def to_grid(x: torch.Tensor, kind: str) -> torch.Tensor:
    # x: (B, N, D) in row-major patch order -> (B, D, s, s), s = √N
    B, N, D = x.shape
    s = grid_side(N, kind)
    return x.transpose(1, 2).reshape(B, D, s, s)


def from_grid(x: torch.Tensor) -> torch.Tensor:
    # x: (B, D, h, w) -> (B, h*w, D), row-major
    return x.flatten(2).transpose(1, 2)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (no batch statistics, unlike BatchNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, H, W, C) -> normalise C -> (B, C, H, W)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


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


class GridMLPProjector(MLPProjector):
    """An `mlp{depth}x_gelu` that knows its square patch grid (side s): the base of the projectors
    that add something by row and column. forward checks the grid and runs the MLP."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, depth: int, n_tokens: int, bias: bool = True):
        super().__init__(in_dim, out_dim, depth=depth, bias=bias)
        self.kind, self.side = kind, grid_side(n_tokens, kind)

    def num_tokens(self, n_patches: int) -> int:
        return projector_tokens(self.kind, n_patches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, s*s, Dv) in row-major patch order -> (B, s*s, Dt)
        if x.shape[1] != self.side ** 2:
            raise ConfigError(f"projector {self.kind!r} was built for a {self.side}x{self.side} patch grid, "
                              f"got {x.shape[1]} tokens per image")
        return super().forward(x)


class PositionalMLPProjector(GridMLPProjector):
    """`mlp{depth}x_gelu_pos`: LLaVA-1.5's MLP, then a learned embedding of each token's row plus one
    of its column, added to its output. Rotary positions tell the decoder a token's place in the
    sequence, from which a row is easy to read and a column is not; this puts both in the
    token's content. Both tables start at zero, so at initialisation it is `mlp{depth}x_gelu`."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, depth: int, n_tokens: int, bias: bool = True):
        super().__init__(kind, in_dim, out_dim, depth=depth, n_tokens=n_tokens, bias=bias)
        self.row_embed = nn.Parameter(torch.zeros(self.side, out_dim))  # (s, Dt)
        self.col_embed = nn.Parameter(torch.zeros(self.side, out_dim))  # (s, Dt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # (B, s*s, Dt)
        where = self.row_embed[:, None, :] + self.col_embed[None, :, :]  # (s, s, Dt): [r, c] = row r + col c
        return y + where.reshape(1, self.side ** 2, -1).to(y.dtype)


class ColumnsMLPProjector(GridMLPProjector):
    """`mlp{depth}x_gelu_cols`: LLaVA-1.5's MLP, its N tokens in row-major order and then the same
    tokens again in column-major order (2N tokens). The decoder reads a token's row from its place
    in the row-major run (`python -m llava_core.token_order`) and never learnt to read a column from
    content; in the column-major run a column is a block of neighbouring places, as a row is in the
    first. No parameters of its own: mlp{depth}x_gelu's weights load into it unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # (B, s*s, Dt)
        by_column = y.unflatten(1, (self.side, self.side)).transpose(1, 2).flatten(1, 2)  # [c*s + r] = y[r*s + c]
        return torch.cat([y, by_column], dim=1)  # (B, 2*s*s, Dt)


class NewlineMLPProjector(GridMLPProjector):
    """`mlp{depth}x_gelu_newline`: LLaVA-1.5's MLP, then one learned vector after each row of the
    grid (s rows of s + 1 tokens), as LLaVA-NeXT ends each row of its stitched grid with
    `image_newline`. A token's column is then its distance from the last newline before it, a
    relative place such as rotary positions carry, where without it the column is its place
    modulo s. The vector starts as LLaVA-NeXT's: normal, std 1/√Dt."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, depth: int, n_tokens: int, bias: bool = True):
        super().__init__(kind, in_dim, out_dim, depth=depth, n_tokens=n_tokens, bias=bias)
        self.image_newline = nn.Parameter(torch.randn(out_dim) / out_dim ** 0.5)  # (Dt,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # (B, s*s, Dt)
        grid = y.unflatten(1, (self.side, self.side))  # (B, s, s, Dt)
        newline = self.image_newline.to(y.dtype).expand(y.shape[0], self.side, 1, -1)  # (B, s, 1, Dt)
        return torch.cat([grid, newline], dim=2).flatten(1, 2)  # (B, s*(s+1), Dt)


class IdentityProjector(nn.Module):
    """`identity`: the vision features are the embeddings (Dv == Dt)."""

    def num_tokens(self, n_patches: int) -> int:
        return n_patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x  # (B, N, D)


class AvgPoolProjector(MLPProjector):
    """`avgpool{k}_mlp2x_gelu`: k x k average pooling of the patch grid, then LLaVA-1.5's MLP."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, k: int, bias: bool = True):
        super().__init__(in_dim, out_dim, depth=2, bias=bias)
        self.kind, self.k = kind, k

    def num_tokens(self, n_patches: int) -> int:
        return projector_tokens(self.kind, n_patches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.num_tokens(x.shape[1])  # a grid the pool does not divide is an error, not a silent crop
        g = F.avg_pool2d(to_grid(x, self.kind), self.k)  # (B, Dv, s, s) -> (B, Dv, s/k, s/k)
        return super().forward(from_grid(g))  # (B, (s/k)², Dv) -> (B, (s/k)², Dt)


class ShuffleProjector(MLPProjector):
    """`shuffle{k}_mlp2x_gelu`: each k x k block of neighbouring patches becomes one token whose
    channels are the k² patches' features side by side (row-major within the block), then
    LLaVA-1.5's MLP. Unlike pooling it keeps every feature: a tower at finer patches keeps its
    detail at the decoder's token count (Idefics3, SmolVLM and nanoVLM's pixel shuffle)."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, k: int, bias: bool = True):
        super().__init__(in_dim * k * k, out_dim, depth=2, bias=bias)
        self.kind, self.k = kind, k

    def num_tokens(self, n_patches: int) -> int:
        return projector_tokens(self.kind, n_patches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.num_tokens(x.shape[1])  # a grid k does not divide is an error, not a silent crop
        B, N, D = x.shape
        k, s = self.k, grid_side(N, self.kind)
        x = x.reshape(B, s // k, k, s // k, k, D).permute(0, 1, 3, 2, 4, 5)  # (B, s/k, s/k, k, k, D)
        return super().forward(x.reshape(B, (s // k) ** 2, k * k * D))  # (B, (s/k)², k²·Dv) -> (..., Dt)


class ConvResBlock(nn.Module):
    """1x1 conv -> 3x3 depthwise conv -> 1x1 conv, LayerNorm after each and SiLU between, plus the
    input: a light residual bottleneck in the spirit of the RegNet blocks Honeybee uses."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=False)
        self.norm1 = LayerNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.norm2 = LayerNorm2d(dim)
        self.conv3 = nn.Conv2d(dim, dim, 1, bias=False)
        self.norm3 = LayerNorm2d(dim)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> (B, C, H, W)
        y = self.act(self.norm1(self.conv1(x)))
        y = self.act(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return self.act(x + y)


# Cha et al. 2024, "Honeybee: Locality-enhanced Projector for Multimodal LLM" (C-Abstractor).
class CAbstractor(nn.Module):
    """`cabstractor[M]`: residual conv blocks on the patch grid, adaptive average pooling to an
    √M x √M grid (default: half the grid per side), more conv blocks, then mlp2x_gelu to Dt.
    Simplified from the paper: no learned position embedding, no squeeze-excite."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, depth: int = 2, bias: bool = True):
        super().__init__()
        self.kind = kind
        self.stage_1 = nn.Sequential(*[ConvResBlock(in_dim) for _ in range(depth)])
        self.stage_2 = nn.Sequential(*[ConvResBlock(in_dim) for _ in range(depth)])
        self.linear_1 = Linear(in_dim, out_dim, bias=bias)
        self.act = nn.GELU()
        self.linear_2 = Linear(out_dim, out_dim, bias=bias)

    def num_tokens(self, n_patches: int) -> int:
        return projector_tokens(self.kind, n_patches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = grid_side(self.num_tokens(x.shape[1]), self.kind)  # output grid side
        g = self.stage_1(to_grid(x, self.kind))  # (B, Dv, s, s)
        g = self.stage_2(F.adaptive_avg_pool2d(g, m))  # (B, Dv, m, m)
        return self.linear_2(self.act(self.linear_1(from_grid(g))))  # (B, m², Dv) -> (B, m², Dt)


class DepthwiseSeparableBlock(nn.Module):
    """3x3 depthwise conv (stride 1 or 2) -> LayerNorm -> Hardswish -> 1x1 conv -> LayerNorm, plus
    the input at stride 1: MobileNetV3's inverted residual at expansion 1, without squeeze-excite,
    with LayerNorm in place of BatchNorm."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.stride = stride
        self.depthwise = nn.Conv2d(dim, dim, 3, stride=stride, padding=1, groups=dim, bias=False)
        self.norm1 = LayerNorm2d(dim)
        self.act = nn.Hardswish()
        self.pointwise = nn.Conv2d(dim, dim, 1, bias=False)
        self.norm2 = LayerNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> (B, C, H/stride, W/stride)
        y = self.norm2(self.pointwise(self.act(self.norm1(self.depthwise(x)))))
        return x + y if self.stride == 1 else y


# Chu et al. 2023, "MobileVLM: A Fast, Strong and Open Vision Language Assistant" (LDP).
class LDPProjector(nn.Module):
    """`ldp`: linear_1 -> GELU -> linear_2 to the text width, then a stride-1 and a stride-2
    depthwise-separable block on the grid: a quarter of the patches."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.kind = kind
        self.linear_1 = Linear(in_dim, out_dim, bias=bias)
        self.act = nn.GELU()
        self.linear_2 = Linear(out_dim, out_dim, bias=bias)
        self.block_1 = DepthwiseSeparableBlock(out_dim, stride=1)
        self.block_2 = DepthwiseSeparableBlock(out_dim, stride=2)

    def num_tokens(self, n_patches: int) -> int:
        return projector_tokens(self.kind, n_patches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.num_tokens(x.shape[1])  # an odd grid side is an error, not a rounded-up grid
        x = self.linear_2(self.act(self.linear_1(x)))  # (B, N, Dv) -> (B, N, Dt)
        g = self.block_2(self.block_1(to_grid(x, self.kind)))  # (B, Dt, s, s) -> (B, Dt, s/2, s/2)
        return from_grid(g)  # (B, (s/2)², Dt)


# Alayrac et al. 2022 (Flamingo's Perceiver resampler); Q-Former-like learned queries.
class ResamplerProjector(nn.Module):
    """`resampler{Q}`: Q learned queries cross-attend to the N vision tokens in one pre-norm layer
    (attention + feed-forward, both residual) at the vision width, then mlp2x_gelu to Dt.
    Any N works, CLS included; the features carry the tower's position information."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, queries: int, bias: bool = True):
        super().__init__()
        self.kind = kind
        self.heads = in_dim // 64 if in_dim % 64 == 0 else 1  # 64-wide heads where the width allows
        self.query = nn.Parameter(torch.randn(queries, in_dim) * 0.02)  # (Q, Dv)
        self.norm_q = nn.LayerNorm(in_dim)
        self.norm_kv = nn.LayerNorm(in_dim)
        self.q_proj = Linear(in_dim, in_dim, bias=bias)
        self.k_proj = Linear(in_dim, in_dim, bias=bias)
        self.v_proj = Linear(in_dim, in_dim, bias=bias)
        self.o_proj = Linear(in_dim, in_dim, bias=bias)
        self.norm_ff = nn.LayerNorm(in_dim)
        self.ff_1 = Linear(in_dim, 4 * in_dim, bias=bias)
        self.ff_2 = Linear(4 * in_dim, in_dim, bias=bias)
        self.norm_out = nn.LayerNorm(in_dim)
        self.linear_1 = Linear(in_dim, out_dim, bias=bias)
        self.act = nn.GELU()
        self.linear_2 = Linear(out_dim, out_dim, bias=bias)

    def num_tokens(self, n_patches: int) -> int:
        return self.query.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        Q, h = self.query.shape[0], self.heads
        q = self.query.expand(B, Q, D)  # (B, Q, Dv)
        kv = self.norm_kv(x)  # (B, N, Dv)
        qh = self.q_proj(self.norm_q(q)).view(B, Q, h, D // h).transpose(1, 2)  # (B, h, Q, hd)
        kh = self.k_proj(kv).view(B, N, h, D // h).transpose(1, 2)  # (B, h, N, hd)
        vh = self.v_proj(kv).view(B, N, h, D // h).transpose(1, 2)  # (B, h, N, hd)
        a = F.scaled_dot_product_attention(qh, kh, vh)  # (B, h, Q, hd), every query sees every token
        q = q + self.o_proj(a.transpose(1, 2).reshape(B, Q, D))  # (B, Q, Dv)
        q = q + self.ff_2(self.act(self.ff_1(self.norm_ff(q))))  # (B, Q, Dv)
        return self.linear_2(self.act(self.linear_1(self.norm_out(q))))  # (B, Q, Dt)


def build_projector(cfg: ProjectorConfig, in_dim: int, out_dim: int, n_tokens: int | None = None) -> nn.Module:
    """The projector `cfg.kind` names, from in_dim-wide vision features to out_dim-wide embeddings;
    n_tokens: vision tokens per image (LlavaConfig.num_vision_tokens), which `mlpNx_gelu_pos` needs."""
    kind = cfg.kind
    family, n = parse_projector(kind)  # an unknown name: ConfigError listing the known ones
    if family == "linear":
        return MLPProjector(in_dim, out_dim, depth=1, bias=cfg.bias)
    if family == "mlpNx_gelu":
        return MLPProjector(in_dim, out_dim, depth=n, bias=cfg.bias)
    grid_mlp = {"mlpNx_gelu_pos": PositionalMLPProjector, "mlpNx_gelu_cols": ColumnsMLPProjector,
                "mlpNx_gelu_newline": NewlineMLPProjector}
    if family in grid_mlp:
        if n_tokens is None:
            raise ConfigError(f"projector {kind!r} needs the vision tokens per image (n_tokens) to know its grid")
        return grid_mlp[family](kind, in_dim, out_dim, depth=n, n_tokens=n_tokens, bias=cfg.bias)
    if family == "identity":
        if in_dim != out_dim:
            raise ConfigError(f"projector 'identity' needs equal widths, but the vision features are "
                              f"{in_dim}-d and the text hidden size is {out_dim}")
        return IdentityProjector()
    if family == "avgpoolK_mlp2x_gelu":
        return AvgPoolProjector(kind, in_dim, out_dim, k=n, bias=cfg.bias)
    if family == "shuffleK_mlp2x_gelu":
        return ShuffleProjector(kind, in_dim, out_dim, k=n, bias=cfg.bias)
    if family == "cabstractor[M]":
        return CAbstractor(kind, in_dim, out_dim, bias=cfg.bias)
    if family == "ldp":
        return LDPProjector(kind, in_dim, out_dim, bias=cfg.bias)
    if family == "resamplerQ":
        return ResamplerProjector(kind, in_dim, out_dim, queries=n, bias=cfg.bias)
    raise AssertionError(f"projector family {family!r} is in config.PROJECTORS but not built here")
