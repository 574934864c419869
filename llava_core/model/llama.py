"""The LLaMA decoder (Vicuna, TinyLlama, SmolLM2 ...), written out.

Follows Touvron et al. 2023 and keeps transformers' weight layout: separate q/k/v
projections and the `rotate_half` rotary convention, so a llava-hf checkpoint loads
by copying tensors. Attention is grouped-query through `scaled_dot_product_attention`.
The KV cache is owned by the caller (see kv_cache.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_kernels
from .config import TextConfig
from .kv_cache import KVCache
from .layers import Linear, slow_bf16
from .quantize import Int8Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: TextConfig) -> torch.Tensor:
    """Inverse frequencies (D/2,), with linear or llama3 scaling applied."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv_freq / s["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, T, D); cos, sin (B, 1, T, D) from Rotary
    return x * cos + rotate_half(x) * sin


class Rotary(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (B, T) -> cos, sin: (B, 1, T, D), computed in fp32 then cast
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, D), S = cached + T
        dtype = q.dtype
        if slow_bf16(q):
            q, k, v = q.float(), k.float(), v.float()  # torch's bf16 attention took 2.4 ms per layer
            # for one query over 620 keys on an AVX2 CPU; in fp32 it is a small fraction of that
        # mask None: plain causal with no padding and no cached prefix
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv != self.n_heads)  # (B, H, T, D)
        y = y.to(dtype).transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def decode_tensors(self) -> tuple[list, list] | None:
        """The tensors cpu_kernels.decode_layers reads for this block (both norms' weights and the 7
        projections' weights, in its order; int8 row scales or []), when the block is plain: no
        adapters (LoRA replaces projections), no hooks (probes) inside, and projections all
        Linear or all Int8Linear. None otherwise: then the block runs torch's operations.
        (Reads the module dicts directly: this runs for every block at every decode step.)"""
        mods = self._modules
        ln1, att, ln2, mlp = (mods[n] for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"))
        if type(att) is not Attention or type(mlp) is not MLP or type(ln1) is not RMSNorm or type(ln2) is not RMSNorm:
            return None
        projections = [att._modules[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [mlp._modules[n] for n in ("gate_proj", "up_proj", "down_proj")]
        for m in (ln1, att, ln2, mlp, *projections):
            if m._forward_hooks or m._forward_pre_hooks:
                return None
        kinds = {type(m) for m in projections}
        if kinds == {Linear}:
            ws, scales = [m._parameters["weight"] for m in projections], []
        elif kinds == {Int8Linear}:
            ws, scales = [m._buffers["qweight"] for m in projections], [m._buffers["scale"] for m in projections]
        else:
            return None
        return [ln1._parameters["weight"], *ws[:4], ln2._parameters["weight"], *ws[4:]], scales

    def forward(self, x, cos, sin, mask, cache):
        if cpu_kernels.use_decode_step(x, cache) and (tensors := self.decode_tensors()) is not None:
            # CPU decode: the same sums in one call
            return cpu_kernels.decode_layers(x, *tensors, cos, sin, cache, self.self_attn, self.input_layernorm.eps, mask)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_mask(valid: torch.Tensor, T: int, window: int | None = None) -> torch.Tensor:
    """Boolean mask (B, 1, T, S) for T new queries in the last T of S slots.

    Query t (slot S-T+t) may read slot j when j <= S-T+t (causal) and slot j holds a
    real token (valid[b, j]). A query always reads its own slot, so the rows of left
    padding attend to something and stay finite; their outputs are never used.
    With a sliding window (Mistral), a query at position p reads only keys at positions
    in (p - window, p]; positions count real tokens, so padding does not use up the window.
    """
    S = valid.shape[1]
    q_slot = torch.arange(S - T, S, device=valid.device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=valid.device)[None, :]  # (1, S)
    causal = k_slot <= q_slot  # (T, S)
    allowed = causal[None] & valid[:, None, :]  # (B, T, S)
    if window is not None:
        pos = valid.long().cumsum(1) - 1  # (B, S): each real slot's rotary position
        allowed = allowed & within_window(pos[:, S - T:], pos, window)[:, 0]
    return (allowed | (k_slot == q_slot)[None])[:, None]  # (B, 1, T, S)


def within_window(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """q_pos (B, T), k_pos (B, S) -> (B, 1, T, S): key position in (query position - window, ...]."""
    return (k_pos[:, None, :] > q_pos[:, :, None] - window)[:, None]


def segment_mask(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment ids (B, T) -> boolean mask (B, 1, T, T) and positions (B, T) for packed turns.

    Segment 0 is a prefix every token reads (system prompt, image); a token of segment k > 0
    reads the prefix and the earlier tokens of its own segment only, at the position it
    would have if its segment followed the prefix alone. So k questions about one image,
    laid out one after another, are answered exactly as k separate sequences would be."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # (T, S)
    seen = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)  # (B, T, S)
    mask = causal[None] & seen  # (B, T, S)
    return mask[:, None], mask.sum(-1) - 1


class LlamaDecoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def decode_tensors(self) -> tuple[list, list] | None:
        """All blocks' Block.decode_tensors, concatenated, when every block is plain, carries no hooks
        of its own and all have one kind of projection: then a CPU decode step runs through all
        of them in one cpu_kernels call. None otherwise."""
        weights, scales = [], []
        for block in self.layers:
            tensors = None if block._forward_hooks or block._forward_pre_hooks else block.decode_tensors()
            if tensors is None or (weights and bool(scales) != bool(tensors[1])):
                return None
            weights += tensors[0]
            scales += tensors[1]
        return weights, scales

    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, hidden_states: list | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """embeds (B, T, C) -> final hidden states (B, T, C), after the last norm.

        attention_mask (B, T) marks real tokens (1) and left padding (0) among the new
        tokens. With a cache, the new tokens follow what it already holds. If a list is
        given as `hidden_states`, the input and each block's output are appended to it.
        segments (B, T), training only: packed independent turns (see segment_mask).
        """
        B, T, _ = embeds.shape
        mask, window = None, self.cfg.sliding_window
        if segments is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("segments: packed turns take neither a cache nor an attention_mask")
            mask, positions = segment_mask(segments)
            if window is not None:
                mask = mask & within_window(positions, positions, window)
        elif cache is not None:
            new = attention_mask if attention_mask is not None else embeds.new_ones(B, T, dtype=torch.bool)
            positions, valid = cache.begin(new)
            plain = (cache.length == 0 or T == 1) and bool(valid.all())
        elif attention_mask is not None:
            valid = attention_mask.to(torch.bool)
            positions = (valid.long().cumsum(1) - 1).clamp(min=0)
            plain = bool(valid.all())
        else:
            positions = torch.arange(T, device=embeds.device).expand(B, T)
            valid, plain = None, True
        if segments is None and window is not None and (T if valid is None else valid.shape[1]) > window:
            plain = False  # the window hides the oldest keys from some query: an explicit mask
            valid = embeds.new_ones(B, T, dtype=torch.bool) if valid is None else valid
        if segments is None and not plain:
            mask = build_mask(valid, T, window)
        cos, sin = self.rotary(positions, embeds.dtype)
        x = embeds
        if (hidden_states is None and cpu_kernels.use_decode_step(x, cache)
                and (tensors := self.decode_tensors()) is not None):  # CPU decode: all blocks, one call
            x = cpu_kernels.decode_layers(x, *tensors, cos, sin, cache, self.layers[0].self_attn,
                                          self.layers[0].input_layernorm.eps, mask)
        else:
            if hidden_states is not None:
                hidden_states.append(x)
            for block in self.layers:
                x = block(x, cos, sin, mask, cache)
                if hidden_states is not None:
                    hidden_states.append(x)
        if cache is not None:
            cache.commit(T)
        return self.norm(x)

