"""The vision tower's attention through scaled_dot_product_attention against nn.MultiheadAttention's own path."""

import torch
import torch.nn as nn

from llava_core.config import VisionConfig
from llava_core.vision import SelfAttention, VisionTower


def _tower():
    cfg = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=56,
                       patch_size=14, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    torch.manual_seed(0)
    return VisionTower(cfg, [-2], keep_cls=False)


def _as(tower, cls):
    for block in tower.visual.transformer.resblocks:
        block.attn.__class__ = cls
    return tower


def test_sdpa_attention_equals_multihead_attention_forward_and_backward():
    """Features and the gradients of every parameter (training the tower, stage 0) within 1e-5."""
    tower = _tower()
    assert all(type(b.attn) is SelfAttention for b in tower.visual.transformer.resblocks)
    px = torch.randn(2, 3, 56, 56)
    results = []
    for cls in (SelfAttention, nn.MultiheadAttention):
        _as(tower, cls).zero_grad()
        out = tower(px)  # (2, 16, 64)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in tower.parameters() if p.grad is not None]))
    (a, ga), (b, gb) = results
    assert a.shape == (2, 16, 64) and torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert len(ga) == len(gb) > 0
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-4, rtol=1e-4)


def test_attention_weights_and_cross_attention_take_the_modules_own_path():
    attn = _tower().visual.transformer.resblocks[0].attn
    x, other = torch.randn(1, 5, 64), torch.randn(1, 7, 64)
    y, w = attn(x, x, x, need_weights=True)
    assert w.shape == (1, 5, 5) and torch.allclose(w.sum(-1), torch.ones(1, 5))
    y2, _ = attn(x, other, other, need_weights=False)  # cross-attention: not the fast path
    ref, _ = nn.MultiheadAttention.forward(attn, x, other, other, need_weights=False)
    assert torch.equal(y2, ref)


def test_bf16_tower_stays_close_to_fp32():
    """bf16 on the CPU: fp32 products and attention, rounded to bf16 where torch rounds; within a
    few bf16 steps (2^-8 relative each) of the fp32 tower after 3 blocks."""
    tower = _tower().eval()
    px = torch.randn(1, 3, 56, 56)
    with torch.inference_mode():
        ref = tower(px)
        got = tower.to(torch.bfloat16)(px.bfloat16()).float()
    assert (got - ref).abs().max() <= 2.0 ** -5 * ref.abs().max()
