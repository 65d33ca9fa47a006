// bfloat16 lanes of the chunk-attention kernel (attend_chunk.cpp): two bf16 in each 32-bit lane, multiplied by
// vdpbf16ps (32 MACs an instruction, twice an FMA's). q·k pairs two head dims (the products are exact in float32,
// so only the order of the float32 sums differs from float32 lanes); weights·V pairs two keys, with the weights
// rounded to bf16 first, as torch's bf16 SDPA does.
#pragma once

#include <type_traits>

#include "kernels.h"

namespace trtllm_peft {
namespace {

template <typename T>
using LanesOf = std::conditional_t<std::is_same<T, float>::value, float, uint32_t>;
template <typename E>
constexpr int64_t lanes(int64_t hd) { return std::is_same<E, float>::value ? hd : hd / 2; }  // head dims per lane

inline __m512 load_lanes(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_lanes(const uint32_t* p) { return _mm512_castsi512_ps(_mm512_loadu_si512(p)); }
inline __m512 mac(__m512 acc, float q, __m512 k) { return _mm512_fmadd_ps(_mm512_set1_ps(q), k, acc); }
inline __m512 mac(__m512 acc, uint32_t q, __m512 k) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(q))),
                          reinterpret_cast<__m512bh>(_mm512_castps_si512(k)));
}

inline __mmask16 lanes_below(int64_t n, int64_t i) { return n > i ? tail_mask(n, i) : 0; }

// bf16 V block rows [n, hd] -> vp [ceil(n/2), hd]: rows 2p and 2p+1 interleaved, element d of both in one 32-bit
// lane (vdpbf16ps's pairs of keys); a missing odd row is zero, not the stale slot after it (NaN · 0 is NaN).
inline void pair_values(const bf16* v, int64_t n, int64_t hd, uint32_t* vp) {
  for (int64_t p = 0; 2 * p < n; p++)
    for (int64_t d = 0; d < hd; d += kBlock) {
      const __mmask16 m = tail_mask(hd, d);
      const __m512i a = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, v + 2 * p * hd + d));
      const __m512i b = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(2 * p + 1 < n ? m : 0, v + (2 * p + 1) * hd + d));
      _mm512_mask_storeu_epi32(vp + p * hd + d, m, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
}

// One query's float32 weights of a block -> `pairs` bf16 pairs (rounded to nearest even), zero from key `seen`
// on: the scores there are stale.
inline void pair_weights(const float* w, int64_t seen, int64_t pairs, uint32_t* wp) {
  for (int64_t p = 0; p < pairs; p += kBlock) {
    const __m512 lo = _mm512_maskz_loadu_ps(lanes_below(seen, 2 * p), w + 2 * p);
    const __m512 hi = _mm512_maskz_loadu_ps(lanes_below(seen, 2 * p + kBlock), w + 2 * p + kBlock);
    _mm512_mask_storeu_epi32(wp + p, tail_mask(pairs, p), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
  }
}

// values_tile in bf16 pairs: acc[q] += Σ_p w[q][p] · V[p] over `pairs` pairs of keys for G queries at once.
template <int C, int G>
inline void values_pairs(const uint32_t* vp, int64_t hd, const uint32_t* wp, int64_t ldw, int64_t pairs, float* acc) {
  const __mmask16 last = tail_mask(hd, (C - 1) * kBlock);
  __m512 a[G][C];
#pragma GCC unroll 16
  for (int g = 0; g < G; g++)
#pragma GCC unroll 16
    for (int i = 0; i < C; i++) a[g][i] = load16(acc + g * hd + i * kBlock, i == C - 1 ? last : 0xFFFF);
  for (int64_t p = 0; p < pairs; p++) {
    __m512 x[C];
#pragma GCC unroll 16
    for (int i = 0; i < C; i++)
      x[i] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(i == C - 1 ? last : 0xFFFF, vp + p * hd + i * kBlock));
#pragma GCC unroll 16
    for (int g = 0; g < G; g++)
#pragma GCC unroll 16
      for (int i = 0; i < C; i++) a[g][i] = mac(a[g][i], wp[g * ldw + p], x[i]);
  }
#pragma GCC unroll 16
  for (int g = 0; g < G; g++)
#pragma GCC unroll 16
    for (int i = 0; i < C; i++) store16(acc + g * hd + i * kBlock, a[g][i], i == C - 1 ? last : 0xFFFF);
}

// Every query's weighted values of one block in pairs: a group of G queries runs over the pairs its last query
// sees (the others' weights past their own keys are zero).
template <int C>
void block_values_pairs(const uint32_t* vp, int64_t hd, const uint32_t* wp, int64_t ldw, const int64_t* seen,
                        int64_t nq, float* acc) {
  constexpr int G = C <= 2 ? 8 : C <= 4 ? 4 : C <= 8 ? 2 : 1;
  int64_t r = 0;
  for (; G > 1 && r + G <= nq; r += G)
    values_pairs<C, G>(vp, hd, wp + r * ldw, ldw, (seen[r + G - 1] + 1) / 2, acc + r * hd);
  for (; r < nq; r++) values_pairs<C, 1>(vp, hd, wp + r * ldw, ldw, (seen[r] + 1) / 2, acc + r * hd);
}

void block_values_pairs_any(const uint32_t* vp, int64_t hd, const uint32_t* wp, int64_t ldw, const int64_t* seen,
                            int64_t nq, float* acc) {
  switch ((hd + kBlock - 1) / kBlock) {
#define VALUES(c) \
  case c: return block_values_pairs<c>(vp, hd, wp, ldw, seen, nq, acc);
    VALUES(1) VALUES(2) VALUES(3) VALUES(4) VALUES(5) VALUES(6) VALUES(7) VALUES(8)
    VALUES(9) VALUES(10) VALUES(11) VALUES(12) VALUES(13) VALUES(14) VALUES(15) VALUES(16)
#undef VALUES
  }
}

}  // namespace
}  // namespace trtllm_peft
