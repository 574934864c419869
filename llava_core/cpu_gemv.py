"""A bf16 matrix-vector product for x86 CPUs without native bf16 (AVX2 only), compiled on first use.

Decode reads every weight once per token, so its speed is the rate at which the weights stream
from memory. On this project's AVX2 machine torch's bf16 matrix-vector product read ~11 GB/s
where a plain fp32 `sum` read ~17 GB/s: decode could not pass ~60% of the bandwidth bound.
The kernel below widens bf16 to fp32 in registers (bf16 is the top half of an fp32, so a
16-bit shift) and accumulates with FMA in fp32, four weight rows at a time, rows split over
threads with at::parallel_for. One rounding to bf16 at the end, as torch's own kernel does.

Built with torch.utils.cpp_extension the first time it is needed (about a minute; cached
under ~/.cache/torch_extensions after that). Where no compiler is found, or the build fails,
`available()` is False and `llama.Linear` keeps torch's path. Set LLAVA_CORE_CPU_GEMV=0 to
use torch's path always (for reading, or to compare).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstring>

static inline __m256 widen8(const uint16_t* p) {  // 8 bf16 -> 8 fp32
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

static inline float widen1(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// x: (M, K) fp32, w: (N, K) bf16 -> (M, N) fp32, M small (decode: the batch)
torch::Tensor gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv: shapes ", x.sizes(), " ", w.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kBFloat16, "gemv: dtypes");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "gemv: contiguous inputs");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * 4, rows = std::min<int64_t>(4, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        __m256 acc[4][2];
        for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        int64_t k = 0;
        if (rows == 4) {
          for (; k + 16 <= K; k += 16) {
            const __m256 xa = _mm256_loadu_ps(xr + k), xb = _mm256_loadu_ps(xr + k + 8);
            for (int r = 0; r < 4; ++r) {
              const uint16_t* row = wp + (n0 + r) * K + k;
              acc[r][0] = _mm256_fmadd_ps(widen8(row), xa, acc[r][0]);
              acc[r][1] = _mm256_fmadd_ps(widen8(row + 8), xb, acc[r][1]);
            }
          }
        }
        for (int r = 0; r < rows; ++r) {
          const uint16_t* row = wp + (n0 + r) * K;
          float s = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
          for (int64_t j = k; j < K; ++j) s += widen1(row[j]) * xr[j];
          op[m * N + n0 + r] = s;
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemv", &gemv); }
"""


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
    if os.environ.get("LLAVA_CORE_CPU_GEMV", "1") == "0":
        return None
    flags = cpu_flags()
    if flags is None or " avx2" not in flags or " fma" not in flags:
        return None
    try:
        from torch.utils.cpp_extension import load_inline
        log.warning("building llava_core's AVX2 bf16 matrix-vector kernel (once, about a minute) ...")
        return load_inline("llava_core_gemv_v1", cpp_sources=_SOURCE, with_cuda=False,
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no headers: keep torch's kernel
        log.warning("AVX2 bf16 kernel not built (%s); using torch's bf16 matrix-vector product",
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def available() -> bool:
    return _module() is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for bf16 x (..., K) with few rows and bf16 weight (N, K) -> bf16 (..., N)."""
    rows = x.reshape(-1, x.shape[-1]).float().contiguous()  # (M, K) fp32
    y = _module().gemv(rows, weight.contiguous())  # (M, N) fp32; contiguous() is a no-op when it is
    if bias is not None:
        y = y + bias.float()
    return y.to(torch.bfloat16).reshape(*x.shape[:-1], weight.shape[0])
