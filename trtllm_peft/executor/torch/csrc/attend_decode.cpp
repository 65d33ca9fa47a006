// Decode attention over the paged KV cache: one token per row, each row with its own block table.
// RoPE on q and k, k and v stored at the row's position, then attention over positions 0..pos.

#include <atomic>
#include <type_traits>

#include "rope.h"

namespace trtllm_peft {
namespace {

// Attention work (positions x query dims over the rows) below which a step's attention stays on the calling
// thread; set_streaming's attend_split (kernels.h kAttendSplit).
std::atomic<int64_t> attend_split{kAttendSplit};

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

// One load at the first and last byte of every K and V tile units u0..u1-1 read, before any of them is
// attended: the step's weight streaming evicted the TLB too, and these independent loads take the page walks
// together, where the attention loops and prefetches met them a unit at a time (attention alone, one thread,
// K/V cache evicted, 4 KB pages: 1.05-1.16x at b8-b32, both dtypes; on 2 MB pages no change).
template <typename T, typename Blocks, typename Tile>
void touch_tiles(const T* kc, const T* vc, int64_t u0, int64_t u1, Blocks blocks, Tile tile_of, int64_t tile) {
  const int64_t last = tile * static_cast<int64_t>(sizeof(T)) - 1;
  int sink = 0;
  for (int64_t u = u0; u < u1; u++)
    for (int64_t j = 0; j < blocks(u); j++) {
      const volatile char* k = reinterpret_cast<const char*>(kc + tile_of(u, j));
      const volatile char* v = reinterpret_cast<const char*>(vc + tile_of(u, j));
      sink += k[0] + v[0] + k[last] + v[last];
    }
  asm volatile("" : : "r"(sink));
}

// ---- q·k: 16 keys at a time, each key's dot products summed across lanes by one shared transpose ----------
// Per key and head the products accumulate in the lanes of one register (float32: 16 head dims a lane step;
// bfloat16: vdpbf16ps, 32 head dims, two products a lane, exact in float32). Summing each register's lanes
// alone (one _mm512_reduce_add_ps per key and head) costs ~8 dependent shuffles and adds a key; summing 16 keys'
// registers together as a transpose costs 45 for all 16 and leaves their scores in one register, in key order.

// x, y (keys a, b) -> per 128-bit lane [a0+a2, b0+b2, a1+a3, b1+b3].
inline __m512 pair_sum(__m512 x, __m512 y) { return _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y)); }
// pair sums of keys (a, b) and (c, d) -> element e of each 128-bit lane: that lane's sum of key a, b, c, d (e = 0..3).
inline __m512 quad_sum(__m512 t, __m512 u) {
  return _mm512_add_ps(_mm512_shuffle_ps(t, u, 0x44), _mm512_shuffle_ps(t, u, 0xEE));
}
// Two registers of 128-bit lane sums -> [v.L0+v.L1, v.L2+v.L3, w.L0+w.L1, w.L2+w.L3] (128-bit lanes).
inline __m512 lane_sum(__m512 v, __m512 w) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(v, w, 0x88), _mm512_shuffle_f32x4(v, w, 0xDD));
}

// The lanes one score register step covers: float32 16 head dims, bfloat16 32 (two per 32-bit lane).
template <typename T>
constexpr int64_t kDims = std::is_same_v<T, float> ? 16 : 32;
inline __m512 load_dims(const float* p, int64_t hd, int64_t i) { return load16(p + i, tail_mask(hd, i)); }
inline __m512 load_dims(const bf16* p, int64_t hd, int64_t i) {
  const __mmask32 m = hd - i >= 32 ? 0xFFFFFFFFu : (1u << (hd - i)) - 1;
  return _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, p + i));
}
inline __m512 dot_step(__m512 acc, __m512 q, __m512 k, float) { return _mm512_fmadd_ps(q, k, acc); }
inline __m512 dot_step(__m512 acc, __m512 q, __m512 k, bf16) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(q), reinterpret_cast<__m512bh>(k));
}

// a[h] = lanes of q_h·key (C steps of kDims<T> head dims).
template <typename T, int C, int G>
inline void key_dots(const __m512 (&qv)[G][C], const T* key, int64_t hd, __m512 (&a)[G]) {
  for (int h = 0; h < G; h++) a[h] = _mm512_setzero_ps();
  for (int i = 0; i < C; i++) {
    const __m512 k = load_dims(key, hd, i * kDims<T>);
    for (int h = 0; h < G; h++) a[h] = dot_step(a[h], qv[h][i], k, T{});
  }
}

