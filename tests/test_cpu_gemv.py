"""The AVX2 bf16 matrix-vector kernel against an fp32 reference, and its use by llama.Linear."""

import pytest
import torch

from llava_core import cpu_gemv, llama

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="no AVX2/FMA CPU or no compiler")


@pytest.mark.parametrize("shape", [(1, 2048, 5632), (3, 2051, 1027), (2, 7, 5), (1, 16, 4)])
def test_matches_fp32_reference_to_bf16_rounding(shape):
    M, K, N = shape
    g = torch.Generator().manual_seed(K + N)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g).bfloat16()
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())  # exact products, fp32 sums
    got = cpu_gemv.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    # one rounding to bf16 (8 significant bits): within one ulp of the fp32 result, plus fp32
    # summation-order noise
    ulp = ref.abs().clamp(min=1e-3) * 2.0 ** -7
    assert ((got.float() - ref).abs() <= ulp + 1e-3 * K ** 0.5).all()


def test_linear_uses_it_for_bf16_decode_only(monkeypatch):
    if llama.cpu_has_fast_bf16():
        pytest.skip("this CPU multiplies bf16 natively; torch's kernel is used")
    calls = []
    real = cpu_gemv.linear
    monkeypatch.setattr(cpu_gemv, "linear", lambda *a: calls.append(a[0].shape) or real(*a))
    lin = llama.Linear(64, 32, bias=False).bfloat16()
    x = torch.randn(1, 1, 64).bfloat16()
    with torch.inference_mode():
        y = lin(x)  # one token: the kernel
        lin(torch.randn(1, 20, 64).bfloat16())  # a prefill: fp32 products instead
    assert calls == [(1, 1, 64)]
    assert y.shape == (1, 1, 32)
    lin(x)  # with autograd on (training), torch's path
    assert len(calls) == 1
