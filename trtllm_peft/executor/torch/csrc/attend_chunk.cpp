// Chunk attention over the paged KV cache: n consecutive prompt tokens of one sequence (positions
// start..start+n-1, one block table), causal within the chunk, over every cached position before it.
//
// The decode kernel would read each K/V block once per token; here a unit of work is (kv head, tile of up to
// kTileRows rows), and each K/V block is read once for all the unit's queries (its rows × the kv head's g query
// heads): K is transposed (register shuffles) into a [hd, 16·k] tile in L1 so that sixteen scores come out of
// one register per query with no horizontal sums, then V is accumulated block by block. Two passes as the decode
// kernel (exact max, then exp and the weighted sum). Units spread over the kernels' threads.
//
// bfloat16 runs both products on vdpbf16ps (two head dims, or two keys, per 32-bit lane: twice the MACs of an
// FMA): q·k exactly as in float32 lanes (bf16 products are exact, float32 sums), the weights rounded to bf16
// before the weighted sum of V, as torch's bf16 SDPA does (their sum, the softmax's denominator, is not).

#include "attend_pairs.h"
#include "rope.h"

namespace trtllm_peft {
namespace {

constexpr int64_t kTileRows = 8;  // rows per unit: enough queries per K/V block, enough units for two threads

// Per-thread buffers of one unit, reused across units and calls. Lanes E of the products: float (float32
// caches) or uint32_t (bfloat16: a pair of bf16 in each 32-bit lane).
struct ChunkScratch {
  std::vector<float> q, kt, scores, acc;  // q [Q, hd], kt [hd, tpb16], scores [Q, L16], acc [Q, hd]
  std::vector<uint32_t> qp, ktp, vp, wp;  // bf16 pairs: q [Q, hd/2], kt [hd/2, tpb16], v [tpb/2, hd], w [Q, tpb/2]
  template <typename E>
  E* qs() { if constexpr (std::is_same<E, float>::value) return q.data(); else return qp.data(); }
  template <typename E>
  E* kts() { if constexpr (std::is_same<E, float>::value) return kt.data(); else return ktp.data(); }
};

// scores[q][t] = scale · q · k_t for Q queries and V·16 keys at once: Q·V independent accumulators keep both FMA
// ports busy (a chain per register would wait on the FMA latency), and each K vector loaded serves Q queries.
// `steps` lanes per query (hd, or hd/2 bf16 pairs).
template <typename E, int Q, int V>
inline void scores_tile(const E* q, int64_t steps, const E* kt, int64_t ld, __m512 sc, float* scores, int64_t lds) {
  __m512 acc[Q][V];
  for (int i = 0; i < Q; i++)
    for (int j = 0; j < V; j++) acc[i][j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < steps; d++) {
    __m512 k[V];
    for (int j = 0; j < V; j++) k[j] = load_lanes(kt + d * ld + j * kBlock);
    for (int i = 0; i < Q; i++)
      for (int j = 0; j < V; j++) acc[i][j] = mac(acc[i][j], q[i * steps + d], k[j]);
  }
  for (int i = 0; i < Q; i++)
    for (int j = 0; j < V; j++) _mm512_storeu_ps(scores + i * lds + j * kBlock, _mm512_mul_ps(acc[i][j], sc));
}

// Q queries (Q < kScoreQ) against the block's keys, two vectors at a time (kt is zero-padded to ld).
template <typename E, int Q>
void scores_rows(const E* q, int64_t steps, const E* kt, int64_t ld, int64_t n, __m512 sc, float* scores,
                 int64_t lds) {
  int64_t c = 0;
  for (; c + 2 * kBlock <= ld && c < n; c += 2 * kBlock)
    scores_tile<E, Q, 2>(q, steps, kt + c, ld, sc, scores + c, lds);
  for (; c < n; c += kBlock) scores_tile<E, Q, 1>(q, steps, kt + c, ld, sc, scores + c, lds);
}

constexpr int kScoreQ = 6;  // queries per score tile: 6 × 2 accumulators + 2 K vectors + a broadcast

// scores[q][t] = scale · q · k_t for the block's n keys (kt: K transposed, [steps, ld]) and all nq queries.
template <typename E>
void block_scores(const E* q, int64_t nq, int64_t steps, const E* kt, int64_t ld, int64_t n, float scale,
                  float* scores, int64_t lds) {
  const __m512 sc = _mm512_set1_ps(scale);
  int64_t r = 0;
  for (; r + kScoreQ <= nq; r += kScoreQ)
    scores_rows<E, kScoreQ>(q + r * steps, steps, kt, ld, n, sc, scores + r * lds, lds);
  switch (nq - r) {
#define ROWS(k) \
  case k: return scores_rows<E, k>(q + r * steps, steps, kt, ld, n, sc, scores + r * lds, lds);
    ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5)
#undef ROWS
  }
}

// r[i] = row i of a 16×16 float32 tile -> r[i] = column i (3 shuffle stages, 64 shuffles: ~4× cheaper than
// 16 gathers, which also wait on every line they touch).
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; i++) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; i++) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}
// 16 lanes E of key row `row` from lane i: float32 head dims, or bf16 pairs of head dims as they lie in the row.
template <typename E, typename T>
inline __m512 key_lanes(const T* row, int64_t i, __mmask16 m) {
  if constexpr (std::is_same<E, float>::value)
    return load16(row + i, m);
  else
    return _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(m, reinterpret_cast<const uint32_t*>(row) + i));
}

