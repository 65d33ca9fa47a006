// Decode-step kernels for x86 CPUs with AVX-512 (+ AVX512-BF16): the ops whose cost at small batch is
// weight streaming or per-call overhead, not arithmetic. Built once by cpu_kernels.py (torch's C++
// extension loader); the pure-torch ops in ops.py are their oracle in tests/unit/test_cpu_kernels.py.
//
// Weight layout ("packed"): W [N, K] becomes blocks of 16 output columns, k-major inside a block, so one
// 64-byte load feeds 16 columns and each weight byte is read exactly once per call:
//   float32:  [ceil(N/16), K, 16]          bfloat16: [ceil(N/16), ceil(K/2), 16, 2]  (k pairs for vdpbf16ps)
// Rows past N and the odd k past K are zero. Accumulation is float32 in both dtypes; a bfloat16 output is
// rounded once (round-to-nearest-even), as torch's bfloat16 matmuls do.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <vector>

using bf16 = at::BFloat16;

namespace {

constexpr int64_t kBlock = 16;  // output columns per packed block (one zmm of float32)
constexpr int kRows = 8;        // rows of x per micro-kernel call: 8 x 2 blocks = 16 accumulators
constexpr int64_t kMaxHeadDim = 256;

// The lanes of a 16-wide chunk at offset i that fall inside length n.
inline __mmask16 tail_mask(int64_t n, int64_t i) {
  return n - i >= kBlock ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(bf16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
inline __m512 load16m(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16m(const bf16* p, __mmask16 m) {
  __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
// Calls fn with a float or bf16 value whose type selects the instantiation.
template <typename Fn>
void dispatch(at::ScalarType t, Fn&& fn) {
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16, "float32 or bfloat16 only");
  if (t == at::kFloat)
    fn(float{});
  else
    fn(bf16{});
}

inline float to_f(float v) { return v; }
inline float to_f(bf16 v) { return static_cast<float>(v); }
template <typename T>
inline T round_to(float v) { return static_cast<T>(v); }

// exp for float32 lanes: Cody-Waite reduction to r in [-ln2/2, ln2/2], degree-6 Taylor (rel. err < 2e-7).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), 0);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// ---- linear: y[M, N] (+)= x[M, K] · Wᵀ (+ b) -----------------------------------------------------------

// acc[m][j] = Σ_k x[m, k] · W[blk j, k, :] for M rows and NB blocks starting at `wp`.
template <int M, int NB>
inline void dot_f32(const float* x, int64_t ldx, const float* wp, int64_t K, __m512 (&acc)[kRows][2]) {
  for (int64_t k = 0; k < K; k++) {
    __m512 w[NB];
    for (int j = 0; j < NB; j++) w[j] = _mm512_loadu_ps(wp + (j * K + k) * kBlock);
    for (int m = 0; m < M; m++) {
      __m512 xb = _mm512_set1_ps(x[m * ldx + k]);
      for (int j = 0; j < NB; j++) acc[m][j] = _mm512_fmadd_ps(xb, w[j], acc[m][j]);
    }
  }
}

template <int M, int NB>
inline void dot_bf16(const bf16* x, int64_t ldx, const bf16* wp, int64_t K, __m512 (&acc)[kRows][2]) {
  const int64_t pairs = K / 2, kp = (K + 1) / 2;  // kp: pairs in the packed block (odd K padded)
  for (int64_t k = 0; k < pairs; k++) {
    __m512bh w[NB];
    for (int j = 0; j < NB; j++)
      w[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(wp + (j * kp + k) * 2 * kBlock));
    for (int m = 0; m < M; m++) {
      int32_t pair;
      std::memcpy(&pair, x + m * ldx + 2 * k, sizeof(pair));
      __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      for (int j = 0; j < NB; j++) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xb, w[j]);
    }
  }
  if (K % 2) {  // the last k alone: its partner lane is zero in the packed weight and in x
    __m512bh w[NB];
    for (int j = 0; j < NB; j++)
      w[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(wp + (j * kp + pairs) * 2 * kBlock));
    for (int m = 0; m < M; m++) {
      int32_t pair = 0;
      std::memcpy(&pair, x + m * ldx + K - 1, sizeof(bf16));
      __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      for (int j = 0; j < NB; j++) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xb, w[j]);
    }
  }
}

template <typename T, int M, int NB>
void tile(const T* x, int64_t ldx, const T* wp, int64_t K, int64_t blk, int64_t N, const T* bias, T* y,
          int64_t ldy, bool accumulate) {
  __m512 acc[kRows][2];
  for (int m = 0; m < M; m++)
    for (int j = 0; j < NB; j++) acc[m][j] = _mm512_setzero_ps();
  const int64_t block_elems = std::is_same<T, float>::value ? K * kBlock : (K + 1) / 2 * 2 * kBlock;
  if constexpr (std::is_same<T, float>::value)
    dot_f32<M, NB>(x, ldx, wp + blk * block_elems, K, acc);
  else
    dot_bf16<M, NB>(x, ldx, wp + blk * block_elems, K, acc);
  for (int j = 0; j < NB; j++) {
    const int64_t col = (blk + j) * kBlock;
    const __mmask16 mask = tail_mask(N, col);
    const __m512 b = bias ? load16m(bias + col, mask) : _mm512_setzero_ps();
    for (int m = 0; m < M; m++) {
      T* out = y + m * ldy + col;
      __m512 v = _mm512_add_ps(acc[m][j], b);
      if (accumulate) v = _mm512_add_ps(v, load16m(out, mask));
      store16(out, v, mask);
    }
  }
}

template <typename T, int M>
void tile_m(const T* x, int64_t ldx, const T* wp, int64_t K, int64_t blk, int64_t nb, int64_t N,
            const T* bias, T* y, int64_t ldy, bool acc) {
  if (nb == 2)
    tile<T, M, 2>(x, ldx, wp, K, blk, N, bias, y, ldy, acc);
  else
    tile<T, M, 1>(x, ldx, wp, K, blk, N, bias, y, ldy, acc);
}

template <typename T>
void linear_impl(const T* x, int64_t ldx, int64_t M, const T* wp, int64_t K, int64_t N, const T* bias, T* y,
                 int64_t ldy, bool acc) {
  const int64_t blocks = (N + kBlock - 1) / kBlock, units = (blocks + 1) / 2;
  // Weights dominate: split output columns across threads; every row chunk reuses a unit's weights from
  // cache. Tiny products stay on the calling thread (waking the pool costs more than they do).
  const int64_t grain = blocks * K < 32768 ? units : 1;
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; u++) {
      const int64_t blk = 2 * u, nb = std::min<int64_t>(2, blocks - blk);
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const T* xs = x + m0 * ldx;
        T* ys = y + m0 * ldy;
        switch (std::min<int64_t>(kRows, M - m0)) {
#define TILE(r) case r: tile_m<T, r>(xs, ldx, wp, K, blk, nb, N, bias, ys, ldy, acc); break;
          TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8)
#undef TILE
        }
      }
    }
  });
}

