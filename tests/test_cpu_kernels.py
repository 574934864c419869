"""The AVX2 decode kernels (matrix-vector products; a decode step through the decoder blocks) against torch, and their use by llama.py."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from llava_core.model import cpu_kernels, layers, llama, quantize

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no AVX2/FMA CPU or no compiler")


@pytest.mark.parametrize("shape", [(1, 2048, 5632), (3, 2051, 1027), (2, 7, 5), (1, 16, 4)])
def test_matches_fp32_reference_to_bf16_rounding(shape):
    M, K, N = shape
    g = torch.Generator().manual_seed(K + N)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g).bfloat16()
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())  # exact products, fp32 sums
    got = cpu_kernels.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    # one rounding to bf16 (8 significant bits): within one ulp of the fp32 result, plus fp32
    # summation-order noise
    ulp = ref.abs().clamp(min=1e-3) * 2.0 ** -7
    assert ((got.float() - ref).abs() <= ulp + 1e-3 * K ** 0.5).all()


def test_linear_uses_it_for_bf16_decode_only(monkeypatch):
    if layers.cpu_has_fast_bf16():
        pytest.skip("this CPU multiplies bf16 natively; torch's kernel is used")
    calls = []
    real = cpu_kernels.linear
    monkeypatch.setattr(cpu_kernels, "linear", lambda *a: calls.append(a[0].shape) or real(*a))
    lin = layers.Linear(64, 32, bias=False).bfloat16()
    x = torch.randn(1, 1, 64).bfloat16()
    with torch.inference_mode():
        y = lin(x)  # one token: the kernel
        lin(torch.randn(1, 20, 64).bfloat16())  # a prefill: fp32 products instead
    assert calls == [(1, 1, 64)]
    assert y.shape == (1, 1, 32)
    lin(x)  # with autograd on (training), torch's path
    assert len(calls) == 1


# --- the decode-step kernels: gemv over several weights; decode_layers -------------------------

def _rand(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.fixture(params=["avx512", "avx2"])
def isa(request):
    """The batch products' instruction set: AVX-512 (skipped where the CPU lacks it), then AVX2."""
    on = cpu_kernels.allow_avx512(request.param == "avx512")
    if request.param == "avx512" and not on:
        pytest.skip("this CPU has no AVX-512")
    yield request.param
    cpu_kernels.allow_avx512(True)