// K tile [n, hd] -> kt [steps, ld] of lanes E (columns n..ld-1 zero), 16 keys × 16 lanes per register transpose
// (the shuffles move bits: a bf16 pair goes through as one float32 lane).
template <typename E, typename T>
inline void transpose_keys(const T* k, int64_t n, int64_t hd, E* kt, int64_t ld) {
  const int64_t steps = lanes<E>(hd);
  for (int64_t c = 0; c < ld; c += kBlock) {
    for (int64_t d0 = 0; d0 < steps; d0 += kBlock) {
      const __mmask16 m = tail_mask(steps, d0);
      __m512 r[kBlock];
      for (int i = 0; i < kBlock; i++) r[i] = c + i < n ? key_lanes<E>(k + (c + i) * hd, d0, m) : _mm512_setzero_ps();
      transpose16x16(r);
      for (int64_t i = 0; i < std::min(kBlock, steps - d0); i++)
        _mm512_storeu_ps(reinterpret_cast<float*>(kt + (d0 + i) * ld + c), r[i]);
    }
  }
}

// softmax of scores[0, len) in place (max subtracted, unnormalized); returns the sum of the exponentials.
float exp_in_place(float* scores, int64_t len) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t l = 0; l < len; l += kBlock) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, tail_mask(len, l), scores + l));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t l = 0; l < len; l += kBlock) {
    const __mmask16 k = tail_mask(len, l);
    const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(load16(scores + l, k), m)));
    store16(scores + l, e, k);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// acc[q] += Σ_{p in [p0, p1)} w[q][p] · V[p] for G queries at once, C = hd / 16 known at compile time: the G·C
// accumulators stay in registers, and each V row loaded (from L1) serves all G queries.
template <typename T, int C, int G>
inline void values_tile(const T* v, int64_t hd, const float* w, int64_t ldw, int64_t p0, int64_t p1, float* acc) {
  // masks only when hd is not a multiple of 16 (the common head sizes are): the unmasked loop keeps all G·C
  // accumulators in registers
  const __mmask16 last = tail_mask(hd, (C - 1) * kBlock);
  __m512 a[G][C];
#pragma GCC unroll 16
  for (int g = 0; g < G; g++)
#pragma GCC unroll 16
    for (int i = 0; i < C; i++) a[g][i] = load16(acc + g * hd + i * kBlock, i == C - 1 ? last : 0xFFFF);
  for (int64_t p = p0; p < p1; p++) {
    __m512 x[C];
#pragma GCC unroll 16
    for (int i = 0; i < C; i++) x[i] = load16(v + p * hd + i * kBlock, i == C - 1 ? last : 0xFFFF);
#pragma GCC unroll 16
    for (int g = 0; g < G; g++) {
      const __m512 s = _mm512_set1_ps(w[g * ldw + p]);
#pragma GCC unroll 16
      for (int i = 0; i < C; i++) a[g][i] = _mm512_fmadd_ps(s, x[i], a[g][i]);
    }
  }
#pragma GCC unroll 16
  for (int g = 0; g < G; g++)
#pragma GCC unroll 16
    for (int i = 0; i < C; i++) store16(acc + g * hd + i * kBlock, a[g][i], i == C - 1 ? last : 0xFFFF);
}

