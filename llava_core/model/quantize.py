"""Weight-only int8 for the decoder, applied after loading (as gpt-fast's quantize.py): the
architecture files stay as they are, and `quantize_int8(model.language_model)` swaps the
projections for `Int8Linear` in place.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_kernels


class Int8Linear(nn.Module):
    """Weight-only int8 (optional, `quantize_int8`): weight ~ qweight * scale, one symmetric scale
    per output row (absmax / 127). Decode's few-token products read the int8 weights through
    cpu_kernels, half the bytes of bf16; other products use the weight dequantised to fp32."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)  # (N, K) int8
        self.register_buffer("scale", scale)  # (N,) fp32
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        if lin.bias is not None:
            raise ValueError("Int8Linear: projections with a bias are not supported (the decoder has none)")
        w = lin.weight.detach().float()  # (N, K)
        scale = w.abs().amax(1).clamp(min=1e-12) / 127  # (N,)
        return cls(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.decode_product(x):
            return cpu_kernels.linear(x, self.qweight, scale=self.scale)
        w = self.qweight.float() * self.scale[:, None]  # (N, K) fp32
        return F.linear(x.float(), w).to(x.dtype)


def quantize_int8(decoder: nn.Module, lm_head: bool = True) -> nn.Module:
    """Replace a LlamaDecoder's projections (and the lm_head) by Int8Linear, in place. The embedding
    and the norms keep their dtype; a tied lm_head gets its own int8 copy."""
    for block in decoder.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear.from_linear(child))
    if lm_head:
        decoder.lm_head = Int8Linear.from_linear(decoder.lm_head)
    return decoder
