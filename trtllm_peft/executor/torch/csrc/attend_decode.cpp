// Decode attention over the paged KV cache: one token per row, each row with its own block table.
// RoPE on q and k, k and v stored at the row's position, then attention over positions 0..pos.

#include <atomic>
#include <type_traits>

#include "rope.h"

namespace trtllm_peft {
namespace {

// Attention work (positions x query dims over the rows) below which a step's attention stays on the calling
// thread (short contexts: a worker's wake-up costs more than it saves); set_streaming's attend_split.
std::atomic<int64_t> attend_split{262144};

// Every line of one (row, kv head)'s keys and values at positions 0..len-1 into L1 (T0), issued together: the
// cache was evicted by the step's weight streaming since the last layer read it, and the attention loops'
// dependent chains would otherwise take those misses a few at a time (a unit is ~2·len·hd·sizeof(T) bytes).
template <typename T>
void prefetch_kv(const T* kc, const T* vc, const int32_t* table, int64_t h, int64_t nkv, int64_t tpb, int64_t hd,
                 int64_t len) {
  for (int64_t j = 0; j * tpb < len; j++) {
    const int64_t tile = (static_cast<int64_t>(table[j]) * nkv + h) * tpb * hd;
    const int64_t bytes = std::min(tpb, len - j * tpb) * hd * static_cast<int64_t>(sizeof(T));
    const char* k = reinterpret_cast<const char*>(kc + tile);
    const char* v = reinterpret_cast<const char*>(vc + tile);
    for (int64_t off = 0; off < bytes; off += 64) {
      _mm_prefetch(k + off, _MM_HINT_T0);
      _mm_prefetch(v + off, _MM_HINT_T0);
    }
  }
}

// scores[h·ld + r] = scale · q_h·key_r for R consecutive keys (R, G and C at compile time: all in registers).
template <typename T, int C, int G, int R>
inline void keys_dot(const __m512 (&qv)[G][C], const T* keys, int64_t hd, float scale, float* scores, int64_t ld,
                     float (&mx)[G]) {
  __m512 acc[G][R];
  for (int h = 0; h < G; h++)
    for (int r = 0; r < R; r++) acc[h][r] = _mm512_setzero_ps();
  for (int i = 0; i < C; i++)
    for (int r = 0; r < R; r++) {
      const __m512 kv = load16(keys + r * hd + i * kBlock, tail_mask(hd, i * kBlock));
      for (int h = 0; h < G; h++) acc[h][r] = _mm512_fmadd_ps(qv[h][i], kv, acc[h][r]);
    }
  for (int h = 0; h < G; h++)
    for (int r = 0; r < R; r++) mx[h] = std::max(mx[h], scores[h * ld + r] = _mm512_reduce_add_ps(acc[h][r]) * scale);
}

// G query heads of one kv head, q [G, hd] over cache positions 0..len-1 -> out [G, hd]. C = ceil(hd/16) chunks
// known at compile time (so the accumulators stay in registers); each key and value chunk is loaded once for
// all G heads, and four keys at a time keep 4·G dot products and their horizontal sums in flight instead of
// one latency-bound chain. The positions live in blocks of `tpb` tokens: keys[j] / values[j] point at block j's
// [tpb, hd] tile of this kv head, so the paged layout costs one pointer per block. scores: [G, ld] scratch.
// Per head the arithmetic (and its order) is that of one head alone: grouping changes no bit.
template <typename T, int C, int G>
void attend_group(const float* q, const T* const* keys, const T* const* values, int64_t len, int64_t tpb, int64_t hd,
                  float scale, T* out, float* scores, int64_t ld) {
  __m512 qv[G][C];
  for (int h = 0; h < G; h++)
    for (int i = 0; i < C; i++) qv[h][i] = load16(q + h * hd + i * kBlock, tail_mask(hd, i * kBlock));
  float mx[G];
  for (int h = 0; h < G; h++) mx[h] = -INFINITY;
  const int64_t nb = (len + tpb - 1) / tpb;
  for (int64_t j = 0; j < nb; j++) {
    const int64_t n = std::min(tpb, len - j * tpb);
    const T* kb = keys[j];
    float* sc = scores + j * tpb;
    int64_t l = 0;
    for (; l + 4 <= n; l += 4) keys_dot<T, C, G, 4>(qv, kb + l * hd, hd, scale, sc + l, ld, mx);
    for (; l < n; l++) keys_dot<T, C, G, 1>(qv, kb + l * hd, hd, scale, sc + l, ld, mx);
  }
  __m512 inv[G];
  for (int h = 0; h < G; h++) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t l = 0; l < len; l += kBlock) {
      const __mmask16 m = tail_mask(len, l);
      float* sc = scores + h * ld + l;
      const __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(load16(sc, m), _mm512_set1_ps(mx[h]))));
      store16(sc, e, m);
      sum = _mm512_add_ps(sum, e);
    }
    inv[h] = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
  }
  __m512 acc[G][C];
  for (int h = 0; h < G; h++)
    for (int i = 0; i < C; i++) acc[h][i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nb; j++) {
    const int64_t n = std::min(tpb, len - j * tpb);
    const T* vb = values[j];
    const float* sc = scores + j * tpb;
    for (int64_t p = 0; p < n; p++) {
      __m512 w[G];
      for (int h = 0; h < G; h++) w[h] = _mm512_set1_ps(sc[h * ld + p]);
      for (int i = 0; i < C; i++) {
        const __m512 v = load16(vb + p * hd + i * kBlock, tail_mask(hd, i * kBlock));
        for (int h = 0; h < G; h++) acc[h][i] = _mm512_fmadd_ps(w[h], v, acc[h][i]);
      }
    }
  }
  for (int h = 0; h < G; h++)
    for (int i = 0; i < C; i++)
      store16(out + h * hd + i * kBlock, _mm512_mul_ps(acc[h][i], inv[h]), tail_mask(hd, i * kBlock));
}