// Every query's weighted values of one block: queries in groups of G over the keys all of the group see (seen[]
// is non-decreasing: later rows see more), then each query alone over the rest of its own keys.
template <typename T, int C>
void block_values(const T* v, int64_t hd, const float* w, int64_t ldw, const int64_t* seen, int64_t nq, float* acc) {
  constexpr int G = C <= 2 ? 8 : C <= 4 ? 4 : C <= 8 ? 2 : 1;
  int64_t r = 0;
  for (; G > 1 && r + G <= nq; r += G) {
    values_tile<T, C, G>(v, hd, w + r * ldw, ldw, 0, seen[r], acc + r * hd);
    for (int g = 0; g < G; g++)
      values_tile<T, C, 1>(v, hd, w + (r + g) * ldw, ldw, seen[r], seen[r + g], acc + (r + g) * hd);
  }
  for (; r < nq; r++) values_tile<T, C, 1>(v, hd, w + r * ldw, ldw, 0, seen[r], acc + r * hd);
}

template <typename T>
void block_values_any(const T* v, int64_t hd, const float* w, int64_t ldw, const int64_t* seen, int64_t nq, float* acc) {
  switch ((hd + kBlock - 1) / kBlock) {
#define VALUES(c) \
  case c: return block_values<T, c>(v, hd, w, ldw, seen, nq, acc);
    VALUES(1) VALUES(2) VALUES(3) VALUES(4) VALUES(5) VALUES(6) VALUES(7) VALUES(8)
    VALUES(9) VALUES(10) VALUES(11) VALUES(12) VALUES(13) VALUES(14) VALUES(15) VALUES(16)
#undef VALUES
  }
}

struct ChunkShape {
  int64_t nh, nkv, hd, tpb, start, n, ld;
};

// One unit's geometry: kv head h, rows r0..r1-1 of the chunk, nq = their g query heads each.
struct Unit {
  int64_t h, r0, r1, g, nq, len, nb, ldk, lds;
  Unit(const ChunkShape& s, int64_t h_, int64_t r0_, int64_t r1_)
      : h(h_), r0(r0_), r1(r1_), g(s.nh / s.nkv), nq((r1_ - r0_) * g), len(s.start + r1_),
        nb((len + s.tpb - 1) / s.tpb), ldk((s.tpb + kBlock - 1) / kBlock * kBlock), lds(nb * s.tpb + kBlock) {}
  int64_t tile(const ChunkShape& s, const int32_t* table, int64_t j) const {  // block j's K (or V) of head h
    return (static_cast<int64_t>(table[j]) * s.nkv + h) * s.tpb * s.hd;
  }
  int64_t keys(int64_t start, int64_t r) const { return start + r0 + r / g + 1; }  // query r sees 0..keys-1
};

// The blocks are scattered in the pool and a long context's K/V is not in cache (each layer's weights stream
// through it between two layers' attention): the next block is fetched while this one is computed, or each
// block's first lines would wait on DRAM with one stream per thread.
template <typename T>
inline void prefetch_block(const T* c, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(c) + o, _MM_HINT_T0);
}

