"""A preallocated key/value cache, owned by the caller and shared by all decoder layers.

Buffers are (layers, batch, kv_heads, max_len, head_dim), written in place at slots
[length, length + T). Left padding is tracked per slot in `valid`, and each row's next
rotary position in `next_pos`, so a padded batch and a chat that grows turn by turn
need no bookkeeping outside this class. `truncate(n)` rolls the cache back to n slots
(undo a chat turn, regenerate an answer): slots past n are simply never read again.
A sliding attention window (Mistral) keeps every slot too: llama.build_mask hides the keys
that have left the window, so the cache is the same for windowed and full attention (a
rolling buffer would save memory past the window, at the cost of truncate and of this layout).
"""

from __future__ import annotations

import torch


class ContextOverflowError(ValueError):
    """More tokens than the cache (or the model's context) can hold."""


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # (B, S) real tokens
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) next rotary position
        self.length = 0  # slots filled, the same for every row
        self.max_len = max_len

    @classmethod
    def for_model(cls, cfg, batch: int, max_len: int, dtype: torch.dtype, device) -> "KVCache":
        # cfg: a TextConfig
        return cls(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim,
                   dtype, device)

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def begin(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve slots for T new tokens whose padding mask is (B, T); return their positions (B, T)
        and the key-validity mask over all slots so far (B, length + T)."""
        B, T = mask.shape
        if self.length + T > self.max_len:
            raise ContextOverflowError(f"context overflow: {self.length} tokens in the cache + {T} new "
                                       f"= {self.length + T}, but the cache holds {self.max_len}")
        mask = mask.to(torch.bool)
        self.valid[:, self.length:self.length + T] = mask
        positions = self.next_pos[:, None] + mask.long().cumsum(1) - 1  # (B, T)
        return positions.clamp(min=0), self.valid[:, :self.length + T]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (B, Hkv, T, D) -> all keys/values so far (B, Hkv, length + T, D)
        T = k.shape[2]
        end = self.length + T
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self, T: int):
        """Called once all layers have written their T new slots."""
        self.next_pos += self.valid[:, self.length:self.length + T].sum(1)
        self.length += T

    def truncate(self, length: int):
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll the cache back to {length}: it holds {self.length} tokens")
        self.length = length
        self.next_pos = self.valid[:, :length].sum(1)
