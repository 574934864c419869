#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <thread>
#include <vector>
#ifdef __linux__
#include <climits>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

// One input's products ask for the weights g_prefetch_bytes ahead of the load, into L2. On the
// AMD EPYC this project trains on, a decode step of the default model's decoder read 20-29 GB/s
// on the hardware prefetcher alone, where a streaming fp32 sum read 29-54 GB/s as the shared
// machine's state moved. 8 KB ahead made the step faster in 11 of 12 runs (1.01-1.38x, each
// run's median; single rounds 0.71-1.66x; a 2-round run 0.93x), 2-4 KB ahead less, 16 KB the
// same. benchmarks/bench_decode_step.py (2026-12-07) measures it with
// set_prefetch_bytes (0: none).
static int64_t g_prefetch_bytes = 8192;
int64_t set_prefetch_bytes(int64_t n) {
  TORCH_CHECK(n >= 0, "set_prefetch_bytes: n must be >= 0, got ", n);
  const int64_t before = g_prefetch_bytes;
  g_prefetch_bytes = n;
  return before;
}
static inline void prefetch_ahead(const void* p) {
  if (g_prefetch_bytes) _mm_prefetch(static_cast<const char*>(p) + g_prefetch_bytes, _MM_HINT_T1);
}

// The products stream 16 weights at a time. A bf16 16-block widens to two fp32 vectors with
// one load and two unpacks (each 32-bit lane gets the bf16 as its top half), but the unpacks
// work within 128-bit halves: the vectors hold elements 0-3, 8-11 and 4-7, 12-15. So x is
// reordered the same way once per call (`reorder_for`) and the sums come out unchanged.
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

// x (M, K) reordered as load16 pairs it for weights of type W (a copy for fp32 and int8)
template <typename W>
static void reorder_for(const float* x, int64_t M, int64_t K, float* out) {
  std::memcpy(out, x, M * K * sizeof(float));
  if (!std::is_same<W, bf16>::value) return;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k + 16 <= K; k += 16) {
      float* o = out + m * K + k;
      const float* in = x + m * K + k;
      for (int i = 0; i < 4; ++i) { o[4 + i] = in[8 + i]; o[8 + i] = in[4 + i]; }
    }
}

// out[r] = w[r] . x for R consecutive rows of w (stride K); xk: x reordered by reorder_for, x: as is
template <int R, typename W>
static inline void dot_rows(const float* xk, const float* x, const W* w, int64_t K, float* out) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 xa = _mm256_loadu_ps(xk + k), xb = _mm256_loadu_ps(xk + k + 8);
    for (int r = 0; r < R; ++r) {
      prefetch_ahead(w + r * K + k);  // 16 weights: one 64-byte line (fp32) or half of one
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

// w . x for one row, with eight accumulators: a short row (576 weights here) is over before one
// chain of dependent FMAs (4-5 cycles each) would have hidden its latency
template <typename W>
static inline float dot_row(const float* xk, const float* x, const W* w, int64_t K) {
  __m256 acc[8];
  for (auto& a : acc) a = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64)
    for (int j = 0; j < 4; ++j) {
      prefetch_ahead(w + k + 16 * j);
      __m256 a, b;
      load16(w + k + 16 * j, a, b);
      acc[2 * j] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xk + k + 16 * j), acc[2 * j]);
      acc[2 * j + 1] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xk + k + 16 * j + 8), acc[2 * j + 1]);
    }
  for (; k + 16 <= K; k += 16) {
    __m256 a, b;
    load16(w + k, a, b);
    acc[0] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xk + k), acc[0]);
    acc[1] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xk + k + 8), acc[1]);
  }
  for (int j = 0; j < 4; ++j) acc[j] = _mm256_add_ps(acc[j], acc[j + 4]);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; k < K; ++k) s += load1(w + k) * x[k];
  return s;
}