// Rows per thread for row-wise ops: decode-sized inputs stay on the calling thread (a pool wake-up costs
// more than they do); prefill-sized ones split.
int64_t row_grain(int64_t rows, int64_t cols) { return rows * cols < 65536 ? std::max<int64_t>(rows, 1) : 1; }

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be 2-D with contiguous rows");
}

}  // namespace

// W [N, K] -> the packed layout above.
torch::Tensor pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "pack: W must be 2-D [N, K]");
  const int64_t N = w.size(0), K = w.size(1), Np = (N + kBlock - 1) / kBlock * kBlock;
  auto padded = torch::zeros({Np, K + (w.scalar_type() == at::kBFloat16 ? K % 2 : 0)}, w.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(w);
  const int64_t Kp = padded.size(1);
  if (w.scalar_type() == at::kFloat) return padded.view({Np / kBlock, kBlock, Kp}).transpose(1, 2).contiguous();
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "pack: float32 or bfloat16 only");
  return padded.view({Np / kBlock, kBlock, Kp / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

// y (+)= x · Wᵀ (+ bias) into `y` (may be a column slice of a wider tensor).
void linear_into(const torch::Tensor& x, const torch::Tensor& wp, int64_t n, const c10::optional<torch::Tensor>& bias,
                 torch::Tensor& y, bool accumulate) {
  check_rows(x, "x");
  check_rows(y, "y");
  TORCH_CHECK(x.scalar_type() == wp.scalar_type() && y.scalar_type() == x.scalar_type(), "dtype mismatch");
  TORCH_CHECK(y.size(0) == x.size(0) && y.size(1) == n, "y must be [M, N]");
  const int64_t M = x.size(0), K = x.size(1);
  if (x.scalar_type() == at::kFloat) {
    TORCH_CHECK(wp.size(1) == K, "K mismatch");
    linear_impl<float>(x.data_ptr<float>(), x.stride(0), M, wp.data_ptr<float>(), K, n,
                       bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), y.stride(0), accumulate);
  } else {
    TORCH_CHECK(wp.size(1) == (K + 1) / 2, "K mismatch");
    linear_impl<bf16>(x.data_ptr<bf16>(), x.stride(0), M, wp.data_ptr<bf16>(), K, n,
                      bias ? bias->data_ptr<bf16>() : nullptr, y.data_ptr<bf16>(), y.stride(0), accumulate);
  }
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& wp, int64_t n, const c10::optional<torch::Tensor>& bias) {
  auto y = torch::empty({x.size(0), n}, x.options());
  linear_into(x, wp, n, bias, y, false);
  return y;
}

// ---- RMSNorm and SiLU·up -----------------------------------------------------------------------------

template <typename T>
void rms_norm_impl(const T* x, int64_t ldx, const T* w, T* out, int64_t M, int64_t H, double eps) {
  for (int64_t m = 0; m < M; m++) {
    const T* row = x + m * ldx;
    float ss = 0;
    for (int64_t i = 0; i < H; i++) ss += to_f(row[i]) * to_f(row[i]);
    const float inv = 1.0f / std::sqrt(ss / H + static_cast<float>(eps));
    // As transformers: normalise in float32, cast to the dtype, then multiply by the weight in the dtype.
    for (int64_t i = 0; i < H; i++) out[m * H + i] = round_to<T>(to_f(w[i]) * to_f(round_to<T>(to_f(row[i]) * inv)));
  }
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check_rows(x, "x");
  auto out = torch::empty_like(x, at::MemoryFormat::Contiguous);
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.is_contiguous(), "rms_norm: weight");
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t H = x.size(1);
    at::parallel_for(0, x.size(0), row_grain(x.size(0), H), [&](int64_t m0, int64_t m1) {
      rms_norm_impl<T>(x.data_ptr<T>() + m0 * x.stride(0), x.stride(0), w.data_ptr<T>(), out.data_ptr<T>() + m0 * H,
                       m1 - m0, H, eps);
    });
  });
  return out;
}

