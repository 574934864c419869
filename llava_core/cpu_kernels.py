"""CPU kernels for decode (one new token per sequence), in C++, compiled on first use.

Decode reads every weight once per token, so on a CPU its speed is the rate at which the
weights stream from memory, plus a fixed cost per operation. torch leaves two things on the
table there, on this project's AVX2 machine:
- its bf16 matrix-vector product read ~11 GB/s where a plain fp32 `sum` read ~17 GB/s (the
  CPU has no bf16 arithmetic, so torch converts whole weights);
- a decoder block is ~30 small torch operations per token (norms, rotary, cache writes,
  attention, residuals), each with its own dispatch and, for the products, its own thread
  fork/join. For a 135M-parameter decoder that overhead is most of the step.

The kernels below:
- `gemv(x, [w1, w2, ...], scales, swiglu)`: x (M, K) times several weights (N_i, K) in one pass over
  their rows (q, k and v together; gate and up together, then silu(gate) * up). bf16 weights
  are widened to fp32 in registers (bf16 is the top half of an fp32: a 16-bit shift) and
  accumulated with FMA in fp32, four rows at a time, rows split over threads. int8 weights
  (llama.Int8Linear, optional) carry one fp32 scale per row.
- `rmsnorm(x, w, eps)`: the decoder's RMSNorm, the same roundings as llama.RMSNorm.
- `rope_attend(q, k, v, cos, sin, k_cache, v_cache, slot, scale, mask)`: rotary on q and k, the
  new key/value written into the cache at `slot`, and one query's grouped-query attention over
  slots 0..slot (those the mask allows, for left-padded batches), in fp32.
`block_step` strings them into llama.Block's forward for a decode step with no padding: 7
calls instead of ~30 operations. The arithmetic is the same (fp32 accumulation, one rounding
where torch rounds); only summation order differs (tests/test_cpu_kernels.py checks both
paths against each other and the greedy tokens against transformers).

Built with torch.utils.cpp_extension the first time it is needed (about a minute; cached
under ~/.cache/torch_extensions after that). Where the CPU lacks AVX2/FMA, no compiler is
found or the build fails, `available()` is False and llama.py keeps torch's path. Set
LLAVA_CORE_CPU_KERNELS=0 to use torch's path always (for reading, or to compare).
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

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

using bf16 = at::BFloat16;

// --- loads and stores: fp32 in registers, fp32 or bf16 in memory ---------------------------
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const bf16* p) {  // 8 bf16 -> 8 fp32: widen to 32 bits, shift up
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline float load1(const float* p) { return *p; }
static inline float load1(const int8_t* p) { return static_cast<float>(*p); }
static inline float load1(const bf16* p) { return static_cast<float>(*p); }
static inline void store1(float* p, float v) { *p = v; }
static inline void store1(bf16* p, float v) { *p = bf16(v); }  // round to nearest even, as torch
template <typename T> inline float round_as(float v);  // v rounded to T's precision
template <> inline float round_as<float>(float v) { return v; }
template <> inline float round_as<bf16>(float v) { return static_cast<float>(bf16(v)); }

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <typename T>
static inline float dot(const float* x, const T* w, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    a0 = _mm256_fmadd_ps(load8(w + k), load8(x + k), a0);
    a1 = _mm256_fmadd_ps(load8(w + k + 8), load8(x + k + 8), a1);
  }
  float s = hsum(_mm256_add_ps(a0, a1));
  for (; k < K; ++k) s += load1(w + k) * x[k];
  return s;
}

static constexpr int64_t kRowBytes = 4096;  // see dot_block

// The products stream 16 weights at a time. A bf16 16-block widens to two fp32 vectors with
// one load and two unpacks (each 32-bit lane gets the bf16 as its top half), but the unpacks
// work within 128-bit halves: the vectors hold elements 0-3, 8-11 and 4-7, 12-15. So x is
// reordered the same way once per call (`x_for`) and the sums come out unchanged.
static inline void load16(const float* p, __m256& a, __m256& b) { a = _mm256_loadu_ps(p); b = _mm256_loadu_ps(p + 8); }
static inline void load16(const bf16* p, __m256& a, __m256& b) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), z = _mm256_setzero_si256();
  a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));  // elements 0-3, 8-11
  b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));  // elements 4-7, 12-15
}

static inline void load16(const int8_t* p, __m256& a, __m256& b) {  // int8 weights: sign-extend, convert
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
  b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
}

template <typename W>
static std::vector<float> x_for(const std::vector<float>& x, int64_t M, int64_t K) {  // (M, K) as load16 pairs it
  std::vector<float> out(x);
  if (std::is_same<W, bf16>::value)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k + 16 <= K; k += 16)
        for (int i = 0; i < 4; ++i) {
          float* o = out.data() + m * K + k;
          const float* in = x.data() + m * K + k;
          o[i] = in[i]; o[4 + i] = in[8 + i]; o[8 + i] = in[4 + i]; o[12 + i] = in[12 + i];
        }
  return out;
}

// out[r] = w[r] . x for R consecutive rows of w (stride K); xk: x reordered by x_for, x: as is
template <int R, typename W>
static inline void dot_rows(const float* xk, const float* x, const W* w, int64_t K, float* out) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 xa = _mm256_loadu_ps(xk + k), xb = _mm256_loadu_ps(xk + k + 8);
    for (int r = 0; r < R; ++r) {
      __m256 a, b;
      load16(w + r * K + k, a, b);
      acc[r][0] = _mm256_fmadd_ps(a, xa, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(b, xb, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
    for (int64_t j = k; j < K; ++j) s += load1(w + r * K + j) * x[j];
    out[r] = s;
  }
}

template <typename W>
static inline void dot_block(const float* xk, const float* x, const W* w, int64_t K, int64_t rows, float* out) {
  // four rows share each load of x; but rows shorter than a page read faster one after another
  // (one stream for the prefetcher): 23 against 14-19 GB/s for the 49152 x 576 lm_head here
  if (rows == 4 && K * (int64_t)sizeof(W) >= kRowBytes) dot_rows<4>(xk, x, w, K, out);
  else for (int64_t r = 0; r < rows; ++r) dot_rows<1>(xk, x, w + r * K, K, out + r);
}

// Below this many weight bytes a product runs on one thread: waking the others costs more.
static constexpr int64_t kParallelBytes = 1 << 18;

static std::vector<float> rows_fp32(const torch::Tensor& x) {  // (M, K) fp32|bf16 -> fp32 copy
  const int64_t n = x.numel();
  std::vector<float> out(n);
  if (x.scalar_type() == torch::kFloat32) std::memcpy(out.data(), x.data_ptr<float>(), n * 4);
  else { const bf16* p = x.data_ptr<bf16>(); for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]); }
  return out;
}

static inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

// x (M, K) times each w_i (N_i, K) -> outputs (M, N_i) in x's dtype. swiglu: two weights
// (gate, up) of the same shape -> one output silu(gate x) * (up x), rounded as torch rounds.
template <typename W, typename O>
static void gemv_impl(const std::vector<float>& xf, int64_t M, int64_t K, const std::vector<torch::Tensor>& ws,
                      const std::vector<torch::Tensor>& scales, std::vector<torch::Tensor>& outs, bool swiglu) {
  // the rows of all weights, in blocks of four, as one range to split over threads
  std::vector<int64_t> first_block(ws.size() + 1, 0);
  const size_t n_parts = swiglu ? 1 : ws.size();
  for (size_t i = 0; i < n_parts; ++i) first_block[i + 1] = first_block[i] + (ws[i].size(0) + 3) / 4;
  const int64_t blocks = first_block[n_parts];
  const int64_t bytes_per_block = 4 * K * (int64_t)sizeof(W) * (swiglu ? 2 : 1);
  const int64_t grain = std::max<int64_t>(1, kParallelBytes / bytes_per_block);
  const std::vector<float> xk = x_for<W>(xf, M, K);
  std::vector<const W*> wp;
  std::vector<O*> op;
  for (auto& w : ws) wp.push_back(w.data_ptr<W>());
  for (auto& o : outs) op.push_back(o.data_ptr<O>());
  std::vector<const float*> sp;  // int8 weights: one fp32 scale per row
  for (auto& sc : scales) sp.push_back(sc.data_ptr<float>());
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    size_t i = 0;
    for (int64_t blk = b0; blk < b1; ++blk) {
      while (blk >= first_block[i + 1]) ++i;
      const int64_t N = ws[i].size(0), n0 = (blk - first_block[i]) * 4, rows = std::min<int64_t>(4, N - n0);
      const W* w = wp[i] + n0 * K;
      O* out = op[i];
      for (int64_t m = 0; m < M; ++m) {
        const float *x = xf.data() + m * K, *xr = xk.data() + m * K;
        float s[4], u[4];
        dot_block(xr, x, w, K, rows, s);
        if (!sp.empty()) for (int r = 0; r < rows; ++r) s[r] *= sp[i][n0 + r];
        if (swiglu) {
          dot_block(xr, x, wp[1] + n0 * K, K, rows, u);
          if (!sp.empty()) for (int r = 0; r < rows; ++r) u[r] *= sp[1][n0 + r];
          for (int r = 0; r < rows; ++r) {
            const float g = round_as<O>(s[r]);
            s[r] = round_as<O>(silu(g)) * round_as<O>(u[r]);
          }
        }
        for (int r = 0; r < rows; ++r) store1(out + m * N + n0 + r, s[r]);
      }
    }
  });
}

// scales: empty for fp32/bf16 weights; for int8 weights one fp32 (N_i,) per weight (w = q * scale per row)
std::vector<torch::Tensor> gemv(torch::Tensor x, std::vector<torch::Tensor> ws, std::vector<torch::Tensor> scales,
                                bool swiglu) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "gemv: x must be a contiguous (M, K) matrix, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16, "gemv: x must be fp32 or bf16");
  TORCH_CHECK(!ws.empty() && (!swiglu || ws.size() == 2), "gemv: swiglu takes exactly (gate, up)");
  const int64_t M = x.size(0), K = x.size(1);
  const auto wt = ws[0].scalar_type();
  TORCH_CHECK(wt == torch::kFloat32 || wt == torch::kBFloat16 || wt == torch::kChar, "gemv: weights must be fp32, bf16 or int8");
  TORCH_CHECK((wt == torch::kChar) == !scales.empty() && (scales.empty() || scales.size() == ws.size()),
              "gemv: int8 weights take one scale vector each; others none");
  for (size_t i = 0; i < scales.size(); ++i)
    TORCH_CHECK(scales[i].dim() == 1 && scales[i].size(0) == ws[i].size(0) && scales[i].is_contiguous()
                && scales[i].scalar_type() == torch::kFloat32, "gemv: scale ", i, " must be fp32 (", ws[i].size(0), ",)");
  for (auto& w : ws) {
    TORCH_CHECK(w.dim() == 2 && w.size(1) == K && w.is_contiguous() && w.scalar_type() == wt,
                "gemv: weights must be contiguous (N, ", K, ") matrices of one dtype, got ", w.sizes());
    TORCH_CHECK(!swiglu || w.size(0) == ws[0].size(0), "gemv: gate and up differ in shape");
  }
  std::vector<torch::Tensor> outs;
  for (size_t i = 0; i < (swiglu ? 1 : ws.size()); ++i) outs.push_back(torch::empty({M, ws[i].size(0)}, x.options()));
  const std::vector<float> xf = rows_fp32(x);
  const bool xb = x.scalar_type() == torch::kBFloat16;
  if (wt == torch::kBFloat16) {
    if (xb) gemv_impl<bf16, bf16>(xf, M, K, ws, scales, outs, swiglu);
    else gemv_impl<bf16, float>(xf, M, K, ws, scales, outs, swiglu);
  } else if (wt == torch::kChar) {
    if (xb) gemv_impl<int8_t, bf16>(xf, M, K, ws, scales, outs, swiglu);
    else gemv_impl<int8_t, float>(xf, M, K, ws, scales, outs, swiglu);
  } else {
    if (xb) gemv_impl<float, bf16>(xf, M, K, ws, scales, outs, swiglu);
    else gemv_impl<float, float>(xf, M, K, ws, scales, outs, swiglu);
  }
  return outs;
}

// RMSNorm over rows of x (M, C), weight (C), all in x's dtype: w * round(x / rms(x)), as
// llama.RMSNorm rounds (normalised in fp32, rounded to the dtype, then scaled).
template <typename T>
static void rmsnorm_impl(const T* x, const T* w, T* out, int64_t M, int64_t C, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * C;
    float ss = 0.f;
    for (int64_t c = 0; c < C; ++c) { const float v = load1(xr + c); ss += v * v; }
    const float r = 1.0f / std::sqrt(ss / C + eps);
    for (int64_t c = 0; c < C; ++c) store1(out + m * C + c, load1(w + c) * round_as<T>(load1(xr + c) * r));
  }
}

torch::Tensor rmsnorm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous()
              && w.scalar_type() == x.scalar_type(), "rmsnorm: x (M, C) and weight (C,) of one dtype, got ",
              x.sizes(), " ", w.sizes());
  auto out = torch::empty_like(x);
  if (x.scalar_type() == torch::kBFloat16)
    rmsnorm_impl(x.data_ptr<bf16>(), w.data_ptr<bf16>(), out.data_ptr<bf16>(), x.size(0), x.size(1), (float)eps);
  else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "rmsnorm: fp32 or bf16");
    rmsnorm_impl(x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1), (float)eps);
  }
  return out;
}

// rotate_half convention: out = x * cos + [-x2, x1] * sin, each product rounded as torch rounds
template <typename T>
static inline void rotary(const T* x, const T* cos, const T* sin, int64_t D, float* out) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < D; ++i) {
    const float rot = i < h ? -load1(x + i + h) : load1(x + i - h);
    out[i] = round_as<T>(round_as<T>(load1(x + i) * load1(cos + i)) + round_as<T>(rot * load1(sin + i)));
  }
}

// One new token per row: q (B, H*D), k and v (B, Hkv*D), cos and sin (B, D), caches (B, Hkv, S, D).
// Writes the rotated key and the value at `slot`, then attends over slots 0..slot.
// Returns (B, H*D) in the dtype of q.
template <typename T>
static void rope_attend_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& kc,
                             torch::Tensor& vc, torch::Tensor& out, int64_t slot, float scale, const bool* mask) {
  const int64_t B = q.size(0), Hkv = kc.size(1), S = kc.size(2), D = kc.size(3), H = q.size(1) / D, group = H / Hkv;
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const T *cp = cos.data_ptr<T>(), *sp = sin.data_ptr<T>();
  T *kcp = kc.data_ptr<T>(), *vcp = vc.data_ptr<T>();
  T* op = out.data_ptr<T>();
  std::vector<float> tmp(D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < Hkv; ++g) {
      T* kdst = kcp + ((b * Hkv + g) * S + slot) * D;
      rotary(kp + (b * Hkv + g) * D, cp + b * D, sp + b * D, D, tmp.data());
      for (int64_t i = 0; i < D; ++i) store1(kdst + i, tmp[i]);
      std::memcpy(vcp + ((b * Hkv + g) * S + slot) * D, vp + (b * Hkv + g) * D, D * sizeof(T));
    }
  const int64_t n = slot + 1;
  at::parallel_for(0, B * H, std::max<int64_t>(1, 65536 / (n * D)), [&](int64_t t0, int64_t t1) {
    std::vector<float> qr(D), p(n), acc(D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, hq = t % H, g = hq / group;
      rotary(qp + (b * H + hq) * D, cp + b * D, sp + b * D, D, qr.data());
      const T* keys = kcp + (b * Hkv + g) * S * D;
      const T* vals = vcp + (b * Hkv + g) * S * D;
      float mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        p[j] = (!mask || mask[b * n + j]) ? dot(qr.data(), keys + j * D, D) * scale : -INFINITY;
        mx = std::max(mx, p[j]);
      }
      float total = 0.f;
      for (int64_t j = 0; j < n; ++j) { p[j] = std::exp(p[j] - mx); total += p[j]; }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const T* vr = vals + j * D;
        const float pj = p[j];
        for (int64_t i = 0; i < D; ++i) acc[i] += pj * load1(vr + i);
      }
      for (int64_t i = 0; i < D; ++i) store1(op + (b * H + hq) * D + i, acc[i] / total);
    }
  });
}

torch::Tensor rope_attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
                          torch::Tensor kc, torch::Tensor vc, int64_t slot, double scale,
                          c10::optional<torch::Tensor> mask) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(kc.dim() == 4 && kc.is_contiguous() && vc.sizes() == kc.sizes() && vc.is_contiguous(),
              "rope_attend: caches must be contiguous (B, Hkv, S, D)");
  const int64_t B = kc.size(0), Hkv = kc.size(1), S = kc.size(2), D = kc.size(3);
  for (auto* t : {&q, &k, &v, &cos, &sin, &kc, &vc})
    TORCH_CHECK(t->scalar_type() == dt && t->is_contiguous(), "rope_attend: one dtype, contiguous tensors");
  TORCH_CHECK(q.dim() == 2 && q.size(0) == B && q.size(1) % (D * Hkv) == 0 && D % 2 == 0, "rope_attend: q ", q.sizes());
  TORCH_CHECK(k.sizes() == v.sizes() && k.dim() == 2 && k.size(0) == B && k.size(1) == Hkv * D, "rope_attend: k/v ", k.sizes());
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == B && cos.size(1) == D, "rope_attend: cos ", cos.sizes());
  TORCH_CHECK(0 <= slot && slot < S, "rope_attend: slot ", slot, " outside the cache's ", S);
  const bool* mk = nullptr;  // (B, slot + 1): which slots each row may read (left padding: not all)
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->is_contiguous() && mask->numel() == B * (slot + 1),
                "rope_attend: mask must be a contiguous bool (B, ", slot + 1, "), got ", mask->sizes());
    mk = mask->data_ptr<bool>();
  }
  auto out = torch::empty_like(q);
  if (dt == torch::kBFloat16) rope_attend_impl<bf16>(q, k, v, cos, sin, kc, vc, out, slot, (float)scale, mk);
  else {
    TORCH_CHECK(dt == torch::kFloat32, "rope_attend: fp32 or bf16");
    rope_attend_impl<float>(q, k, v, cos, sin, kc, vc, out, slot, (float)scale, mk);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv);
  m.def("rmsnorm", &rmsnorm);
  m.def("rope_attend", &rope_attend);
}
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
    if os.environ.get("LLAVA_CORE_CPU_KERNELS", "1") == "0":
        return None
    flags = cpu_flags()
    if flags is None or " avx2" not in flags or " fma" not in flags:
        return None
    if not _built():
        log.warning("building llava_core's AVX2 decode kernels (once, about a minute) ...")
    try:
        from torch.utils.cpp_extension import load_inline
        return load_inline(_NAME, cpp_sources=_SOURCE, with_cuda=False,
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no headers: keep torch's kernels
        log.warning("AVX2 decode kernels not built (%s); using torch's operations",
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def _built() -> bool:
    """Whether a build of the kernels is already cached (only to say why the first use is slow)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private: may move between versions
        return any(Path(_get_build_directory(_NAME, False)).glob("*.so"))
    except Exception:
        return False