template <typename W>
static inline void dot_block(const float* xk, const float* x, const W* w, int64_t K, int64_t rows, float* out) {
  // four rows share each load of x; but rows shorter than a page read faster one after another
  // (one stream for the prefetcher): 23 against 14-19 GB/s for the 49152 x 576 lm_head here
  if (rows == 4 && K * (int64_t)sizeof(W) >= kRowBytes) dot_rows<4>(xk, x, w, K, out);
  else for (int64_t r = 0; r < rows; ++r) out[r] = dot_row(xk, x, w + r * K, K);
}

// --- several inputs at once (a batch's decode step) -------------------------------------------
//
// One input per weight is bandwidth-bound: dot_block above. With M inputs the same rows serve
// M dot products, and what bounds a product is the core's loads and FMAs per weight: a tile of R
// rows by MT inputs loads each weight once for MT inputs and each input once for R rows. With
// AVX2's 16 registers that is 4 rows x 2 inputs (8 sums); with AVX-512's 32, 4 x 4 (16 sums) of
// 16-wide vectors, about twice the work per instruction (measured on this project's Zen 4: 8
// inputs through a 1536 x 576 matrix ran at ~3 G 8-wide FMAs/s per core in AVX2, ~5.6 in
// AVX-512). The sums' order differs from dot_block's, so a row's result may differ in the last
// bits with the batch it decodes in (as torch's products differ by batch size).

// A tile computes while the weights it needs next are still on their way from memory: each
// step asks for the same place in the rows kPrefetchRows further on (the next blocks; a prefetch
// past the matrix's end is harmless), into L2 only: L1 (32 KB here) holds the inputs (8 x 576
// fp32 = 18 KB) and the block in use, and a prefetch into L1 evicts them. Measured on the default
// model's 8-row decode step: no prefetch 51 ms, into L1 44 ms, into L2 32 ms (one row: 22-26 ms).
static constexpr int64_t kPrefetchRows = 8;

// out[m * ld + r] = w[r] . x[m] for four rows of w (stride K) and MT inputs (stride K; xk:
// reordered for W, x: as is)
template <int MT, typename W>
static inline void dot_tile(const float* xk, const float* x, const W* w, int64_t K, float* out, int64_t ld) {
  __m256 acc[MT][4];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    for (int r = 0; r < 4; ++r) {
      __m256 a, b;
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + kPrefetchRows) * K + k), _MM_HINT_T1);
      load16(w + r * K + k, a, b);
      for (int m = 0; m < MT; ++m) acc[m][r] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xk + m * K + k), acc[m][r]);
      for (int m = 0; m < MT; ++m) acc[m][r] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xk + m * K + k + 8), acc[m][r]);
    }
  for (int m = 0; m < MT; ++m) {  // the four rows' sums in one vector: two rounds of pairwise adds
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[m][0], acc[m][1]), _mm256_hadd_ps(acc[m][2], acc[m][3]));
    float s[4];
    _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    for (int r = 0; r < 4; ++r) {
      for (int64_t j = k; j < K; ++j) s[r] += load1(w + r * K + j) * x[m * K + j];
      out[m * ld + r] = s[r];
    }
  }
}

#define AVX512 __attribute__((target("avx512f")))
AVX512 static inline __m512 load16x(const float* p) { return _mm512_loadu_ps(p); }
AVX512 static inline __m512 load16x(const bf16* p) {  // widen to 32 bits, shift up: in order
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
AVX512 static inline __m512 load16x(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// dot_tile's AVX-512 twin: four rows by MT <= 4 inputs; x as is (these loads keep the order)
template <int MT, typename W>
AVX512 static void dot_tile16(const float* x, const W* w, int64_t K, float* out, int64_t ld) {
  __m512 acc[MT][4];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    for (int r = 0; r < 4; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + kPrefetchRows) * K + k), _MM_HINT_T1);
      const __m512 a = load16x(w + r * K + k);
      for (int m = 0; m < MT; ++m) acc[m][r] = _mm512_fmadd_ps(a, _mm512_loadu_ps(x + m * K + k), acc[m][r]);
    }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < 4; ++r) {
      float s = _mm512_reduce_add_ps(acc[m][r]);
      for (int64_t j = k; j < K; ++j) s += load1(w + r * K + j) * x[m * K + j];
      out[m * ld + r] = s;
    }
}