// Keys 4s..4s+3 of a 16-key group (those below n; the others count zero) -> quad_sum registers per head.
template <typename T, int C, int G>
inline void quad_dots(const __m512 (&qv)[G][C], const T* keys, int64_t hd, int s, int64_t n, __m512 (&v)[G]) {
  __m512 a[4][G];
  for (int r = 0; r < 4; r++) {
    if (4 * s + r < n)
      key_dots<T, C, G>(qv, keys + (4 * s + r) * hd, hd, a[r]);
    else
      for (int h = 0; h < G; h++) a[r][h] = _mm512_setzero_ps();
  }
  for (int h = 0; h < G; h++) v[h] = quad_sum(pair_sum(a[0][h], a[1][h]), pair_sum(a[2][h], a[3][h]));
}

// scores[h·ld + r] = scale · q_h·key_r for the n (1..16) keys at `keys` (rows of hd); mx[h] = running max (lanes).
template <typename T, int C, int G>
inline void keys16(const __m512 (&qv)[G][C], const T* keys, int64_t n, int64_t hd, __m512 scale, float* scores,
                   int64_t ld, __m512 (&mx)[G]) {
  __m512 v0[G], v1[G], w[G], z[G];
  quad_dots<T, C, G>(qv, keys, hd, 0, n, v0);
  quad_dots<T, C, G>(qv, keys, hd, 1, n, v1);
  for (int h = 0; h < G; h++) w[h] = lane_sum(v0[h], v1[h]);
  for (int h = 0; h < G; h++) z[h] = _mm512_setzero_ps();
  if (n > 8) {
    quad_dots<T, C, G>(qv, keys, hd, 2, n, v0);
    quad_dots<T, C, G>(qv, keys, hd, 3, n, v1);
    for (int h = 0; h < G; h++) z[h] = lane_sum(v0[h], v1[h]);
  }
  const __mmask16 m = tail_mask(n, 0);
  for (int h = 0; h < G; h++) {
    const __m512 s = _mm512_mul_ps(lane_sum(w[h], z[h]), scale);
    _mm512_mask_storeu_ps(scores + h * ld, m, s);
    mx[h] = _mm512_mask_max_ps(mx[h], m, mx[h], s);
  }
}

// ---- weights·V --------------------------------------------------------------------------------------------

// float32: acc[h][i] += w[h][p] · V[p] over the n rows of one block.
template <int C, int G>
inline void block_values(const float* w, int64_t ld, const float* vb, int64_t n, int64_t hd, __m512 (&acc)[G][C]) {
  for (int64_t p = 0; p < n; p++) {
    __m512 wp[G];
    for (int h = 0; h < G; h++) wp[h] = _mm512_set1_ps(w[h * ld + p]);
    for (int i = 0; i < C; i++) {
      const __m512 v = load_dims(vb + p * hd, hd, i * 16);
      for (int h = 0; h < G; h++) acc[h][i] = _mm512_fmadd_ps(wp[h], v, acc[h][i]);
    }
  }
}

// bfloat16, two keys a vdpbf16ps: rows 2p and 2p+1 interleaved by unpacklo/hi_epi16 (per 128-bit lane L, 32-bit
// lane i of lo holds head dim 8L+i of both rows, of hi 8L+4+i: finish() puts the dims back in order) against the
// pair of bf16 weights w[2p], w[2p+1] (a missing odd row is zero: a stale slot may hold NaN, and NaN · 0 is NaN).
template <int C, int G>
inline void block_values(const bf16* w, int64_t ld, const bf16* vb, int64_t n, int64_t hd, __m512 (&acc)[G][2 * C]) {
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(w);
  for (int64_t p = 0; 2 * p < n; p++) {
    __m512i wv[G];
    for (int h = 0; h < G; h++) wv[h] = _mm512_set1_epi32(static_cast<int>(wp[(h * ld) / 2 + p]));
    for (int i = 0; i < C; i++) {
      const __m512i a = _mm512_castps_si512(load_dims(vb + 2 * p * hd, hd, i * 32));
      const __m512i b = 2 * p + 1 < n ? _mm512_castps_si512(load_dims(vb + (2 * p + 1) * hd, hd, i * 32))
                                      : _mm512_setzero_si512();
      const __m512 lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(a, b));
      const __m512 hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(a, b));
      for (int h = 0; h < G; h++) {
        acc[h][2 * i] = dot_step(acc[h][2 * i], _mm512_castsi512_ps(wv[h]), lo, bf16{});
        acc[h][2 * i + 1] = dot_step(acc[h][2 * i + 1], _mm512_castsi512_ps(wv[h]), hi, bf16{});
      }
    }
  }
}

