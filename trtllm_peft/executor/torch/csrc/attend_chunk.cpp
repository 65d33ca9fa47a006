// Chunk attention over the paged KV cache: n consecutive prompt tokens of one sequence (positions
// start..start+n-1, one block table), causal within the chunk, over every cached position before it.
//
// The decode kernel would read each K/V block once per token; here a unit of work is (kv head, tile of up to
// kTileRows rows), and each K/V block is read once for all the unit's queries (its rows × the kv head's g query
// heads): K is transposed (register shuffles) into a [hd, 16·k] tile in L1 so that sixteen scores come out of
// one register per query with no horizontal sums, then V is accumulated block by block. Two passes as the decode kernel (exact
// max, then exp and the weighted sum), so the numbers match it. Units spread over the kernels' threads.

#include "rope.h"

namespace trtllm_peft {
namespace {

constexpr int64_t kTileRows = 8;  // rows per unit: enough queries per K/V block, enough units for two threads

// Per-thread buffers of one unit, reused across units and calls.
struct ChunkScratch {
  std::vector<float> q, kt, scores, acc;  // q [Q, hd], kt [hd, tpb16], scores [Q, L16], acc [Q, hd]
};

// scores[q][t] = scale · q · k_t for Q queries and V·16 keys at once: Q·V independent accumulators keep both FMA
// ports busy (a chain per register would wait on the FMA latency), and each K vector loaded serves Q queries.
template <int Q, int V>
inline void scores_tile(const float* q, int64_t hd, const float* kt, int64_t ld, __m512 sc, float* scores,
                        int64_t lds) {
  __m512 acc[Q][V];
  for (int i = 0; i < Q; i++)
    for (int j = 0; j < V; j++) acc[i][j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < hd; d++) {
    __m512 k[V];
    for (int j = 0; j < V; j++) k[j] = _mm512_loadu_ps(kt + d * ld + j * kBlock);
    for (int i = 0; i < Q; i++) {
      const __m512 b = _mm512_set1_ps(q[i * hd + d]);
      for (int j = 0; j < V; j++) acc[i][j] = _mm512_fmadd_ps(b, k[j], acc[i][j]);
    }
  }
  for (int i = 0; i < Q; i++)
    for (int j = 0; j < V; j++) _mm512_storeu_ps(scores + i * lds + j * kBlock, _mm512_mul_ps(acc[i][j], sc));
}

// Q queries (Q < kScoreQ) against the block's keys, two vectors at a time (kt is zero-padded to ld).
template <int Q>
void scores_rows(const float* q, int64_t hd, const float* kt, int64_t ld, int64_t n, __m512 sc, float* scores,
                 int64_t lds) {
  int64_t c = 0;
  for (; c + 2 * kBlock <= ld && c < n; c += 2 * kBlock) scores_tile<Q, 2>(q, hd, kt + c, ld, sc, scores + c, lds);
  for (; c < n; c += kBlock) scores_tile<Q, 1>(q, hd, kt + c, ld, sc, scores + c, lds);
}

constexpr int kScoreQ = 6;  // queries per score tile: 6 × 2 accumulators + 2 K vectors + a broadcast

// scores[q][t] = scale · q · k_t for the block's n keys (kt: K transposed, [hd, ld]) and all nq queries.
void block_scores(const float* q, int64_t nq, int64_t hd, const float* kt, int64_t ld, int64_t n, float scale,
                  float* scores, int64_t lds) {
  const __m512 sc = _mm512_set1_ps(scale);
  int64_t r = 0;
  for (; r + kScoreQ <= nq; r += kScoreQ) scores_rows<kScoreQ>(q + r * hd, hd, kt, ld, n, sc, scores + r * lds, lds);
  switch (nq - r) {
#define ROWS(k) \
  case k: return scores_rows<k>(q + r * hd, hd, kt, ld, n, sc, scores + r * lds, lds);
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
// K tile [n, hd] -> kt [hd, ld] float32 (columns n..ld-1 zero), 16 keys × 16 dims per register transpose.
template <typename T>
inline void transpose_keys(const T* k, int64_t n, int64_t hd, float* kt, int64_t ld) {
  for (int64_t c = 0; c < ld; c += kBlock) {
    for (int64_t d0 = 0; d0 < hd; d0 += kBlock) {
      const __mmask16 m = tail_mask(hd, d0);
      __m512 r[kBlock];
      for (int i = 0; i < kBlock; i++) r[i] = c + i < n ? load16(k + (c + i) * hd + d0, m) : _mm512_setzero_ps();
      transpose16x16(r);
      for (int64_t i = 0; i < std::min(kBlock, hd - d0); i++) _mm512_storeu_ps(kt + (d0 + i) * ld + c, r[i]);
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

// One unit: kv head h, rows r0..r1-1 of the chunk (their g query heads each) -> out rows [r, h·g·hd ...).
template <typename T>
void chunk_unit(const ChunkShape& s, const T* qkv, const T* cos, const T* sin, const int32_t* table, const T* kc,
                const T* vc, T* out, int64_t h, int64_t r0, int64_t r1, ChunkScratch& w) {
  const int64_t g = s.nh / s.nkv, hd = s.hd, tpb = s.tpb, nq = (r1 - r0) * g;
  const int64_t len = s.start + r1, nb = (len + tpb - 1) / tpb;  // the last row sees positions 0..len-1
  const int64_t ldk = (tpb + kBlock - 1) / kBlock * kBlock, lds = nb * tpb + kBlock;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  w.q.resize(nq * hd), w.kt.resize(hd * ldk), w.scores.resize(nq * lds), w.acc.assign(nq * hd, 0.0f);
  std::vector<int64_t> seen(nq);  // keys query r sees in the current block
  for (int64_t r = r0; r < r1; r++) {
    const int64_t p = s.start + r;
    for (int64_t j = 0; j < g; j++)
      rope(qkv + r * s.ld + (h * g + j) * hd, cos + p * hd, sin + p * hd, hd, w.q.data() + ((r - r0) * g + j) * hd);
  }
  auto tile = [&](int64_t j) { return (static_cast<int64_t>(table[j]) * s.nkv + h) * tpb * hd; };
  // The blocks are scattered in the pool and a long context's K/V is not in cache (each layer's weights stream
  // through it between two layers' attention): the next block is fetched while this one is computed, or each
  // block's first lines would wait on DRAM with one stream per thread.
  auto prefetch = [&](const T* c, int64_t j) {
    if (j >= nb) return;
    const char* b = reinterpret_cast<const char*>(c + tile(j));
    for (int64_t o = 0; o < tpb * hd * static_cast<int64_t>(sizeof(T)); o += 64) _mm_prefetch(b + o, _MM_HINT_T0);
  };
  prefetch(kc, 0);
  for (int64_t j = 0; j < nb; j++) {  // pass 1: every query's scores, each K block transposed once
    const int64_t n = std::min(tpb, len - j * tpb);
    prefetch(kc, j + 1);
    transpose_keys(kc + tile(j), n, hd, w.kt.data(), ldk);
    block_scores(w.q.data(), nq, hd, w.kt.data(), ldk, n, scale, w.scores.data() + j * tpb, lds);
  }
  prefetch(vc, 0);  // while the exponentials are computed
  std::vector<float> sums(nq);
  for (int64_t r = 0; r < nq; r++) sums[r] = exp_in_place(w.scores.data() + r * lds, s.start + r0 + r / g + 1);
  for (int64_t j = 0; j < nb; j++) {  // pass 2: the weighted values, each V block read once
    prefetch(vc, j + 1);
    for (int64_t r = 0; r < nq; r++) seen[r] = std::clamp<int64_t>(s.start + r0 + r / g + 1 - j * tpb, 0, tpb);
    block_values_any(vc + tile(j), hd, w.scores.data() + j * tpb, lds, seen.data(), nq, w.acc.data());
  }
  for (int64_t r = 0; r < nq; r++) {
    const __m512 inv = _mm512_set1_ps(1.0f / sums[r]);
    T* o = out + (r0 + r / g) * s.nh * hd + (h * g + r % g) * hd;
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
  parallel_for(0, units, work < 262144 ? units : 1, [&](int64_t u0, int64_t u1) {
    thread_local ChunkScratch scratch;
    for (int64_t u = u0; u < u1; u++) {
      const int64_t h = u % s.nkv, r0 = u / s.nkv * kTileRows;
      chunk_unit<T>(s, qkv, cos, sin, table, kc, vc, out, h, r0, std::min(r0 + kTileRows, s.n), scratch);
    }
  });
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

// A prefill's fresh chunks (nothing cached before them): qkv [F, q + 2kv] at positions [F] -> q and k rotated
// into qk [F, heads + kv, hd] (what model.py's torch SDPA reads), and k (rotated) and v stored at the cache
// rows [F·kv] of this layer viewed as [num_blocks·kv·tpb, hd] (PagedKVCache.rows): one pass over the rows
// instead of torch's gather of the cos/sin rows, cat, two products, a sum and two index_copy_ (~1 ms a layer
// at 512 tokens). Same rounding as model.py's rope (rope.h), so the same bits.
torch::Tensor fresh_qkv(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& positions, torch::Tensor& kc, torch::Tensor& vc, const torch::Tensor& rows,
                        int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
              "fresh_qkv: cache and tables must be contiguous");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type() &&
                  kc.scalar_type() == qkv.scalar_type() && vc.scalar_type() == qkv.scalar_type(),
              "fresh_qkv: qkv, cos, sin and the cache must have one dtype");
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= kMaxHeadDim, "fresh_qkv: head_dim must be even, at most 256");
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim && cos.size(1) == head_dim,
              "fresh_qkv: qkv must be [F, (heads + 2 kv_heads) · head_dim]");
  TORCH_CHECK(kc.dim() == 4 && kc.size(1) == num_kv_heads && kc.size(3) == head_dim && vc.sizes() == kc.sizes(),
              "fresh_qkv: cache must be [num_blocks, kv_heads, tokens_per_block, head_dim]");
  const int64_t n = qkv.size(0), slots = kc.numel() / head_dim;
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == n,
              "fresh_qkv: positions must be int64 [F]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.numel() == n * num_kv_heads,
              "fresh_qkv: rows must be int64 [F · kv_heads]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; i++) TORCH_CHECK(pos[i] >= 0 && pos[i] < cos.size(0), "fresh_qkv: bad position");
  for (int64_t i = 0; i < n * num_kv_heads; i++) TORCH_CHECK(slot[i] >= 0 && slot[i] < slots, "fresh_qkv: bad row");
  const int64_t nh = num_heads, nkv = num_kv_heads, hd = head_dim, heads = nh + nkv;
  auto qk = torch::empty({n, heads, hd}, qkv.options());
  dispatch(qkv.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T *x = qkv.data_ptr<T>(), *c = cos.data_ptr<T>(), *s = sin.data_ptr<T>();
    T *o = qk.data_ptr<T>(), *k = kc.data_ptr<T>(), *v = vc.data_ptr<T>();
    const int64_t ld = qkv.stride(0);
    parallel_for(0, n, row_grain(n, (heads + nkv) * hd), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; r++) {
        const T* row = x + r * ld;
        T* out = o + r * heads * hd;
        for (int64_t h = 0; h < heads; h++) rope(row + h * hd, c + pos[r] * hd, s + pos[r] * hd, hd, out + h * hd);
        for (int64_t h = 0; h < nkv; h++) {
          const int64_t at = slot[r * nkv + h] * hd;
          std::memcpy(k + at, out + (nh + h) * hd, hd * sizeof(T));
          std::memcpy(v + at, row + (heads + h) * hd, hd * sizeof(T));
        }
      }
    });
  });
  return qk;
}

}  // namespace trtllm_peft