// Whether the batch tiles may use AVX-512: the CPU (and OS) have it, and set_avx512 allows it.
static bool cpu_has_avx512() {
  __builtin_cpu_init();  // this runs while the module loads, maybe before libgcc's own set-up
  return __builtin_cpu_supports("avx512f");  // the CPU's flag and the OS's saving of the registers
}
static bool g_avx512 = cpu_has_avx512();
static bool g_avx512_allowed = true;
static inline bool use_avx512() { return g_avx512 && g_avx512_allowed; }
bool set_avx512(bool allowed) {  // for tests and benchmarks; -> whether AVX-512 is in use now
  g_avx512_allowed = allowed;
  return use_avx512();
}

// The sums of up to four rows of w against M inputs: out[m * 4 + r] = w[r] . x[m].
template <typename W>
static inline void block_products(const float* xk, const float* x, int64_t M, int64_t K, const W* w, int64_t rows,
                                  float* out) {
  if (M == 1 || rows < 4) {  // one input; or a matrix's last rows (N not a multiple of 4)
    for (int64_t m = 0; m < M; ++m) dot_block(xk + m * K, x + m * K, w, K, rows, out + m * 4);
    return;
  }
  int64_t m = 0;
  if (use_avx512()) {
    for (; m + 4 <= M; m += 4) dot_tile16<4>(x + m * K, w, K, out + m * 4, 4);
    switch (M - m) {
      case 3: dot_tile16<3>(x + m * K, w, K, out + m * 4, 4); break;
      case 2: dot_tile16<2>(x + m * K, w, K, out + m * 4, 4); break;
      case 1: dot_tile16<1>(x + m * K, w, K, out + m * 4, 4); break;
    }
    return;
  }
  for (; m + 2 <= M; m += 2) dot_tile<2>(xk + m * K, x + m * K, w, K, out + m * 4, 4);
  if (m < M) dot_tile<1>(xk + m * K, x + m * K, w, K, out + m * 4, 4);
}

// Inputs go through block_products this many at a time (its output lives on the stack).
static constexpr int64_t kInputsAtOnce = 8;