// Pass 1: the unit's queries rotated into lanes E, then every query's scores, each K block transposed once.
template <typename T, typename E = LanesOf<T>>
void unit_scores(const ChunkShape& s, const T* qkv, const T* cos, const T* sin, const int32_t* table, const T* kc,
                 const Unit& u, ChunkScratch& w) {
  const int64_t hd = s.hd, steps = lanes<E>(hd), bytes = s.tpb * hd * static_cast<int64_t>(sizeof(T));
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  if constexpr (std::is_same<E, float>::value)
    w.q.resize(u.nq * hd), w.kt.resize(hd * u.ldk);
  else
    w.qp.resize(u.nq * steps), w.ktp.resize(steps * u.ldk);
  for (int64_t r = u.r0; r < u.r1; r++) {
    const int64_t p = s.start + r;
    for (int64_t j = 0; j < u.g; j++) {
      const T* x = qkv + r * s.ld + (u.h * u.g + j) * hd;
      const int64_t at = ((r - u.r0) * u.g + j) * hd;
      if constexpr (std::is_same<E, float>::value)
        rope(x, cos + p * hd, sin + p * hd, hd, w.q.data() + at);
      else  // bf16 q (rope rounds it to bf16 anyway), read as pairs
        rope(x, cos + p * hd, sin + p * hd, hd, reinterpret_cast<T*>(w.qp.data()) + at);
    }
  }
  prefetch_block(kc + u.tile(s, table, 0), bytes);
  for (int64_t j = 0; j < u.nb; j++) {
    const int64_t n = std::min(s.tpb, u.len - j * s.tpb);
    if (j + 1 < u.nb) prefetch_block(kc + u.tile(s, table, j + 1), bytes);
    transpose_keys(kc + u.tile(s, table, j), n, hd, w.kts<E>(), u.ldk);
    block_scores(w.qs<E>(), u.nq, steps, w.kts<E>(), u.ldk, n, scale, w.scores.data() + j * s.tpb, u.lds);
  }
}

// Pass 2: the weighted values, each V block read once (bf16: interleaved into key pairs once for all queries).
template <typename T>
void unit_values(const ChunkShape& s, const int32_t* table, const T* vc, const Unit& u, ChunkScratch& w) {
  const int64_t hd = s.hd, tpb = s.tpb, bytes = tpb * hd * static_cast<int64_t>(sizeof(T)), ldw = (tpb + 1) / 2;
  std::vector<int64_t> seen(u.nq);  // keys query r sees in the current block
  if constexpr (!std::is_same<T, float>::value) w.vp.resize(ldw * hd), w.wp.resize(u.nq * ldw);
  for (int64_t j = 0; j < u.nb; j++) {
    if (j + 1 < u.nb) prefetch_block(vc + u.tile(s, table, j + 1), bytes);
    for (int64_t r = 0; r < u.nq; r++) seen[r] = std::clamp<int64_t>(u.keys(s.start, r) - j * tpb, 0, tpb);
    const T* v = vc + u.tile(s, table, j);
    const float* sc = w.scores.data() + j * tpb;
    if constexpr (std::is_same<T, float>::value) {
      block_values_any(v, hd, sc, u.lds, seen.data(), u.nq, w.acc.data());
    } else {
      const int64_t n = std::min(tpb, u.len - j * tpb), pairs = (n + 1) / 2;
      pair_values(v, n, hd, w.vp.data());
      for (int64_t r = 0; r < u.nq; r++) pair_weights(sc + r * u.lds, seen[r], pairs, w.wp.data() + r * ldw);
      block_values_pairs_any(w.vp.data(), hd, w.wp.data(), ldw, seen.data(), u.nq, w.acc.data());
    }
  }
}

// One unit: kv head h, rows r0..r1-1 of the chunk (their g query heads each) -> out rows [r, h·g·hd ...).
template <typename T>
void chunk_unit(const ChunkShape& s, const T* qkv, const T* cos, const T* sin, const int32_t* table, const T* kc,
                const T* vc, T* out, int64_t h, int64_t r0, int64_t r1, ChunkScratch& w) {
  const Unit u(s, h, r0, r1);
  const int64_t hd = s.hd, nq = u.nq;
  w.scores.resize(nq * u.lds), w.acc.assign(nq * hd, 0.0f);
  unit_scores(s, qkv, cos, sin, table, kc, u, w);
  prefetch_block(vc + u.tile(s, table, 0), s.tpb * hd * static_cast<int64_t>(sizeof(T)));  // during the exps
  std::vector<float> sums(nq);
  for (int64_t r = 0; r < nq; r++) sums[r] = exp_in_place(w.scores.data() + r * u.lds, u.keys(s.start, r));
  unit_values(s, table, vc, u, w);
  for (int64_t r = 0; r < nq; r++) {
    const __m512 inv = _mm512_set1_ps(1.0f / sums[r]);
    T* o = out + (r0 + r / u.g) * s.nh * hd + (h * u.g + r % u.g) * hd;
    for (int64_t i = 0; i < hd; i += kBlock)
      store16(o + i, _mm512_mul_ps(load16(w.acc.data() + r * hd + i, tail_mask(hd, i)), inv), tail_mask(hd, i));
  }
}

