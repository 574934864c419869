"""One decode step with fixed shapes, replayed as a CUDA graph on a GPU.

A decode step of a 7B model reads 13 GB of weights, about 3.5 ms on an H200, but launching its
~700 kernels one by one from Python takes longer: eager decode ran at 21% of the bandwidth bound
there (benchmarks/README.md). A CUDA graph records the kernels once and replays them in one call.
Every shape must then stay fixed from step to step, so the step below attends over all
`max_len` slots of the cache with a mask (slots not written yet are masked out) and writes its
key and value at a slot index held in a tensor, not a Python int.

`static_step` is also plain PyTorch that runs anywhere (the tests compare it with the eager
step on the CPU); `GraphedStep` captures it on CUDA.
"""

from __future__ import annotations

import torch

from ..model.kv_cache import ContextOverflowError, KVCache
from ..model.llama import within_window


class _SlotWriter:
    """What the attention layers see of the cache inside a fixed-shape step."""

    def __init__(self, cache: KVCache, slot: torch.Tensor):
        self.cache, self.slot = cache, slot  # slot: (1,) long

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (B, Hkv, 1, D) written at `slot` -> every slot (B, Hkv, max_len, D)
        self.cache.k[layer].index_copy_(2, self.slot, k)
        self.cache.v[layer].index_copy_(2, self.slot, v)
        return self.cache.k[layer], self.cache.v[layer]


def static_step(model, tokens: torch.Tensor, slot: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """tokens (B,) at cache slot `slot` (1,) -> logits (B, V). Does not advance the cache's
    counters (the caller does), so running it twice with the same inputs changes nothing."""
    lm = model.language_model
    cache.valid.index_fill_(1, slot, True)  # decode tokens are never padding
    k_slot = torch.arange(cache.max_len, device=slot.device)  # (S,)
    mask = (cache.valid & (k_slot <= slot))[:, None, None, :]  # (B, 1, 1, S): written, not future
    if lm.cfg.sliding_window is not None:  # Mistral: only keys within the window of this position
        k_pos = cache.valid.long().cumsum(1) - 1  # (B, S)
        mask = mask & within_window(cache.next_pos[:, None], k_pos, lm.cfg.sliding_window)
    cos, sin = lm.rotary(cache.next_pos[:, None], model.dtype)  # positions (B, 1)
    x = lm.embed_tokens(tokens[:, None])  # (B, 1, C)
    writer = _SlotWriter(cache, slot)
    for block in lm.layers:
        x = block(x, cos, sin, mask, writer)
    return model.logits(lm.norm(x)[:, -1])  # (B, V)


class GraphedStep:
    """decode_one's drop-in for one cache on CUDA: captured on the first call, replayed after."""

    def __init__(self, model, cache: KVCache):
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(cache.batch, dtype=torch.long, device=cache.k.device)  # (B,)
        self.slot = torch.zeros(1, dtype=torch.long, device=cache.k.device)  # (1,)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up runs (kernels choose their algorithms here)
            for _ in range(2):
                static_step(self.model, self.tokens, self.slot, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = static_step(self.model, self.tokens, self.slot, self.cache)

    def __call__(self, model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        assert model is self.model and cache is self.cache
        if cache.length >= cache.max_len:
            raise ContextOverflowError(f"context overflow: the cache holds {cache.max_len} tokens and is full")
        self.tokens.copy_(tokens)
        self.slot.fill_(cache.length)
        if self.graph is None:
            self._capture()  # the warm-up has already done this step's work; replaying redoes it
        self.graph.replay()
        cache.next_pos += 1
        cache.length += 1
        return self.logits.clone()  # (B, V): the graph overwrites its output on the next replay