// out[h] = acc[h] · inv[h] in head-dim order.
template <int C, int G>
inline void finish(const __m512 (&acc)[G][C], const __m512 (&inv)[G], int64_t hd, float* out) {
  for (int h = 0; h < G; h++)
    for (int i = 0; i < C; i++)
      store16(out + h * hd + i * 16, _mm512_mul_ps(acc[h][i], inv[h]), tail_mask(hd, i * 16));
}
template <int C, int G>
inline void finish(const __m512 (&acc)[G][2 * C], const __m512 (&inv)[G], int64_t hd, bf16* out) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int h = 0; h < G; h++)
    for (int i = 0; i < C; i++) {
      const __m512 lo = acc[h][2 * i], hi = acc[h][2 * i + 1];
      bf16* o = out + h * hd + i * 32;
      store16(o, _mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), inv[h]), tail_mask(hd, i * 32));
      if (hd > i * 32 + 16)
        store16(o + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), inv[h]), tail_mask(hd, i * 32 + 16));
    }
}

// scores [G, ld] (ld: len rounded up to 16, zero past len) -> exp(s - max) in place; weights [G, ld] in T
// (bfloat16: rounded, as torch's bf16 SDPA rounds them before the product with V; float32: the scores
// themselves); inv[h] = 1 / Σ exp (the float32 sum, as torch's).
template <typename T, int G>
inline void softmax(float* scores, int64_t len, int64_t ld, const __m512 (&mx)[G], T* weights, __m512 (&inv)[G]) {
  for (int h = 0; h < G; h++) {
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx[h]));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t l = 0; l < ld; l += kBlock) {
      const __mmask16 m = tail_mask(len, std::min(l, len));
      float* sc = scores + h * ld + l;
      const __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(load16(sc, m), top)));
      sum = _mm512_add_ps(sum, e);
      if constexpr (std::is_same_v<T, float>)
        store16(sc, e);
      else
        store16(weights + h * ld + l, e);
    }
    inv[h] = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
  }
}

// G query heads of one kv head, q [G, hd] (T: exact, RoPE rounds it) over cache positions 0..len-1 -> out
// [G, hd]. C = compile-time register steps of the head dim (so the accumulators stay in registers); each key and
// value is loaded once for all G heads. The positions live in blocks of `tpb` tokens: keys[j] / values[j] point
// at block j's [tpb, hd] tile of this kv head, so the paged layout costs one pointer per block. scores: [G, ld]
// float32 scratch, weights: [G, ld] T scratch (bfloat16). Per head the arithmetic is that of one head alone.
template <typename T, int C, int G>
void attend_group(const T* q, const T* const* keys, const T* const* values, int64_t len, int64_t tpb, int64_t hd,
                  float scale, T* out, float* scores, T* weights, int64_t ld) {
  __m512 qv[G][C];
  for (int h = 0; h < G; h++)
    for (int i = 0; i < C; i++) qv[h][i] = load_dims(q + h * hd, hd, i * kDims<T>);
  __m512 mx[G];
  for (int h = 0; h < G; h++) mx[h] = _mm512_set1_ps(-INFINITY);
  const __m512 sv = _mm512_set1_ps(scale);
  const int64_t nb = (len + tpb - 1) / tpb;
  for (int64_t j = 0; j < nb; j++) {
    const int64_t n = std::min(tpb, len - j * tpb);
    for (int64_t l = 0; l < n; l += 16)
      keys16<T, C, G>(qv, keys[j] + l * hd, std::min<int64_t>(16, n - l), hd, sv, scores + j * tpb + l, ld, mx);
  }
  __m512 inv[G];
  constexpr bool kFloat = std::is_same_v<T, float>;
  softmax<T, G>(scores, len, ld, mx, weights, inv);
  constexpr int A = kFloat ? C : 2 * C;  // bfloat16: lo and hi registers of each 32 head dims
  __m512 acc[G][A];
  for (int h = 0; h < G; h++)
    for (int i = 0; i < A; i++) acc[h][i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nb; j++) {
    const int64_t n = std::min(tpb, len - j * tpb);
    if constexpr (kFloat)
      block_values<C, G>(scores + j * tpb, ld, values[j], n, hd, acc);
    else
      block_values<C, G>(weights + j * tpb, ld, values[j], n, hd, acc);
  }
  finish<C, G>(acc, inv, hd, out);
}

// attend_group for n (1..G) heads, G chosen at compile time.
template <typename T, int C, int G>
void attend_n(int64_t n, const T* q, const T* const* keys, const T* const* values, int64_t len, int64_t tpb,
              int64_t hd, float scale, T* out, float* scores, T* weights, int64_t ld) {
  if constexpr (G > 1)
    if (n < G) return attend_n<T, C, G - 1>(n, q, keys, values, len, tpb, hd, scale, out, scores, weights, ld);
  attend_group<T, C, G>(q, keys, values, len, tpb, hd, scale, out, scores, weights, ld);
}