def available() -> bool:
    return _module() is not None


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


def use_block_step(x: torch.Tensor, mask, cache) -> bool:
    """Whether llama.Block may take `block_step`: one new token per row (with or without a padding
    mask), a cache of the activations' dtype, fp32 or bf16 on the CPU, no autograd, and the
    kernels built."""
    return (isinstance(cache, KVCache)  # not cuda_graph's fixed-shape writer
            and x.shape[1] == 1 and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16) and cache.k.dtype == x.dtype
            and not torch.is_grad_enabled() and available())


def block_step(block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, mask=None) -> torch.Tensor:
    """llama.Block.forward for a decode step: x (B, 1, C) -> (B, 1, C), writing this token's key and
    value into `cache` at slot cache.length. cos, sin: (B, 1, 1, D) from llama.Rotary; mask: None,
    or llama.build_mask's (B, 1, 1, length + 1) for a left-padded batch."""
    m, att, mlp = _module(), block.self_attn, block.mlp
    B, _, C = x.shape
    x = x.contiguous()
    h = m.rmsnorm(x.view(B, C), block.input_layernorm.weight, block.input_layernorm.eps)  # (B, C)
    q, k, v = m.gemv(h, *_weights(att.q_proj, att.k_proj, att.v_proj), False)  # (B, H*D), (B, Hkv*D) x2
    readable = None if mask is None else mask.reshape(B, -1)  # (B, length + 1) slots each row may read
    y = m.rope_attend(q, k, v, cos.reshape(B, -1), sin.reshape(B, -1), cache.k[att.layer], cache.v[att.layer],
                      cache.length, att.head_dim ** -0.5, readable)  # (B, H*D)
    x = x + m.gemv(y, *_weights(att.o_proj), False)[0].view(B, 1, C)
    h = m.rmsnorm(x.view(B, C), block.post_attention_layernorm.weight, block.post_attention_layernorm.eps)
    a = m.gemv(h, *_weights(mlp.gate_proj, mlp.up_proj), True)[0]  # (B, I): silu(gate) * up
    return x + m.gemv(a, *_weights(mlp.down_proj), False)[0].view(B, 1, C)


def _weights(*projections) -> tuple[list, list]:
    """gemv's weights and scales for projections all of one kind: llama.Linear (no scales) or
    llama.Int8Linear (int8 weights, one fp32 scale per row)."""
    if hasattr(projections[0], "qweight"):
        return [p.qweight for p in projections], [p.scale for p in projections]
    return [p.weight for p in projections], []
