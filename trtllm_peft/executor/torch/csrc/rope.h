// RoPE as the attention kernels apply it (attend_decode.cpp, attend_chunk.cpp).
#pragma once

#include "kernels.h"

namespace trtllm_peft {

// out = rope(x) at one position (rotate-half: [x1, x2] -> [x1·c - x2·s, x2·c + x1·s]), each product and the
// sum rounded to T as transformers' `x * cos + rotate_half(x) * sin` is. O: T (the cache) or float.
template <typename T, typename O>
inline void rope(const T* x, const T* cos, const T* sin, int64_t hd, O* out) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; i += kBlock) {
    const __mmask16 m = tail_mask(half, i);
    const __m512 x1 = load16(x + i, m), x2 = load16(x + half + i, m);
    const __m512 lo = _mm512_sub_ps(round16<T>(_mm512_mul_ps(x1, load16(cos + i, m))),
                                    round16<T>(_mm512_mul_ps(x2, load16(sin + i, m))));
    const __m512 hi = _mm512_add_ps(round16<T>(_mm512_mul_ps(x2, load16(cos + half + i, m))),
                                    round16<T>(_mm512_mul_ps(x1, load16(sin + half + i, m))));
    store16(out + i, round16<T>(lo), m);
    store16(out + half + i, round16<T>(hi), m);
  }
}

}  // namespace trtllm_peft
