// An adapter made device-ready in one call: every (layer, group) of it in linear.cpp's packed layout, written
// straight from the adapter's own A / B / magnitude tensors onto the device tier's pages (lora_grouped.py).
//
// Bit for bit what lora_ops.prepare (dense A [P, R, in] and Bᵀ per part, zero-padded to the width R, B·scale
// in float32) followed by pack() of each array gives, without its intermediate copies: in Python that was
// ~2,000 small torch ops and ~450 packs for SmolLM2 (26-37 ms of the engine thread per adapter, s11 ramp.md).
// Values are converted as torch converts them: widened to float32 (exact from float16 / bfloat16 / float32),
// B multiplied by its scale in float32, rounded once to the dtype (round to nearest even).

#include "kernels.h"

namespace trtllm_peft {
namespace {

// Row i of a source matrix [rows, cols] (a part's A or B), read as float32 and multiplied by its scale (unless 1).
struct Source {
  const void* p = nullptr;  // null: rows of zeros
  at::ScalarType type = at::kFloat;
  int64_t s0 = 0, s1 = 0, cols = 0;
  float scale = 1.0f;

  // Columns k0 .. k0 + 15 of row i (zeros past cols).
  __m512 load(int64_t i, int64_t k0) const {
    const int64_t n = std::clamp<int64_t>(cols - k0, 0, kBlock);
    if (p == nullptr || n == 0) return _mm512_setzero_ps();
    const __mmask16 m = tail_mask(n, 0);
    __m512 v;
    if (s1 == 1) {
      const int64_t at = i * s0 + k0;
      switch (type) {
        case at::kFloat: v = load16(static_cast<const float*>(p) + at, m); break;
        case at::kBFloat16: v = load16(static_cast<const bf16*>(p) + at, m); break;
        default: v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const at::Half*>(p) + at));
      }
    } else {  // strided (a transposed checkpoint tensor): element by element
      alignas(64) float f[kBlock] = {};
      for (int64_t k = 0; k < n; k++) f[k] = element(i * s0 + (k0 + k) * s1);
      v = _mm512_load_ps(f);
    }
    return scale == 1.0f ? v : _mm512_mul_ps(v, _mm512_set1_ps(scale));
  }
  float element(int64_t at) const {
    switch (type) {
      case at::kFloat: return static_cast<const float*>(p)[at];
      case at::kBFloat16: return static_cast<float>(static_cast<const bf16*>(p)[at]);
      default: return static_cast<float>(static_cast<const at::Half*>(p)[at]);
    }
  }
};

Source source_of(const torch::Tensor& t, double scale) {
  TORCH_CHECK(t.dim() == 2, "pack_adapter: A and B must be 2-D");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              "pack_adapter: float32, bfloat16 or float16 A and B only");
  return {t.data_ptr(), t.scalar_type(), t.stride(0), t.stride(1), t.size(1), static_cast<float>(scale)};
}

// float32 -> bfloat16 bits in each 32-bit lane, rounded to nearest even as c10::BFloat16 (torch) rounds a finite
// value (vcvtneps2bf16 would flush denormals; validate() refuses NaN and inf).
inline __m512i round_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
}