// gu [M, 2I] = [gate | up] -> silu(gate) · up [M, I], each op rounded to the dtype as torch's eager ops are.
template <typename T>
void silu_mul_impl(const T* gu, int64_t ld, T* out, int64_t M, int64_t I) {
  for (int64_t m = 0; m < M; m++)
    for (int64_t i = 0; i < I; i += kBlock) {
      const __mmask16 mask = tail_mask(I, i);
      __m512 g = load16m(gu + m * ld + i, mask), up = load16m(gu + m * ld + I + i, mask);
      __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      T tmp[kBlock];
      store16(tmp, s, 0xFFFF);  // round silu to the dtype first
      store16(out + m * I + i, _mm512_mul_ps(load16(tmp), up), mask);
    }
}

torch::Tensor silu_mul(const torch::Tensor& gu) {
  check_rows(gu, "gu");
  const int64_t I = gu.size(1) / 2;
  auto out = torch::empty({gu.size(0), I}, gu.options());
  dispatch(gu.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, gu.size(0), row_grain(gu.size(0), I), [&](int64_t m0, int64_t m1) {
      silu_mul_impl<T>(gu.data_ptr<T>() + m0 * gu.stride(0), gu.stride(0), out.data_ptr<T>() + m0 * I, m1 - m0, I);
    });
  });
  return out;
}

// ---- decode attention: RoPE, KV write and attention for one new token per row -------------------------

namespace {

// out[hd] = rope(x) at one position (rotate-half convention), float32 lanes, rounded to T.
template <typename T>
void rope_row(const T* x, const T* cos, const T* sin, int64_t hd, T* out) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < hd; i++) {
    const float rot = i < half ? -to_f(x[i + half]) : to_f(x[i - half]);
    // transformers: x*cos + rotate_half(x)*sin, each product rounded to the dtype
    out[i] = round_to<T>(to_f(round_to<T>(to_f(x[i]) * to_f(cos[i]))) + to_f(round_to<T>(rot * to_f(sin[i]))));
  }
}