// Up to four rows of w (and of w2, the same rows of a second matrix, or null) against all M inputs:
// emit(m, r, w[r] . x[m], w2[r] . x[m] or 0) for each input m and row r.
template <typename W, typename Emit>
static inline void rows_products(const float* xk, const float* x, int64_t M, int64_t K, const W* w, const W* w2,
                                 int64_t rows, Emit emit) {
  for (int64_t m0 = 0; m0 < M; m0 += kInputsAtOnce) {
    const int64_t mn = std::min(kInputsAtOnce, M - m0);
    float s[4 * kInputsAtOnce], u[4 * kInputsAtOnce] = {};
    block_products(xk + m0 * K, x + m0 * K, mn, K, w, rows, s);
    if (w2) block_products(xk + m0 * K, x + m0 * K, mn, K, w2, rows, u);
    for (int64_t m = 0; m < mn; ++m)
      for (int64_t r = 0; r < rows; ++r) emit(m0 + m, r, s[m * 4 + r], u[m * 4 + r]);
  }
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
  std::vector<float> xk(M * K);
  reorder_for<W>(xf.data(), M, K, xk.data());
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
      rows_products(xk.data(), xf.data(), M, K, w, swiglu ? wp[1] + n0 * K : nullptr, rows,
                    [&](int64_t m, int64_t r, float s, float u) {
        float v = sp.empty() ? s : s * sp[i][n0 + r];
        if (swiglu) {
          const float g = round_as<O>(v), up = sp.empty() ? u : u * sp[1][n0 + r];
          v = round_as<O>(silu(g)) * round_as<O>(up);
        }
        store1(out + m * N + n0 + r, v);
      });
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

// --- a decode step through decoder blocks, all in one parallel region ------------------------
//
// One new token per row through L consecutive llama.Blocks: RMSNorm, q/k/v, rotary, the cache
// write, grouped-query attention, o_proj + residual, RMSNorm, SwiGLU, down_proj + residual. The
// threads are started once for all L blocks and meet at a barrier between phases (five per
// block) instead of being forked and joined around each of ~7 products and norms per block.
// Every value is rounded to the activations' dtype T where torch's operations round it
// (llama.Block), so only the order of the fp32 sums differs from the torch path.

// Sense-reversing barrier. The wait between two phases is microseconds, so a thread first
// spins; after kSpins pauses (~0.1-0.2 ms) it sleeps on a futex until the last thread arrives
// and wakes it. It used to yield instead: on a machine shared with other work the yielding
// thread stayed runnable and took turns on the cores that the thread it waited for needed, and
// with two busy processes beside it decode fell to 14 tok/s, 0.66x transformers' (sleeping:
// ~21-24 tok/s; alone, either way ~50). benchmarks/bench_generate.py --busy 2. Off Linux it yields.
class SpinBarrier {
 public:
  void expect(int n) { n_.store(n, std::memory_order_relaxed); }  // every thread, before its first wait
  void wait(int& sense) {  // sense: the thread's own flag, starting at 0
    static constexpr int kSpins = 1 << 12;
    sense ^= 1;
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_.load(std::memory_order_relaxed) - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      phase_.store(sense, std::memory_order_seq_cst);  // then read sleepers_: one of the two sees the other
      if (sleepers_.load(std::memory_order_seq_cst) > 0) wake_all();
      return;
    }
    for (int spins = 0; phase_.load(std::memory_order_acquire) != sense; ++spins) {
      if (spins < kSpins) {
        _mm_pause();
        continue;
      }
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      sleep_while(sense ^ 1);  // returns at once if the phase has already moved on
      sleepers_.fetch_sub(1, std::memory_order_relaxed);
    }
  }

 private:
#ifdef __linux__
  int* word() { return reinterpret_cast<int*>(&phase_); }
  void sleep_while(int old) { syscall(SYS_futex, word(), FUTEX_WAIT_PRIVATE, old, nullptr, nullptr, 0); }
  void wake_all() { syscall(SYS_futex, word(), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0); }
#else
  void sleep_while(int) { std::this_thread::yield(); }
  void wake_all() {}
#endif
  std::atomic<int> n_{1}, arrived_{0}, phase_{0}, sleepers_{0};
  static_assert(sizeof(std::atomic<int>) == sizeof(int), "the futex word is phase_'s int");
};

static inline void share(int64_t n, int tid, int nt, int64_t& lo, int64_t& hi) {  // thread tid's part of [0, n)
  lo = n * tid / nt;
  hi = n * (tid + 1) / nt;
}

// Thread tid's share of the rows of w (N, K), in blocks of four, against M inputs (xk: reordered
// for W, x: as is); emit(m, n, sum) takes each sum (times the row's scale for int8 weights).
template <typename W, typename Emit>
static inline void product_share(const float* xk, const float* x, int64_t M, int64_t K, const W* w,
                                 const float* scale, int64_t N, int tid, int nt, Emit emit) {
  int64_t lo, hi;
  share((N + 3) / 4, tid, nt, lo, hi);
  for (int64_t blk = lo; blk < hi; ++blk) {
    const int64_t n0 = blk * 4, rows = std::min<int64_t>(4, N - n0);
    rows_products(xk, x, M, K, w + n0 * K, static_cast<const W*>(nullptr), rows,
                  [&](int64_t m, int64_t r, float s, float) { emit(m, n0 + r, scale ? s * scale[n0 + r] : s); });
  }
}