// r[j] = row j's 16 words -> t[c] = word c of rows 0..15 (4 x 4 lanes of 4 x 4 words); r is overwritten.
inline void transpose16(__m512i (&r)[kBlock], __m512i (&t)[kBlock]) {
  for (int i = 0; i < 8; i++) {  // per lane: rows 2i, 2i + 1 of words 0, 1 | of words 2, 3
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; g++) {  // r[4g + m], lane L: word 4L + m of rows 4g .. 4g + 3
    r[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    r[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    r[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    r[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int m = 0; m < 4; m++) {  // the 4 x 4 lanes of r[m], r[4 + m], r[8 + m], r[12 + m]
    const __m512i v0 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x44), v1 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xEE);
    t[m] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    t[4 + m] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    t[8 + m] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    t[12 + m] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

using Row = std::pair<const Source*, int64_t>;  // a source and its row; null source: zeros

// W [N, K] (row n: rows[n]) into the packed layout: [ceil(N/16), K, 16] float32, [ceil(N/16), ceil(K/2), 16, 2]
// bfloat16, padding zero. Both are 32-bit words (a float32, or a k pair of bfloat16) [ceil(N/16), words, 16]: each
// 16 rows x 16 words of W are read row by row and written word by word, one transpose in registers.
template <bool BF>
void pack_rows(int32_t* out, const std::vector<Row>& rows, int64_t K) {
  constexpr int64_t per_word = BF ? 2 : 1;
  const int64_t N = static_cast<int64_t>(rows.size()), words = (K + per_word - 1) / per_word;
  static const Source zeros;
  for (int64_t nb = 0; nb * kBlock < N; nb++) {
    int32_t* blk = out + nb * words * kBlock;
    for (int64_t w0 = 0; w0 < words; w0 += kBlock) {
      __m512i r[kBlock];
      for (int64_t j = 0; j < kBlock; j++) {
        const int64_t n = nb * kBlock + j;
        const Row row = n < N && rows[n].first != nullptr ? rows[n] : Row{&zeros, 0};
        if (!BF) {
          r[j] = _mm512_castps_si512(row.first->load(row.second, w0));
        } else {  // k pairs: bfloat16 bits of k = 2w (low half) and 2w + 1 (high half)
          const __m256i lo = _mm512_cvtepi32_epi16(round_bf16(row.first->load(row.second, 2 * w0)));
          const __m256i hi = _mm512_cvtepi32_epi16(round_bf16(row.first->load(row.second, 2 * w0 + kBlock)));
          r[j] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        }
      }
      __m512i t[kBlock];
      transpose16(r, t);
      const int64_t n = std::min(kBlock, words - w0);
      // streaming stores: nothing reads the copy before a decode step streams it from memory, and the lines are
      // not read for ownership first (measured 4-8% less time for a float32 adapter)
      for (int64_t c = 0; c < n; c++) _mm512_stream_si512(reinterpret_cast<__m512i*>(blk + (w0 + c) * kBlock), t[c]);
    }
  }
}

int64_t padded_k(int64_t K, bool bf) { return K + (bf ? K % 2 : 0); }

// The output tensors, views of the pages at the given byte offsets, each checked to fit before the next.
struct Slots {
  const std::vector<torch::Tensor>& pages;
  const std::vector<int64_t>& at;  // per output: page index, byte offset
  size_t next = 0;
  std::vector<torch::Tensor> out;

  torch::Tensor take(std::vector<int64_t> shape, at::ScalarType type) {
    TORCH_CHECK(2 * next + 2 <= at.size(), "pack_adapter: fewer slots than outputs");
    const int64_t page = at[2 * next], offset = at[2 * next + 1];
    int64_t bytes = c10::elementSize(type);
    for (int64_t s : shape) bytes *= s;
    TORCH_CHECK(page >= 0 && page < static_cast<int64_t>(pages.size()), "pack_adapter: no such page");
    const torch::Tensor& buf = pages[page];
    TORCH_CHECK(buf.scalar_type() == at::kByte && buf.dim() == 1 && buf.is_contiguous(), "pack_adapter: pages are uint8");
    TORCH_CHECK(offset >= 0 && offset + bytes <= buf.numel() && (reinterpret_cast<uintptr_t>(buf.data_ptr()) + offset) % 64 == 0,
                "pack_adapter: slot out of its page or off a cache line");
    if (2 * next + 4 <= at.size() && at[2 * next + 2] == page)  // placed in order: the next one starts past it
      TORCH_CHECK(at[2 * next + 3] >= offset + bytes, "pack_adapter: slots overlap");
    next++;
    auto& typed = (type == at::kFloat ? f32 : other)[page];  // the page as `type`, made once
    if (!typed.defined()) typed = buf.view(type);
    std::vector<int64_t> strides(shape.size(), 1);
    for (int64_t i = static_cast<int64_t>(shape.size()) - 2; i >= 0; i--) strides[i] = strides[i + 1] * shape[i + 1];
    const int64_t elem = static_cast<int64_t>(c10::elementSize(type));
    out.push_back(typed.as_strided(shape, strides, typed.storage_offset() + offset / elem));
    return out.back();
  }
  // each page viewed as float32 / as the dtype once: one as_strided per output (narrow + view + view cost
  // ~0.5 ms an adapter more, measured)
  std::vector<torch::Tensor> f32 = std::vector<torch::Tensor>(pages.size()), other = f32;
};

}  // namespace

std::vector<torch::Tensor> pack_adapter(const std::vector<torch::Tensor>& pages, const std::vector<int64_t>& at,
                                        at::ScalarType dtype, int64_t width, const std::vector<int64_t>& groups,
                                        const std::vector<int64_t>& cols,
                                        const std::vector<c10::optional<torch::Tensor>>& a,
                                        const std::vector<c10::optional<torch::Tensor>>& b,
                                        const std::vector<double>& scale,
                                        const std::vector<c10::optional<torch::Tensor>>& mag) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "pack_adapter: float32 or bfloat16 only");
  TORCH_CHECK(groups.size() % 3 == 0 && cols.size() == 2 * a.size() && b.size() == a.size() &&
                  scale.size() == a.size() && mag.size() == a.size(),
              "pack_adapter: groups are (parts, in, width) triples, parts (start, width) pairs with a, b, scale, mag");
  const bool bf = dtype == at::kBFloat16;
  Slots slots{pages, at};
  size_t part0 = 0;
  for (size_t g = 0; g < groups.size(); g += 3) {
    const int64_t P = groups[g], in = groups[g + 1], out_width = groups[g + 2];
    TORCH_CHECK(P > 0 && part0 + P <= a.size(), "pack_adapter: more parts than given");
    std::vector<Source> src(2 * P);  // A_p, B_p
    bool dora = false;
    for (int64_t p = 0; p < P; p++) {
      const size_t q = part0 + p;
      if (a[q]) {
        TORCH_CHECK(b[q] && a[q]->size(0) == b[q]->size(1) && a[q]->size(0) <= width && a[q]->size(1) == in &&
                        b[q]->size(0) == cols[2 * q + 1],
                    "pack_adapter: A [r, in] and B [out_p, r] do not match the group");
        src[2 * p] = source_of(*a[q], 1.0);
        src[2 * p + 1] = source_of(*b[q], scale[q]);
      }
      dora = dora || mag[q].has_value();
    }
    // A [P·R, in]: part p's rows p·R .. p·R + r_p, then zeros up to the next part
    std::vector<Row> rows(P * width, {nullptr, 0});
    for (int64_t p = 0; p < P; p++)
      for (int64_t i = 0; i < width; i++)
        if (src[2 * p].p != nullptr && i < a[part0 + p]->size(0)) rows[p * width + i] = {&src[2 * p], i};
    const int64_t ablocks = (P * width + kBlock - 1) / kBlock;
    torch::Tensor pa = bf ? slots.take({ablocks, padded_k(in, true) / 2, kBlock, 2}, dtype)
                          : slots.take({ablocks, in, kBlock}, dtype);
    (bf ? pack_rows<true> : pack_rows<false>)(static_cast<int32_t*>(pa.data_ptr()), rows, in);
    // B_p [out_p, R]: row n is B·scale's row n (its r_p columns, zeros past them)
    for (int64_t p = 0; p < P; p++) {
      const int64_t out = cols[2 * (part0 + p) + 1], bblocks = (out + kBlock - 1) / kBlock;
      rows.assign(out, {src[2 * p + 1].p != nullptr ? &src[2 * p + 1] : nullptr, 0});
      for (int64_t n = 0; n < out; n++) rows[n].second = n;
      torch::Tensor pb = bf ? slots.take({bblocks, padded_k(width, true) / 2, kBlock, 2}, dtype)
                            : slots.take({bblocks, width, kBlock}, dtype);
      (bf ? pack_rows<true> : pack_rows<false>)(static_cast<int32_t*>(pb.data_ptr()), rows, width);
    }
    if (dora) {  // float32 [out] DoRA factor: 1 outside DoRA parts, each value rounded to the dtype and back
      float* m = slots.take({out_width}, at::kFloat).data_ptr<float>();
      std::fill(m, m + out_width, 1.0f);
      for (int64_t p = 0; p < P; p++) {
        const auto& t = mag[part0 + p];
        if (!t) continue;
        const int64_t start = cols[2 * (part0 + p)], n = cols[2 * (part0 + p) + 1];
        TORCH_CHECK(t->dim() == 1 && t->size(0) == n && start + n <= out_width, "pack_adapter: magnitude [out_p]");
        const Source s{t->data_ptr(), t->scalar_type()};
        TORCH_CHECK(s.type == at::kFloat || s.type == at::kBFloat16 || s.type == at::kHalf, "pack_adapter: magnitude dtype");
        for (int64_t i = 0; i < n; i++) {
          const float v = s.element(i * t->stride(0));
          m[start + i] = bf ? static_cast<float>(static_cast<bf16>(v)) : v;
        }
      }
    }
    part0 += P;
  }
  TORCH_CHECK(part0 == a.size() && 2 * slots.next == at.size(), "pack_adapter: parts or slots left over");
  _mm_sfence();  // the streaming stores above are visible before the tensors are used
  return std::move(slots.out);
}

}  // namespace trtllm_peft