@pytest.mark.parametrize("K", [96, 83])  # a multiple of the 16-wide steps, and not
@pytest.mark.parametrize("wtype", ["fp32", "bf16", "int8"])
def test_batch_products_of_every_width_match_an_fp32_reference(wtype, K, isa):
    """1 to 9 inputs at once (tiles of 4 or 2 inputs and every remainder) through 10 rows (two
    blocks of four and a tail of two): each sum within fp32 order noise of torch's fp32 product."""
    g = torch.Generator().manual_seed(K)
    w = _rand(g, 10, K)
    scales = []
    if wtype == "int8":
        w, s = (w * 40).round().clamp(-127, 127).to(torch.int8), torch.rand(10, generator=g) + 0.5
        scales, dense = [s], w.float() * s[:, None]
    else:
        w = w.to(torch.bfloat16 if wtype == "bf16" else torch.float32)
        dense = w.float()
    for M in range(1, 10):
        x = _rand(g, M, K)
        (y,) = cpu_kernels._module().gemv(x, [w], scales, False)
        ref = torch.nn.functional.linear(x, dense)
        assert ((y - ref).abs() <= 1e-5 * (x.abs() @ dense.abs().T).clamp(min=1)).all(), (M, wtype, K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_of_several_weights_and_swiglu_match_torch(dtype, isa):
    g = torch.Generator().manual_seed(1)
    x = _rand(g, 3, 75, dtype=dtype)  # K = 75: not a multiple of the 16-wide inner loop
    ws = [_rand(g, n, 75, dtype=dtype) for n in (13, 6, 6)]  # rows not a multiple of 4 either
    m = cpu_kernels._module()
    outs = m.gemv(x, ws, [], False)
    for w, y in zip(ws, outs):
        ref = torch.nn.functional.linear(x.float(), w.float())  # exact products, fp32 sums
        assert y.dtype == dtype and y.shape == ref.shape
        tol = 1e-5 if dtype == torch.float32 else 2.0 ** -7  # fp32 order noise; one bf16 rounding
        assert ((y.float() - ref).abs() <= tol * ref.abs().clamp(min=1) * 75 ** 0.5).all()
    gate, up = _rand(g, 10, 75, dtype=dtype), _rand(g, 10, 75, dtype=dtype)
    (y,) = m.gemv(x, [gate, up], [], True)
    ref = torch.nn.functional.silu(torch.nn.functional.linear(x, gate)) * torch.nn.functional.linear(x, up)
    assert y.shape == (3, 10) and torch.allclose(y.float(), ref.float(), rtol=2.0 ** -6, atol=1e-3)
    with pytest.raises(RuntimeError, match=r"\(N, 75\)"):
        m.gemv(x, [_rand(g, 4, 74, dtype=dtype)], [], False)


def _decoder(dtype, seed=0):
    from llava_core.model.config import TextConfig
    cfg = TextConfig(vocab_size=300, hidden_size=128, intermediate_size=344, num_hidden_layers=3,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                     rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    dec = llama.LlamaDecoder(cfg).to(dtype).eval()
    with torch.no_grad():  # weights large enough that a wrong sum shows
        for p in dec.parameters():
            p.normal_(0.0, 0.1) if p.dim() > 1 else p.normal_(1.0, 0.1)
    return dec


def _decode(dec, dtype, steps, kernels: bool, monkeypatch, padded: bool = False):
    from llava_core.model.kv_cache import KVCache
    with monkeypatch.context() as mp:
        if not kernels:  # torch's operations throughout
            mp.setattr(cpu_kernels, "available", lambda: False)
        g = torch.Generator().manual_seed(3)
        prompt, new = _rand(g, 2, 12, 128, dtype=dtype), _rand(g, 2, steps, 1, 128, dtype=dtype)
        cache = KVCache.for_model(dec.cfg, 2, 64, dtype, "cpu")
        mask = torch.ones(2, 12, dtype=torch.bool)
        mask[0, :4] = not padded  # row 0 left-padded by 4: decode steps then carry a mask
        with torch.inference_mode():
            out = [dec(prompt, attention_mask=mask, cache=cache)[:, -1]]
            out += [dec(new[:, t], cache=cache)[:, -1] for t in range(steps)]
        n = cache.length
        return torch.stack(out).float(), cache.k[..., :n, :].float(), cache.v[..., :n, :].float()


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_layers_equals_the_torch_path(dtype, padded, monkeypatch, isa):
    """Five decode steps of a 3-layer GQA decoder (batch 2, one row left-padded or none): hidden
    states and the cache written by the kernels against llama.Block's torch operations. fp32:
    1e-5; bf16: two bf16 steps (2^-6) of the largest value, since roundings may land on either side."""
    dec = _decoder(dtype)
    fast = _decode(dec, dtype, 5, True, monkeypatch, padded)
    plain = _decode(dec, dtype, 5, False, monkeypatch, padded)
    for a, b in zip(fast, plain):
        tol = 1e-5 if dtype == torch.float32 else 2.0 ** -6
        assert (a - b).abs().max() <= tol * b.abs().max()


def test_decode_layers_is_right_and_finishes_with_more_threads_than_cores(monkeypatch):
    """Twice as many threads as cores: a thread waits at the phase barriers while the one it
    waits for is descheduled, past the spin, so it sleeps on the futex and must be woken. The
    steps must finish (a lost wake-up hangs; the decode runs in a thread joined with a timeout)
    and equal the torch path's as in the test above."""
    dec, threads, box = _decoder(torch.float32), torch.get_num_threads(), {}
    torch.set_num_threads(2 * (os.cpu_count() or 1))
    try:
        worker = threading.Thread(target=lambda: box.update(fast=_decode(dec, torch.float32, 20, True, monkeypatch)),
                                  daemon=True)
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive(), "decode_layers hung at a barrier"
    finally:
        torch.set_num_threads(threads)
    plain = _decode(dec, torch.float32, 20, False, monkeypatch)
    for a, b in zip(box["fast"], plain):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_decode_layers_runs_once_per_token_and_block_by_block_for_hooks(monkeypatch):
    dec = _decoder(torch.float32)
    calls = []
    real = cpu_kernels.decode_layers
    monkeypatch.setattr(cpu_kernels, "decode_layers", lambda x, ws, *a: calls.append(len(ws) // 9) or real(x, ws, *a))
    _decode(dec, torch.float32, 2, True, monkeypatch)  # prefill: torch; two decode steps: one call each
    assert calls == [3, 3]
    handle = dec.layers[1].self_attn.q_proj.register_forward_hook(lambda *a: None)  # a probe
    calls.clear()
    _decode(dec, torch.float32, 2, True, monkeypatch)
    handle.remove()
    assert calls == [1, 1, 1, 1]  # block by block, and the hooked block ran torch's path
    handle = dec.layers[2].register_forward_hook(lambda *a: None)  # a hook on a whole block
    calls.clear()
    _decode(dec, torch.float32, 1, True, monkeypatch)
    handle.remove()
    assert calls == [1, 1, 1]  # block by block, so that the hook sees its block's output
    with torch.enable_grad():  # training: always torch's path
        calls.clear()
        from llava_core.model.kv_cache import KVCache
        cache = KVCache.for_model(dec.cfg, 1, 8, torch.float32, "cpu")
        dec(torch.randn(1, 1, 128), cache=cache)
        assert calls == []


def test_decode_layers_block_by_block_gives_the_same_hidden_states(monkeypatch):
    """With hidden_states requested (probes), each block runs its own call; the last state and the
    cache equal those of one call for all blocks, bit for bit (the same sums in the same order)."""
    from llava_core.model.kv_cache import KVCache
    dec = _decoder(torch.bfloat16)
    x = _rand(torch.Generator().manual_seed(5), 2, 1, 128, dtype=torch.bfloat16)
    outs = []
    for states in (None, []):
        cache = KVCache.for_model(dec.cfg, 2, 8, torch.bfloat16, "cpu")
        with torch.inference_mode():
            outs.append((dec(x, cache=cache, hidden_states=states), cache.k.clone(), cache.v.clone()))
    assert len(states) == dec.cfg.num_hidden_layers + 1
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_decode_layers_names_the_block_and_projection_at_fault():
    m = cpu_kernels._module()
    dec = _decoder(torch.float32)
    ws = []
    for b in dec.layers:
        att, mlp = b.self_attn, b.mlp
        ws += [b.input_layernorm.weight, att.q_proj.weight, att.k_proj.weight, att.v_proj.weight, att.o_proj.weight,
               b.post_attention_layernorm.weight, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    ws = [w.detach() for w in ws]
    ws[9 + 7] = ws[9 + 7][:, :100]  # block 1's up_proj cut short
    k = torch.zeros(3, 1, 2, 8, 16)
    args = (torch.zeros(1, 128), ws, [], k, k.clone(), 0, torch.zeros(1, 16), torch.zeros(1, 16), 0, 0.25, 1e-5, None)
    with pytest.raises(RuntimeError, match=r"block 1's up_proj must be a contiguous \(344, 128\)"):
        m.decode_layers(*args)


# --- optional weight-only int8 ------------------------------------------------------------------

def test_int8_linear_rounds_within_half_a_step_and_the_kernel_matches_its_dequantised_product():
    g = torch.Generator().manual_seed(4)
    lin = layers.Linear(75, 13, bias=False)
    with torch.no_grad():
        lin.weight.copy_(_rand(g, 13, 75))
    q = quantize.Int8Linear.from_linear(lin)
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() == 127
    deq = q.qweight.float() * q.scale[:, None]
    assert ((deq - lin.weight).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    x = _rand(g, 2, 75)
    with torch.inference_mode():
        got = q(x)  # two rows: the kernel
    assert torch.allclose(got, torch.nn.functional.linear(x, deq), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="scale"):
        cpu_kernels._module().gemv(x, [q.qweight], [], False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_decode_layers_equals_the_torch_path(dtype, monkeypatch):
    dec = quantize.quantize_int8(_decoder(dtype))
    assert all(b.decode_tensors() is not None and type(b.mlp.down_proj) is quantize.Int8Linear for b in dec.layers)
    fast = _decode(dec, dtype, 3, True, monkeypatch)
    plain = _decode(dec, dtype, 3, False, monkeypatch)  # Int8Linear's dequantised fp32 products
    for a, b in zip(fast, plain):
        tol = 1e-5 if dtype == torch.float32 else 2.0 ** -6
        assert (a - b).abs().max() <= tol * b.abs().max()


def test_cli_int8_flag_quantises_the_decoder_only(tiny_ckpt):
    import argparse

    from llava_core.cli import common as cli
    args = argparse.Namespace(model=str(tiny_ckpt), device="cpu", dtype="float32", template=None, int8=True)
    model, _ = cli.load_model(args)
    lm = model.language_model
    kinds = {type(m) for b in lm.layers for m in (*b.self_attn.children(), *b.mlp.children())}
    assert kinds == {quantize.Int8Linear} and type(lm.lm_head) is quantize.Int8Linear
    assert lm.embed_tokens.weight.dtype == torch.float32  # the embedding is not quantised


def test_fp32_decode_uses_the_kernel_for_large_weights_only(monkeypatch):
    calls = []
    real = cpu_kernels.linear
    monkeypatch.setattr(cpu_kernels, "linear", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    big, small = layers.Linear(1024, 4096, bias=False), layers.Linear(64, 32, bias=False)  # 16 MB; 8 KB
    x = torch.randn(1, 1, 1024)
    with torch.inference_mode():
        y = big(x)
        small(torch.randn(1, 1, 64))
        big(torch.randn(1, 20, 1024))  # a prefill: torch
    assert calls == [(4096, 1024)]
    assert torch.allclose(y, torch.nn.functional.linear(x, big.weight), rtol=1e-5, atol=1e-5)


def test_the_kernels_let_other_python_threads_run_meanwhile():
    """A server's event loop runs beside the engine's decode step: while a product runs in one
    thread (1 compute thread, ~0.1 s), the other keeps ticking. Holding Python's lock, it would
    stall for the whole call."""
    w, x = torch.ones(16384, 4096), torch.ones(8, 4096)  # 256 MB, read four times per call
    m = cpu_kernels._module()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        m.gemv(x, [w, w, w, w], [], False)
        call = time.perf_counter() - t0
        worker = threading.Thread(target=m.gemv, args=(x, [w, w, w, w], [], False))
        gaps, last = [], time.perf_counter()
        worker.start()
        while worker.is_alive():
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        worker.join()
    finally:
        torch.set_num_threads(threads)
    assert call > 0.02 and max(gaps) < call / 2, (call, max(gaps))



def test_llava_core_avx512_0_keeps_the_batch_products_in_avx2():
    """The environment switch, read when the module loads (so in a fresh interpreter)."""
    code = "from llava_core.model import cpu_kernels; print(cpu_kernels.avx512_in_use())"
    seen = {}
    for value in ("0", "1"):
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LLAVA_CORE_AVX512": value},
                           capture_output=True, text=True, timeout=600)
        seen[value] = r.stdout.strip().splitlines()[-1]
    assert seen == {"0": "False", "1": str(cpu_kernels.allow_avx512(True))}


@pytest.mark.parametrize("K", [576, 1100])  # rows one at a time (2.3 KB), and four together (4.4 KB)
def test_prefetch_distance_changes_no_product_and_a_negative_one_is_refused(K):
    """Prefetching only asks for memory early: every distance gives the same bits, including
    prefetches far past the matrix's end (9 rows here), and the results match torch's."""
    g = torch.Generator().manual_seed(K)
    w, x = _rand(g, 9, K), _rand(g, 1, K)
    ref = torch.nn.functional.linear(x, w)
    before = cpu_kernels.set_prefetch_bytes(0)
    try:
        got = {}
        for n in (0, 64, 8192, 1 << 20):
            cpu_kernels.set_prefetch_bytes(n)
            (got[n],) = cpu_kernels._module().gemv(x, [w], [], False)
        with pytest.raises(ValueError, match="must be >= 0"):
            cpu_kernels.set_prefetch_bytes(-1)
    finally:
        cpu_kernels.set_prefetch_bytes(before)
    assert all(torch.equal(got[0], y) for y in got.values())
    assert ((got[0] - ref).abs() <= 1e-5 * (x.abs() @ w.abs().T).clamp(min=1)).all()