// RMSNorm of rows x (M, C) with weight (C,) as llama.RMSNorm rounds: w * round(x / rms(x))
template <typename T>
static void rmsnorm_rows(const float* x, const T* w, float* out, int64_t M, int64_t C, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * C;
    float ss = 0.f;
    for (int64_t c = 0; c < C; ++c) ss += xr[c] * xr[c];
    const float r = 1.0f / std::sqrt(ss / C + eps);
    for (int64_t c = 0; c < C; ++c) out[m * C + c] = round_as<T>(load1(w + c) * round_as<T>(xr[c] * r));
  }
}

// rotate_half convention: out = x * cos + [-x2, x1] * sin, each product rounded as torch rounds
template <typename T>
static inline void rotary(const float* x, const T* cos, const T* sin, int64_t D, float* out) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < D; ++i) {
    const float rot = i < h ? -x[i + h] : x[i - h];
    out[i] = round_as<T>(round_as<T>(x[i] * load1(cos + i)) + round_as<T>(rot * load1(sin + i)));
  }
}

// Where a block's 7 projections sit among the 9 tensors decode_layers takes per block
// (input_layernorm, q, k, v, o, post_attention_layernorm, gate, up, down).
static constexpr int kProjectionAt[7] = {1, 2, 3, 4, 6, 7, 8};

template <typename W, typename T>
struct Layer {  // one block's parameters
  const T *ln1, *ln2;  // (C,)
  const W* w[7];  // q (H*D, C), k and v (Hkv*D, C), o (C, H*D), gate and up (I, C), down (C, I)
  const float* s[7];  // int8 weights: one scale per row; otherwise null
};

struct Step {  // the shapes and the cache slot of one decode step
  int64_t B, C, H, Hkv, D, I, S, slot, first_layer;
  float scale, eps;
  const bool* mask;  // (B, slot + 1) or null
};

// exp of 8 floats, to within a few fp32 ulps (Cephes' expf: x = n ln2 + r, a degree-6 polynomial
// in r, times 2^n). Below -87 (and -inf: masked slots) it gives 0.
static inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 gone = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(gone, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

// Row b's kv head g: rotate its new key, write key and value at `slot`, then attend with the
// group's query heads over the slots the mask allows. q (B, H*D), k/v (B, Hkv*D) -> y (B, H*D).
template <typename T>
static void attend_group(const Step& st, int64_t layer, int64_t b, int64_t g, const float* q, const float* k,
                         const float* v, const T* cos, const T* sin, T* kc, T* vc, float* y,
                         std::vector<float>& buf) {
  const int64_t D = st.D, n = st.slot + 1, group = st.H / st.Hkv;
  buf.resize(3 * D + n);
  float *qr = buf.data(), *tmp = qr + D, *acc = tmp + D, *p = acc + D;
  const int64_t base = ((layer * st.B + b) * st.Hkv + g) * st.S * st.D;  // (layer, b, g, slot 0)
  T *keys = kc + base, *vals = vc + base;
  rotary(k + (b * st.Hkv + g) * D, cos + b * D, sin + b * D, D, tmp);
  for (int64_t i = 0; i < D; ++i) {
    store1(keys + st.slot * D + i, tmp[i]);
    store1(vals + st.slot * D + i, v[(b * st.Hkv + g) * D + i]);
  }
  const bool* readable = st.mask ? st.mask + b * n : nullptr;
  for (int64_t hq = g * group; hq < (g + 1) * group; ++hq) {
    rotary(q + (b * st.H + hq) * D, cos + b * D, sin + b * D, D, qr);
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      p[j] = (!readable || readable[j]) ? dot(qr, keys + j * D, D) * st.scale : -INFINITY;
      mx = std::max(mx, p[j]);
    }
    // softmax weights, unnormalised (a query always reads its own slot, so mx is finite)
    float total = 0.f;
    int64_t j = 0;
    __m256 tot = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), _mm256_set1_ps(mx)));
      _mm256_storeu_ps(p + j, e);
      tot = _mm256_add_ps(tot, e);
    }
    total = hsum(tot);
    for (; j < n; ++j) { p[j] = std::exp(p[j] - mx); total += p[j]; }
    // sum of p[j] * value j, 64 dimensions at a time in eight registers
    for (int64_t c = 0; c < D; c += 64) {
      if (c + 64 <= D) {
        __m256 a[8];
        for (auto& v : a) v = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; ++j) {
          const __m256 pj = _mm256_set1_ps(p[j]);
          const T* vr = vals + j * D + c;
          for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(pj, load8(vr + 8 * i), a[i]);
        }
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(acc + c + 8 * i, a[i]);
      } else {
        std::fill(acc + c, acc + D, 0.f);
        for (int64_t j = 0; j < n; ++j)
          for (int64_t i = c; i < D; ++i) acc[i] += p[j] * load1(vals + j * D + i);
      }
    }
    for (int64_t i = 0; i < D; ++i) y[(b * st.H + hq) * D + i] = round_as<T>(acc[i] / total);
  }
}

