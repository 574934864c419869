"""load_pretrained(quantize=...): argument checks on any machine; the bitsandbytes layers on CUDA
(skipped without a GPU) and, where bitsandbytes is installed, their swap-in on the CPU."""

import sys

import pytest
import torch

from llava_core.checkpoints.loader import load_pretrained
from llava_core.checkpoints.quantize import quantize_bnb
from llava_core.model.quantize import Int8Linear

CUDA = torch.cuda.is_available()
# Relative L2 error of the logits against the unquantized model (same checkpoint, random tiny
# weights). Measured with bitsandbytes 0.50.2 on the CPU (bf16): int8 0.009, nf4 0.11.
REL_TOL = {"int8": 0.03, "nf4": 0.2}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def prompt(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, cfg.image_token_index, (10,), generator=g)
    ids = torch.cat([text[:3], torch.full((cfg.num_image_tokens,), cfg.image_token_index), text[3:]])[None]
    return ids, torch.randn(1, 3, 336, 336, generator=g)


# --- argument checks (no GPU needed) -----------------------------------------------------------

def test_unknown_mode_is_refused_before_reading(tmp_path):
    with pytest.raises(ValueError, match=r"quantize='int4': expected None, 'int8' or 'nf4'"):
        load_pretrained(tmp_path / "no-such-folder", quantize="int4")


def test_nf4_on_cpu_is_a_clear_error(tiny_ckpt):
    with pytest.raises(ValueError, match=r"quantize='nf4' needs a CUDA device.*quantize='int8'"):
        load_pretrained(tiny_ckpt, quantize="nf4")


@pytest.mark.skipif(CUDA, reason="checks the message a machine without CUDA gives")
def test_cuda_asked_without_cuda_is_a_clear_error(tiny_ckpt):
    with pytest.raises(ValueError, match=r"quantize='int8' on device='cuda', but torch sees no CUDA device"):
        load_pretrained(tiny_ckpt, quantize="int8", device="cuda")


def test_missing_bitsandbytes_is_named_with_the_extra(tiny_ckpt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"needs bitsandbytes.*llava_core\[gpu\]"):
        load_pretrained(tiny_ckpt, quantize="nf4", device="cuda")


def test_bad_dtype_for_the_unquantized_parts(tiny_ckpt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match="dtype=torch.float32"):
        load_pretrained(tiny_ckpt, quantize="int8", device="cuda", dtype=torch.float32)


def test_int8_on_cpu_is_weight_only_int8(tiny_ckpt):
    ref = load_pretrained(tiny_ckpt)
    model = load_pretrained(tiny_ckpt, quantize="int8")
    block = model.language_model.layers[0]
    assert isinstance(block.self_attn.q_proj, Int8Linear) and isinstance(block.mlp.down_proj, Int8Linear)
    assert model.vision_tower.visual.conv1.weight.dtype == torch.float32  # the tower is untouched
    ids, px = prompt(model.cfg)
    with torch.no_grad():
        assert rel_err(model(ids, px), ref(ids, px)) <= REL_TOL["int8"]


# --- bitsandbytes layers ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_bitsandbytes_swap_on_cpu(tiny_ckpt, mode):
    """The swap itself, where bitsandbytes is installed (its CPU backend; not the GPU kernels)."""
    bnb = pytest.importorskip("bitsandbytes")
    ref = load_pretrained(tiny_ckpt)
    model = load_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    quantize_bnb(model.language_model, mode, torch.device("cpu"), compute_dtype=torch.bfloat16)
    kind = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    projections = [m for b in model.language_model.layers for p in (b.self_attn, b.mlp) for m in p.children()]
    assert len(projections) == 7 * len(model.language_model.layers) and all(isinstance(m, kind) for m in projections)
    assert type(model.language_model.lm_head).__name__ == "Linear"  # kept, as the original builder keeps it
    ids, px = prompt(model.cfg)
    with torch.no_grad():
        assert rel_err(model(ids, px), ref(ids, px)) <= REL_TOL[mode]


@pytest.mark.skipif(not CUDA, reason="bitsandbytes int8/nf4 loading needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_cuda_load_is_close_to_fp16(tiny_ckpt, mode):
    bnb = pytest.importorskip("bitsandbytes")
    ref = load_pretrained(tiny_ckpt, dtype=torch.float16, device="cuda")
    model = load_pretrained(tiny_ckpt, quantize=mode, device="cuda")
    kind = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    assert all(isinstance(m, kind) for b in model.language_model.layers for p in (b.self_attn, b.mlp)
               for m in p.children())
    for part in (model.vision_tower, model.projector):  # kept fp16, on the GPU
        assert {(p.dtype, p.device.type) for p in part.parameters()} == {(torch.float16, "cuda")}
    assert model.language_model.lm_head.weight.dtype == torch.float16
    assert not [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type != "cuda"]
    ids, px = prompt(model.cfg)
    with torch.no_grad():
        out = model(ids.cuda(), px.cuda().half())
        want = ref(ids.cuda(), px.cuda().half())
    assert torch.isfinite(out).all()
    assert rel_err(out, want) <= REL_TOL[mode]
