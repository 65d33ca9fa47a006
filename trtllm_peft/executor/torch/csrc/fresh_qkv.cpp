// RoPE + KV put of a prefill's fresh chunks, for torch's SDPA after it (model.py, bfloat16 where oneDNN has AMX).

#include "rope.h"

namespace trtllm_peft {

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