template <typename W, typename T>
static void decode_layers_impl(const Step& st, const std::vector<Layer<W, T>>& layers, float* x, const T* cos,
                               const T* sin, T* kc, T* vc) {
  const int64_t B = st.B, C = st.C, QD = st.H * st.D, KD = st.Hkv * st.D, I = st.I;
  std::vector<float> q(B * QD), k(B * KD), v(B * KD), y(B * QD), a(B * I);  // shared between threads
  SpinBarrier bar;
  const int nt = omp_in_parallel() ? 1 : std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), n = omp_get_num_threads();
    bar.expect(n);
    int sense = 0;
    const int64_t widest = B * std::max({C, QD, I});
    std::vector<float> in(widest), ink(widest), buf;  // this thread's copy of a product's input
    auto input = [&](const float* src, int64_t K) { std::memcpy(in.data(), src, B * K * 4); reorder_for<W>(in.data(), B, K, ink.data()); };
    for (size_t l = 0; l < layers.size(); ++l) {
      const Layer<W, T>& L = layers[l];
      // 1. attention norm (every thread its own copy: no wait), then q, k, v rows shared out
      rmsnorm_rows(x, L.ln1, in.data(), B, C, st.eps);
      reorder_for<W>(in.data(), B, C, ink.data());
      product_share(ink.data(), in.data(), B, C, L.w[0], L.s[0], QD, tid, n, [&](int64_t m, int64_t r, float s) { q[m * QD + r] = round_as<T>(s); });
      product_share(ink.data(), in.data(), B, C, L.w[1], L.s[1], KD, tid, n, [&](int64_t m, int64_t r, float s) { k[m * KD + r] = round_as<T>(s); });
      product_share(ink.data(), in.data(), B, C, L.w[2], L.s[2], KD, tid, n, [&](int64_t m, int64_t r, float s) { v[m * KD + r] = round_as<T>(s); });
      bar.wait(sense);
      // 2. rotary, cache write and attention: one (row, kv head) pair at a time
      int64_t lo, hi;
      share(B * st.Hkv, tid, n, lo, hi);
      for (int64_t u = lo; u < hi; ++u)
        attend_group(st, st.first_layer + (int64_t)l, u / st.Hkv, u % st.Hkv, q.data(), k.data(), v.data(), cos, sin, kc, vc, y.data(), buf);
      bar.wait(sense);
      // 3. o_proj, added to the residual row by row
      input(y.data(), QD);
      product_share(ink.data(), in.data(), B, QD, L.w[3], L.s[3], C, tid, n, [&](int64_t m, int64_t r, float s) { x[m * C + r] = round_as<T>(x[m * C + r] + round_as<T>(s)); });
      bar.wait(sense);
      // 4. MLP norm, then silu(gate) * up, rounded as torch rounds each
      rmsnorm_rows(x, L.ln2, in.data(), B, C, st.eps);
      reorder_for<W>(in.data(), B, C, ink.data());
      share((I + 3) / 4, tid, n, lo, hi);
      for (int64_t blk = lo; blk < hi; ++blk) {
        const int64_t n0 = blk * 4, rows = std::min<int64_t>(4, I - n0);
        rows_products(ink.data(), in.data(), B, C, L.w[4] + n0 * C, L.w[5] + n0 * C, rows,
                      [&](int64_t m, int64_t r, float g, float u) {
          const float gr = round_as<T>(L.s[4] ? g * L.s[4][n0 + r] : g);
          const float ur = round_as<T>(L.s[5] ? u * L.s[5][n0 + r] : u);
          a[m * I + n0 + r] = round_as<T>(round_as<T>(silu(gr)) * ur);
        });
      }
      bar.wait(sense);
      // 5. down_proj, added to the residual
      input(a.data(), I);
      product_share(ink.data(), in.data(), B, I, L.w[6], L.s[6], C, tid, n, [&](int64_t m, int64_t r, float s) { x[m * C + r] = round_as<T>(x[m * C + r] + round_as<T>(s)); });
      bar.wait(sense);
    }
  }
}

