"""CPU kernels for decode (one new token per sequence), in C++, compiled on first use.

Decode reads every weight once per token, so on a CPU its speed is the rate at which the
weights stream from memory, plus a fixed cost per operation. torch leaves two things on the
table there, on this project's AVX2 machine:
- its bf16 matrix-vector product read ~11 GB/s where a plain fp32 `sum` read ~17 GB/s (the
  CPU has no bf16 arithmetic, so torch converts whole weights);
- a decoder block is ~30 small torch operations per token (norms, rotary, cache writes,
  attention, residuals), each with its own dispatch and, for the products, its own thread
  fork/join. For a 135M-parameter decoder that overhead is most of the step.

The kernels (C++ in cpu_kernels.cpp beside this file):
- `gemv(x, [w1, w2, ...], scales, swiglu)`: x (M, K) times several weights (N_i, K) in one pass over
  their rows (or gate and up together, then silu(gate) * up). bf16 weights are widened to fp32
  in registers (bf16 is the top half of an fp32: a 16-bit shift) and accumulated with FMA in
  fp32, four rows at a time, rows split over threads, each weight asked for 8 KB before it
  is read (`set_prefetch_bytes`; on an AMD EPYC a decode step ran 1.01-1.38x faster with it
  in 11 of 12 runs, benchmarks/bench_decode_step.py). int8 weights (llama.Int8Linear,
  optional) carry one fp32 scale per row. `linear` below uses it for single products (lm_head).
  With several inputs (a batch decoding together) each weight is loaded once for several of
  them: tiles of 4 rows x 2 inputs in AVX2, 4 x 4 in AVX-512 where the CPU has it (chosen at
  run time; `allow_avx512(False)` or LLAVA_CORE_AVX512=0 keeps AVX2), with the next rows
  prefetched meanwhile.
- `decode_layers(...)`: a decode step through consecutive decoder blocks in one call: RMSNorm,
  q/k/v, rotary, the cache write, grouped-query attention (with the padding mask of a
  left-padded batch), o_proj, SwiGLU, down_proj and both residuals, with the same products.
  The threads start once per call and meet at barriers between phases (five per block),
  where one fork/join per product cost most of a small model's step. A waiting thread spins
  briefly, then sleeps until woken, so that the cores go to whoever needs them on a shared machine.
llama.LlamaDecoder calls it once per token for all its blocks (llama.Block once per block when
a probe needs each block's output). The arithmetic is the same (fp32 accumulation, one rounding
where torch rounds); only summation order differs (tests/test_cpu_kernels.py checks both paths
against each other, and the greedy tokens against transformers).

Built with torch.utils.cpp_extension the first time it is needed (about a minute; cached
under ~/.cache/torch_extensions after that, rebuilt when the .cpp changes). Where the CPU
lacks AVX2/FMA, no compiler is found or the build fails, `available()` is False and llama.py
keeps torch's path. Set LLAVA_CORE_CPU_KERNELS=0 to use torch's path always (for reading, or
to compare).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from .kv_cache import KVCache

log = logging.getLogger(__name__)
_NAME = "llava_core_cpu"  # the build folder under ~/.cache/torch_extensions

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")


@functools.cache
def cpu_flags() -> str | None:
    """/proc/cpuinfo's text (the CPU's feature flags), or None off Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return None