// attend_group for n (1..G) heads, G chosen at compile time.
template <typename T, int C, int G>
void attend_n(int64_t n, const float* q, const T* const* keys, const T* const* values, int64_t len, int64_t tpb,
              int64_t hd, float scale, T* out, float* scores, int64_t ld) {
  if constexpr (G > 1)
    if (n < G) return attend_n<T, C, G - 1>(n, q, keys, values, len, tpb, hd, scale, out, scores, ld);
  attend_group<T, C, G>(q, keys, values, len, tpb, hd, scale, out, scores, ld);
}

// One (row, kv head): its g query heads q [g, hd] -> out [g, hd], in groups of as many heads as the registers
// hold (G·C query and G·C value accumulators, G·4 score accumulators).
template <typename T, int C>
void attend_head(const float* q, int64_t g, const T* const* keys, const T* const* values, int64_t len, int64_t tpb,
                 int64_t hd, float scale, T* out, std::vector<float>& scores) {
  // float32: one head at a time — grouped, it ran 0.51-0.80x as fast (attention alone, 9/3/64 heads, contexts
  // 40-1000, batch 8 and 32; bfloat16 grouped 0.98-1.08x).
  constexpr int kG = std::is_same_v<T, float> ? 1 : C <= 2 ? 4 : C <= 4 ? 3 : C <= 6 ? 2 : 1;
  const int64_t ld = (len + kBlock - 1) / kBlock * kBlock;
  scores.resize(kG * ld);
  for (int64_t h = 0; h < g; h += kG)
    attend_n<T, C, kG>(std::min<int64_t>(kG, g - h), q + h * hd, keys, values, len, tpb, hd, scale, out + h * hd,
                       scores.data(), ld);
}

// attend_head with C = ceil(hd / 16) as a compile-time constant.
template <typename T>
void attend_head_any(const float* q, int64_t g, const T* const* keys, const T* const* values, int64_t len, int64_t tpb,
                     int64_t hd, float scale, T* out, std::vector<float>& scores) {
  switch ((hd + kBlock - 1) / kBlock) {
#define HEAD(c) \
  case c: return attend_head<T, c>(q, g, keys, values, len, tpb, hd, scale, out, scores);
    HEAD(1) HEAD(2) HEAD(3) HEAD(4) HEAD(5) HEAD(6) HEAD(7) HEAD(8)
    HEAD(9) HEAD(10) HEAD(11) HEAD(12) HEAD(13) HEAD(14) HEAD(15) HEAD(16)
#undef HEAD
  }
}

