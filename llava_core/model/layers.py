"""Layers shared by the vision tower, the projector and the decoder, and the CPU checks they need.

`Linear` is nn.Linear with the same weights and names; only its CPU paths differ (see its
docstring), so a checkpoint loads into it as into nn.Linear.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_kernels

_FAST_BF16: bool | None = None  # cpu_has_fast_bf16's answer, once known


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Without it (AVX2 machines),
    torch's bf16 matmul ran at 19 GFLOP/s here against 118 for fp32. Kept in a plain global, not
    functools.cache: torch.compile reads a global as a constant and traces a cached call."""
    global _FAST_BF16
    if _FAST_BF16 is None:
        _FAST_BF16 = _fast_bf16()
    return _FAST_BF16


def _fast_bf16() -> bool:
    flags = cpu_kernels.cpu_flags()
    if flags is None:
        return True  # not Linux: assume the vendor library is fast
    return "avx512_bf16" in flags or "amx_bf16" in flags


def slow_bf16(x: torch.Tensor) -> bool:
    """Whether x is bf16 on a CPU that cannot multiply bf16 natively: there llava_core computes
    in fp32 (many-token products, attention) or through cpu_kernels (decode's products)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not cpu_has_fast_bf16()


class Linear(nn.Linear):
    """nn.Linear (same weights, same names), except on the CPU:
    - bf16 on a CPU without native bf16: a product over many tokens runs in fp32 (the same
      products, rounded to bf16 once at the end, about 6x faster for a prefill), and a few-token
      one (decode) goes through cpu_kernels' AVX2 kernel, which streams the weights at memory speed;
    - fp32 decode with a large weight (the lm_head): the same kernel read 1.5-1.8x the bytes per
      second of torch's here (benchmarks/README.md); small fp32 weights keep torch's product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if slow_bf16(x):
            if x.shape[:-1].numel() >= 16:
                bias = None if self.bias is None else self.bias.float()
                return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
            if self.weight.dtype == torch.bfloat16 and cpu_kernels.decode_product(x):
                return cpu_kernels.linear(x, self.weight, self.bias)
        elif x.dtype == torch.float32 and self.weight.numel() >= 1 << 22 and cpu_kernels.decode_product(x):
            return cpu_kernels.linear(x, self.weight, self.bias)  # 16 MB and more: the lm_head
        return F.linear(x, self.weight, self.bias)