// x (B, C): the new token's hidden state per row. weights: per block, in order, input_layernorm,
// q, k, v, o, post_attention_layernorm, gate, up, down (9 per block); scales: for int8 weights the
// 7 projections' row scales per block, else empty. Caches (layers, B, Hkv, S, D); the blocks use
// cache layers first_layer, first_layer + 1, ... cos, sin (B, D); mask: None or bool (B, slot + 1).
torch::Tensor decode_layers(torch::Tensor x, std::vector<torch::Tensor> weights, std::vector<torch::Tensor> scales,
                            torch::Tensor kc, torch::Tensor vc, int64_t first_layer, torch::Tensor cos,
                            torch::Tensor sin, int64_t slot, double scale, double eps,
                            c10::optional<torch::Tensor> mask) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16, "decode_layers: x must be fp32 or bf16");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "decode_layers: x must be a contiguous (B, C) matrix, got ", x.sizes());
  TORCH_CHECK(!weights.empty() && weights.size() % 9 == 0, "decode_layers: 9 weights per block, got ", weights.size());
  const int64_t L = weights.size() / 9;
  TORCH_CHECK(scales.empty() || scales.size() == (size_t)(7 * L), "decode_layers: 7 scale vectors per block or none");
  TORCH_CHECK(kc.dim() == 5 && kc.is_contiguous() && vc.sizes() == kc.sizes() && vc.is_contiguous()
              && kc.scalar_type() == dt && vc.scalar_type() == dt,
              "decode_layers: caches must be contiguous (layers, B, Hkv, S, D) in x's dtype, got ", kc.sizes());
  Step st;
  st.B = x.size(0); st.C = x.size(1); st.Hkv = kc.size(2); st.S = kc.size(3); st.D = kc.size(4);
  st.H = weights[1].size(0) / st.D; st.I = weights[6].size(0); st.slot = slot; st.first_layer = first_layer;
  st.scale = (float)scale; st.eps = (float)eps; st.mask = nullptr;
  TORCH_CHECK(kc.size(1) == st.B && 0 <= first_layer && first_layer + L <= kc.size(0),
              "decode_layers: cache ", kc.sizes(), " for ", L, " blocks from layer ", first_layer, " and batch ", st.B);
  TORCH_CHECK(0 <= slot && slot < st.S, "decode_layers: slot ", slot, " outside the cache's ", st.S);
  TORCH_CHECK(st.H % st.Hkv == 0 && st.D % 2 == 0, "decode_layers: ", st.H, " heads over ", st.Hkv, " kv heads of ", st.D);
  for (auto* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == dt && t->is_contiguous() && t->dim() == 2 && t->size(0) == st.B && t->size(1) == st.D,
                "decode_layers: cos and sin must be contiguous (", st.B, ", ", st.D, ") in x's dtype, got ", t->sizes());
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->is_contiguous() && mask->numel() == st.B * (slot + 1),
                "decode_layers: mask must be a contiguous bool (B, ", slot + 1, "), got ", mask->sizes());
    st.mask = mask->data_ptr<bool>();
  }
  const auto wt = weights[1].scalar_type();
  TORCH_CHECK((wt == dt || wt == torch::kChar) && (wt == torch::kChar) == !scales.empty(),
              "decode_layers: projections must be in x's dtype, or int8 with scales");
  const int64_t QD = st.H * st.D, KD = st.Hkv * st.D;
  const int64_t rows[7] = {QD, KD, KD, st.C, st.I, st.I, st.C}, cols[7] = {st.C, st.C, st.C, QD, st.C, st.C, st.I};
  static const char* names[7] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  for (int64_t l = 0; l < L; ++l) {
    for (int j : {0, 5}) {
      const auto& n = weights[9 * l + j];
      TORCH_CHECK(n.dim() == 1 && n.size(0) == st.C && n.is_contiguous() && n.scalar_type() == dt,
                  "decode_layers: block ", l, "'s norm must be (", st.C, ",) in x's dtype, got ", n.sizes());
    }
    for (int j = 0; j < 7; ++j) {
      const auto& w = weights[9 * l + kProjectionAt[j]];
      TORCH_CHECK(w.dim() == 2 && w.size(0) == rows[j] && w.size(1) == cols[j] && w.is_contiguous() && w.scalar_type() == wt,
                  "decode_layers: block ", l, "'s ", names[j], " must be a contiguous (", rows[j], ", ", cols[j], ") matrix of one dtype, got ", w.sizes());
      if (!scales.empty()) {
        const auto& s = scales[7 * l + j];
        TORCH_CHECK(s.dim() == 1 && s.size(0) == rows[j] && s.is_contiguous() && s.scalar_type() == torch::kFloat32,
                    "decode_layers: block ", l, "'s ", names[j], " scale must be fp32 (", rows[j], ",)");
      }
    }
  }
  std::vector<float> xf = rows_fp32(x);
  auto run = [&](auto w_tag, auto t_tag) {
    using W = decltype(w_tag);
    using T = decltype(t_tag);
    std::vector<Layer<W, T>> layers(L);
    for (int64_t l = 0; l < L; ++l) {
      layers[l].ln1 = weights[9 * l].data_ptr<T>();
      layers[l].ln2 = weights[9 * l + 5].data_ptr<T>();
      for (int j = 0; j < 7; ++j) {
        layers[l].w[j] = weights[9 * l + kProjectionAt[j]].data_ptr<W>();
        layers[l].s[j] = scales.empty() ? nullptr : scales[7 * l + j].data_ptr<float>();
      }
    }
    decode_layers_impl<W, T>(st, layers, xf.data(), cos.data_ptr<T>(), sin.data_ptr<T>(), kc.data_ptr<T>(), vc.data_ptr<T>());
    auto out = torch::empty_like(x);
    T* o = out.data_ptr<T>();
    for (int64_t i = 0; i < x.numel(); ++i) store1(o + i, xf[i]);
    return out;
  };
  if (dt == torch::kBFloat16) return wt == torch::kChar ? run(int8_t{}, bf16{}) : run(bf16{}, bf16{});
  return wt == torch::kChar ? run(int8_t{}, float{}) : run(float{}, float{});
}

// Both products run without Python's lock: a server's event loop (and any other Python thread)
// keeps running while the engine's thread is inside a decode step.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, py::call_guard<py::gil_scoped_release>());
  m.def("decode_layers", &decode_layers, py::call_guard<py::gil_scoped_release>());
  m.def("set_avx512", &set_avx512);
  m.def("avx512", &use_avx512);
  m.def("set_prefetch_bytes", &set_prefetch_bytes);
}