template <typename T>
void chunk_rows(const ChunkShape& s, const T* qkv, const T* cos, const T* sin, const int32_t* table, T* kc, T* vc,
                T* out) {
  const int64_t qd = s.nh * s.hd, kvd = s.nkv * s.hd, tpb = s.tpb, hd = s.hd;
  // every row's k and v first, so the rows see each other causally
  parallel_for(0, s.n * s.nkv, row_grain(s.n * s.nkv, hd), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; u++) {
      const int64_t r = u / s.nkv, h = u % s.nkv, p = s.start + r;
      const int64_t slot = (static_cast<int64_t>(table[p / tpb]) * s.nkv + h) * tpb * hd + (p % tpb) * hd;
      const T* row = qkv + r * s.ld;
      rope(row + qd + h * hd, cos + p * hd, sin + p * hd, hd, kc + slot);
      std::memcpy(vc + slot, row + qd + kvd + h * hd, hd * sizeof(T));
    }
  });
  const int64_t tiles = (s.n + kTileRows - 1) / kTileRows, units = tiles * s.nkv;
  const int64_t work = (s.start + s.n) * s.n * s.nh * hd;
  auto unit = [&](int64_t u) {
    thread_local ChunkScratch scratch;
    const int64_t h = u % s.nkv, r0 = u / s.nkv * kTileRows;
    chunk_unit<T>(s, qkv, cos, sin, table, kc, vc, out, h, r0, std::min(r0 + kTileRows, s.n), scratch);
  };
  if (work < 262144) {
    for (int64_t u = 0; u < units; u++) unit(u);
    return;
  }
  // Units handed out one at a time, the last rows (the most keys) first: a unit's cost grows with its rows'
  // positions, so halves of the rows in order gave a fresh 512-token chunk's second thread 3/4 of the work
  // (2 threads ran it 1.07x faster than one).
  parallel_pieces(units, [&](int64_t p) { unit(units - 1 - p); });
}

}  // namespace

// qkv [n, q + 2kv] (the chunk's projections, positions start..start+n-1), cos/sin [L, hd], kc/vc this layer's
// paged cache [num_blocks, kv, tpb, hd], table [W] int32 (the sequence's block table): rotates q and k, stores
// k and v, returns the causal attention of each row over positions 0..its own -> [n, q].
torch::Tensor attend_chunk(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                           int64_t start, torch::Tensor& kc, torch::Tensor& vc, const torch::Tensor& table,
                           int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
              "attend_chunk: cache and tables must be contiguous");
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= kMaxHeadDim, "attend_chunk: head_dim must be even, at most 256");
  TORCH_CHECK(num_heads % num_kv_heads == 0 && qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim,
              "attend_chunk: qkv must be [n, (heads + 2 kv_heads) · head_dim]");
  TORCH_CHECK(kc.dim() == 4 && kc.size(1) == num_kv_heads && kc.size(3) == head_dim && vc.sizes() == kc.sizes(),
              "attend_chunk: cache must be [num_blocks, kv_heads, tokens_per_block, head_dim]");
  TORCH_CHECK(table.scalar_type() == at::kInt && table.is_contiguous() && table.dim() == 1,
              "attend_chunk: table must be int32 [W]");
  const int64_t n = qkv.size(0), tpb = kc.size(2);
  TORCH_CHECK(start >= 0 && start + n <= table.numel() * tpb && start + n <= cos.size(0),
              "attend_chunk: positions ", start, "..", start + n - 1, " outside the block table");
  const int32_t* t = table.data_ptr<int32_t>();
  for (int64_t j = 0; j * tpb < start + n; j++)
    TORCH_CHECK(t[j] >= 0 && t[j] < kc.size(0), "attend_chunk: bad block id");
  auto out = torch::empty({n, num_heads * head_dim}, qkv.options());
  if (n == 0) return out;
  const ChunkShape s{num_heads, num_kv_heads, head_dim, tpb, start, n, qkv.stride(0)};
  dispatch(qkv.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    chunk_rows<T>(s, qkv.data_ptr<T>(), cos.data_ptr<T>(), sin.data_ptr<T>(), t, kc.data_ptr<T>(), vc.data_ptr<T>(),
                  out.data_ptr<T>());
  });
  return out;
}

}  // namespace trtllm_peft