@functools.cache
def _module():
    """The compiled extension, or None (disabled, not an AVX2+FMA x86 CPU, or no compiler)."""
    if os.environ.get("LLAVA_CORE_CPU_KERNELS", "1") == "0":
        return None
    flags = cpu_flags()
    if flags is None or " avx2" not in flags or " fma" not in flags:
        return None
    if not _built():
        log.warning("building llava_core's AVX2 decode kernels (once, about a minute) ...")
    try:
        from torch.utils.cpp_extension import load
        module = load(_NAME, sources=[str(_SOURCE)], with_cuda=False,
                      extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no headers: keep torch's kernels
        log.warning("AVX2 decode kernels not built (%s); using torch's operations",
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    if os.environ.get("LLAVA_CORE_AVX512", "1") == "0":  # batch products in AVX2 even where AVX-512 is
        module.set_avx512(False)
    return module


def _built() -> bool:
    """Whether a build of the kernels is already cached (only to say why the first use is slow)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private: may move between versions
        return any(Path(_get_build_directory(_NAME, False)).glob("*.so"))
    except Exception:
        return False


def available() -> bool:
    return _module() is not None


def allow_avx512(allowed: bool) -> bool:
    """Let the batch products (two or more rows) use AVX-512 where the CPU has it (the default),
    or keep them to AVX2 (tests of both paths, benchmarks). -> whether AVX-512 is in use now."""
    return bool(_module().set_avx512(allowed))


def set_prefetch_bytes(n: int) -> int:
    """How far ahead (bytes) one input's products ask for weights into L2; 0 turns it off
    (benchmarks/bench_decode_step.py; the default, 8192, is what it measured best). -> the
    distance before."""
    if n < 0:
        raise ValueError(f"set_prefetch_bytes: n must be >= 0, got {n}")
    return int(_module().set_prefetch_bytes(int(n)))


def avx512_in_use() -> bool:
    """Whether the batch products use AVX-512 now (the CPU has it and nothing turned it off)."""
    return available() and bool(_module().avx512())


def decode_product(x: torch.Tensor) -> bool:
    """Whether a product of x (..., K) may go through `linear`: few rows (a decode step), on the
    CPU, no autograd, and the kernels built."""
    return (x.device.type == "cpu" and x.shape[:-1].numel() < 16 and not torch.is_grad_enabled()
            and available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for x (..., K) with few rows -> x's dtype (..., N). weight (N, K): fp32 or bf16, or
    int8 with `scale` (N,) fp32 per row (llama.Int8Linear)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
    scales = [] if scale is None else [scale]
    if bias is None:
        y = _module().gemv(rows, [weight.contiguous()], scales, False)[0]  # (M, N); contiguous(): no-op if it is
    else:  # fp32 products plus the bias, then one rounding
        y = (_module().gemv(rows.float(), [weight.contiguous()], scales, False)[0] + bias.float()).to(x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def use_decode_step(x: torch.Tensor, cache) -> bool:
    """Whether llama's blocks may take `decode_layers`: one new token per row (with or without a
    padding mask), a cache of the activations' dtype, fp32 or bf16 on the CPU, no autograd, and
    the kernels built."""
    return (isinstance(cache, KVCache)  # not cuda_graph's fixed-shape writer
            and x.shape[1] == 1 and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16) and cache.k.dtype == x.dtype
            and not torch.is_grad_enabled() and available())


def decode_layers(x: torch.Tensor, weights: list, scales: list, cos: torch.Tensor, sin: torch.Tensor, cache,
                  first, eps: float, mask=None) -> torch.Tensor:
    """llama.Block.forward of consecutive plain blocks for a decode step, in one C++ call:
    x (B, 1, C) -> (B, 1, C), writing each block's key and value for this token into `cache` at
    slot cache.length. weights, scales: the blocks' Block.decode_tensors, concatenated; first:
    the first block's llama.Attention (its cache layer, head size); cos, sin: (B, 1, 1, D) from
    llama.Rotary; mask: None, or llama.build_mask's (B, 1, 1, length + 1) for a left-padded batch."""
    B, _, C = x.shape
    readable = None if mask is None else mask.reshape(B, -1)  # (B, length + 1) slots each row may read
    y = _module().decode_layers(x.reshape(B, C).contiguous(), weights, scales, cache.k, cache.v, first.layer,
                                cos.reshape(B, -1).contiguous(), sin.reshape(B, -1).contiguous(), cache.length,
                                first.head_dim ** -0.5, eps, readable)
    return y.view(B, 1, C)