template <typename T>
float dot(const float* q, const T* k, int64_t hd) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < hd; i += kBlock) {
    const __mmask16 m = tail_mask(hd, i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), load16m(k + i, m), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// One (row, kv head): g query heads over positions 0..len-1 of this head's cache.
template <typename T>
void attend_head(const float* q, int64_t g, const T* keys, const T* values, int64_t len, int64_t hd, float scale,
                 T* out, std::vector<float>& scores) {
  scores.resize(len);
  for (int64_t h = 0; h < g; h++) {
    const float* qh = q + h * hd;
    float mx = -INFINITY;
    for (int64_t l = 0; l < len; l++) mx = std::max(mx, scores[l] = dot(qh, keys + l * hd, hd) * scale);
    __m512 sum = _mm512_setzero_ps();
    int64_t l = 0;
    for (; l + kBlock <= len; l += kBlock) {
      __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(&scores[l]), _mm512_set1_ps(mx)));
      _mm512_storeu_ps(&scores[l], e);
      sum = _mm512_add_ps(sum, e);
    }
    float total = _mm512_reduce_add_ps(sum);
    for (; l < len; l++) total += scores[l] = std::exp(scores[l] - mx);
    const int64_t chunks = (hd + kBlock - 1) / kBlock;
    __m512 acc[kMaxHeadDim / kBlock];
    for (int64_t i = 0; i < chunks; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t p = 0; p < len; p++) {
      const __m512 w = _mm512_set1_ps(scores[p]);
      for (int64_t i = 0; i < chunks; i++)
        acc[i] = _mm512_fmadd_ps(w, load16m(values + p * hd + i * kBlock, tail_mask(hd, i * kBlock)), acc[i]);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / total);
    for (int64_t i = 0; i < chunks; i++)
      store16(out + h * hd + i * kBlock, _mm512_mul_ps(acc[i], inv), tail_mask(hd, i * kBlock));
  }
}

template <typename T>
void attend_impl(const T* qkv, int64_t ld, const T* cos, const T* sin, const int64_t* pos, T* kc, T* vc, T* out,
                 int64_t B, int64_t nh, int64_t nkv, int64_t hd, int64_t max_len) {
  const int64_t g = nh / nkv, qd = nh * hd, kvd = nkv * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  int64_t work = 0;
  for (int64_t b = 0; b < B; b++) work += (pos[b] + 1) * nh;
  const int64_t units = B * nkv, grain = work < 8192 ? units : 1;
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    std::vector<float> scores, q(g * hd);
    std::vector<T> tmp(hd);
    for (int64_t u = u0; u < u1; u++) {
      const int64_t b = u / nkv, h = u % nkv, p = pos[b];
      const T* row = qkv + b * ld;
      const T *c = cos + p * hd, *s = sin + p * hd;
      const int64_t head = (b * nkv + h) * max_len;  // this (row, kv head)'s cache, [max_len, hd]
      rope_row(row + qd + h * hd, c, s, hd, kc + (head + p) * hd);
      std::memcpy(vc + (head + p) * hd, row + qd + kvd + h * hd, hd * sizeof(T));
      for (int64_t j = 0; j < g; j++) {
        rope_row(row + (h * g + j) * hd, c, s, hd, tmp.data());
        for (int64_t i = 0; i < hd; i++) q[j * hd + i] = to_f(tmp[i]);
      }
      attend_head(q.data(), g, kc + head * hd, vc + head * hd, p + 1, hd, scale, out + b * qd + h * g * hd, scores);
    }
  });
}

}  // namespace

// qkv [B, q + 2kv] (this step's projections), cos/sin [L, hd], positions [B], kc/vc this layer's cache
// [rows, kv, L, hd]: rotates q and k, stores k and v at each row's position, returns attention [B, q].
torch::Tensor attend_decode(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                            const torch::Tensor& positions, torch::Tensor& kc, torch::Tensor& vc, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(), "contiguous");
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= kMaxHeadDim, "attend_decode: head_dim must be even, at most 256");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "positions: int64");
  const int64_t B = qkv.size(0);
  auto out = torch::empty({B, num_heads * head_dim}, qkv.options());
  dispatch(qkv.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    attend_impl<T>(qkv.data_ptr<T>(), qkv.stride(0), cos.data_ptr<T>(), sin.data_ptr<T>(), positions.data_ptr<int64_t>(),
                   kc.data_ptr<T>(), vc.data_ptr<T>(), out.data_ptr<T>(), B, num_heads, num_kv_heads, head_dim,
                   kc.size(2));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "W [N, K] -> packed blocks");
  m.def("linear", &linear, "x · Wᵀ (+ b) from a packed W");
  m.def("linear_into", &linear_into, "y (+)= x · Wᵀ (+ b), y may be a column slice");
  m.def("rms_norm", &rms_norm, "RMSNorm as transformers computes it");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [gate | up]");
  m.def("attend_decode", &attend_decode, "RoPE + KV write + attention for one token per row");
}