// The cache of one layer is [num_blocks, nkv, tpb, hd]; row b's position p lives in block table[b][p / tpb] at
// offset p % tpb (TensorRT-LLM's paged layout: a block holds all kv heads of tpb tokens).
template <typename T>
void attend_rows(const T* qkv, int64_t ld, const T* cos, const T* sin, const int64_t* pos, const int32_t* tables,
                 int64_t width, T* kc, T* vc, T* out, int64_t B, int64_t nh, int64_t nkv, int64_t hd, int64_t tpb,
                 int64_t num_blocks) {
  const int64_t g = nh / nkv, qd = nh * hd, kvd = nkv * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  int64_t work = 0;
  for (int64_t b = 0; b < B; b++) {
    TORCH_CHECK(pos[b] >= 0 && pos[b] < width * tpb, "attend_decode: position ", pos[b], " outside the block table");
    for (int64_t j = 0; j <= pos[b] / tpb; j++)
      TORCH_CHECK(tables[b * width + j] >= 0 && tables[b * width + j] < num_blocks, "attend_decode: bad block id");
    work += (pos[b] + 1) * nh * hd;
  }
  const int64_t units = B * nkv, grain = work < attend_split.load(std::memory_order_relaxed) ? units : 1;
  // this token's slot: offset p % tpb of block table[b][p / tpb], kv head h
  auto slot = [&](int64_t b, int64_t h) {
    const int64_t p = pos[b];
    return (static_cast<int64_t>(tables[b * width + p / tpb]) * nkv + h) * tpb * hd + (p % tpb) * hd;
  };
  // Decode rows (one per sequence) never read each other's slots: store and attend in one pass, one wake-up
  // of the workers per layer.
  auto store = [&](int64_t b, int64_t h) {
    const T* row = qkv + b * ld;
    rope(row + qd + h * hd, cos + pos[b] * hd, sin + pos[b] * hd, hd, kc + slot(b, h));
    std::memcpy(vc + slot(b, h), row + qd + kvd + h * hd, hd * sizeof(T));
  };
  parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    thread_local std::vector<float> scores, q;  // per thread, reused: a step allocates nothing here
    thread_local std::vector<const T*> kb, vb;
    q.resize(g * hd);
    for (int64_t u = u0; u < u1; u++) {
      const int64_t b = u / nkv, h = u % nkv, p = pos[b], nb = p / tpb + 1;
      // this unit's keys and values when it is the first, and the next unit's while this one computes
      for (int64_t n = u == u0 ? u : u + 1; n <= u + 1 && n < u1; n++)
        prefetch_kv(kc, vc, tables + (n / nkv) * width, n % nkv, nkv, tpb, hd, pos[n / nkv] + 1);
      const T* row = qkv + b * ld;
      store(b, h);
      kb.resize(nb), vb.resize(nb);
      for (int64_t j = 0; j < nb; j++) {
        const int64_t tile = (static_cast<int64_t>(tables[b * width + j]) * nkv + h) * tpb * hd;
        kb[j] = kc + tile, vb[j] = vc + tile;
      }
      for (int64_t j = 0; j < g; j++) rope(row + (h * g + j) * hd, cos + p * hd, sin + p * hd, hd, q.data() + j * hd);
      attend_head_any(q.data(), g, kb.data(), vb.data(), p + 1, tpb, hd, scale, out + b * qd + h * g * hd, scores);
    }
  });
}

}  // namespace

void set_attend_split(int64_t work) { attend_split.store(std::max<int64_t>(work, 0)); }

// qkv [B, q + 2kv] (this step's projections), cos/sin [L, hd], positions [B], kc/vc this layer's paged cache
// [num_blocks, kv, tpb, hd], tables [B, W] int32 block tables: rotates q and k, stores k and v at each row's
// position, returns attention [B, q].
torch::Tensor attend_decode(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                            const torch::Tensor& positions, torch::Tensor& kc, torch::Tensor& vc,
                            const torch::Tensor& tables, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
              "attend_decode: cache and tables must be contiguous");
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= kMaxHeadDim, "attend_decode: head_dim must be even, at most 256");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "attend_decode: positions int64");
  TORCH_CHECK(kc.dim() == 4 && kc.size(1) == num_kv_heads && kc.size(3) == head_dim && kc.size(2) % 4 == 0 &&
                  vc.sizes() == kc.sizes(),
              "attend_decode: cache must be [num_blocks, kv_heads, tokens_per_block (multiple of 4), head_dim]");
  TORCH_CHECK(tables.scalar_type() == at::kInt && tables.is_contiguous() && tables.dim() == 2 &&
                  tables.size(0) == qkv.size(0) && positions.numel() == qkv.size(0),
              "attend_decode: tables must be int32 [B, W]");
  const int64_t B = qkv.size(0);
  auto out = torch::empty({B, num_heads * head_dim}, qkv.options());
  dispatch(qkv.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    attend_rows<T>(qkv.data_ptr<T>(), qkv.stride(0), cos.data_ptr<T>(), sin.data_ptr<T>(), positions.data_ptr<int64_t>(),
                   tables.data_ptr<int32_t>(), tables.size(1), kc.data_ptr<T>(), vc.data_ptr<T>(), out.data_ptr<T>(), B,
                   num_heads, num_kv_heads, head_dim, kc.size(2), kc.size(0));
  });
  return out;
}

}  // namespace trtllm_peft