// One (row, kv head): its g query heads q [g, hd] -> out [g, hd], in groups of as many heads as the registers
// hold.
template <typename T, int C>
void attend_head(const T* q, int64_t g, const T* const* keys, const T* const* values, int64_t len, int64_t tpb,
                 int64_t hd, float scale, T* out, std::vector<float>& scores, std::vector<T>& weights) {
  constexpr int kG = std::is_same_v<T, float> ? (C <= 2 ? 3 : 1) : C <= 2 ? 3 : C <= 4 ? 2 : 1;
  const int64_t ld = (len + kBlock - 1) / kBlock * kBlock;
  scores.resize(kG * ld);
  if constexpr (!std::is_same_v<T, float>) weights.resize(kG * ld);
  for (int64_t h = 0; h < g; h += kG)
    attend_n<T, C, kG>(std::min<int64_t>(kG, g - h), q + h * hd, keys, values, len, tpb, hd, scale, out + h * hd,
                       scores.data(), weights.data(), ld);
}

// attend_head with C = ceil(hd / kDims<T>) as a compile-time constant.
template <typename T>
void attend_head_any(const T* q, int64_t g, const T* const* keys, const T* const* values, int64_t len, int64_t tpb,
                     int64_t hd, float scale, T* out, std::vector<float>& scores, std::vector<T>& weights) {
  switch ((hd + kDims<T> - 1) / kDims<T>) {
#define HEAD(c) \
  case c: return attend_head<T, c>(q, g, keys, values, len, tpb, hd, scale, out, scores, weights);
    HEAD(1) HEAD(2) HEAD(3) HEAD(4) HEAD(5) HEAD(6) HEAD(7) HEAD(8)
#undef HEAD
  }
  if constexpr (std::is_same_v<T, float>) {
    switch ((hd + 15) / 16) {
#define HEAD(c) \
  case c: return attend_head<T, c>(q, g, keys, values, len, tpb, hd, scale, out, scores, weights);
      HEAD(9) HEAD(10) HEAD(11) HEAD(12) HEAD(13) HEAD(14) HEAD(15) HEAD(16)
#undef HEAD
    }
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
  const int64_t units = B * nkv;
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
  auto tile_of = [&](int64_t u, int64_t j) {  // unit u = (row, kv head): offset of its block j's [tpb, hd] tile
    return (static_cast<int64_t>(tables[(u / nkv) * width + j]) * nkv + u % nkv) * tpb * hd;
  };
  auto attend_units = [&](int64_t u0, int64_t u1) {
    thread_local std::vector<float> scores;  // per thread, reused: a step allocates nothing here
    thread_local std::vector<T> q, weights;
    thread_local std::vector<const T*> kb, vb;
    q.resize(g * hd);
    touch_tiles(kc, vc, u0, u1, [&](int64_t u) { return pos[u / nkv] / tpb + 1; }, tile_of, tpb * hd);
    for (int64_t u = u0; u < u1; u++) {
      const int64_t b = u / nkv, h = u % nkv, p = pos[b], nb = p / tpb + 1;
      // this unit's keys and values when it is the first, and the next unit's while this one computes
      for (int64_t n = u == u0 ? u : u + 1; n <= u + 1 && n < u1; n++)
        prefetch_kv(kc, vc, tables + (n / nkv) * width, n % nkv, nkv, tpb, hd, pos[n / nkv] + 1);
      const T* row = qkv + b * ld;
      store(b, h);
      kb.resize(nb), vb.resize(nb);
      for (int64_t j = 0; j < nb; j++) kb[j] = kc + tile_of(u, j), vb[j] = vc + tile_of(u, j);
      for (int64_t j = 0; j < g; j++) rope(row + (h * g + j) * hd, cos + p * hd, sin + p * hd, hd, q.data() + j * hd);
      attend_head_any(q.data(), g, kb.data(), vb.data(), p + 1, tpb, hd, scale, out + b * qd + h * g * hd, scores,
                      weights);
    }
  };
  // Split: ~4 pieces a thread, handed out to whichever thread is free (a descheduled worker holds up one piece).
  const int64_t threads = work < attend_split.load(std::memory_order_relaxed) ? 1 : kernel_threads();
  const int64_t per = std::max<int64_t>(1, units / (4 * threads)), pieces = (units + per - 1) / per;
  if (threads == 1 || pieces == 1) return attend_units(0, units);
  parallel_pieces(pieces, [&](int64_t i) { attend_units(i * per, std::min(units, (i + 1) * per)); });
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
