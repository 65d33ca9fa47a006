// The small per-layer ops of a step, fused: RMSNorm and SiLU·up (attention: attend_decode.cpp, attend_chunk.cpp).
// Their eager cost is dispatch, not arithmetic; here each is one call per layer. Roundings to the dtype
// follow transformers' eager ops wherever it rounds in between, so bfloat16 results track it.

#include "kernels.h"

namespace trtllm_peft {
namespace {

template <typename T>
void rms_norm_rows(const T* x, int64_t ldx, const T* w, T* out, int64_t M, int64_t H, float eps) {
  for (int64_t m = 0; m < M; m++) {
    const T* row = x + m * ldx;
    __m512 ss = _mm512_setzero_ps();
    for (int64_t i = 0; i < H; i += kBlock) {
      const __m512 v = load16(row + i, tail_mask(H, i));
      ss = _mm512_fmadd_ps(v, v, ss);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / H + eps));
    // As transformers: normalise in float32, cast to the dtype, then multiply by the weight in the dtype.
    for (int64_t i = 0; i < H; i += kBlock) {
      const __mmask16 mask = tail_mask(H, i);
      const __m512 h = round16<T>(_mm512_mul_ps(load16(row + i, mask), inv));
      store16(out + m * H + i, _mm512_mul_ps(load16(w + i, mask), h), mask);
    }
  }
}

// gu [M, 2I] = [gate | up] -> silu(gate) · up, silu rounded to the dtype first as torch's eager ops do.
template <typename T>
void silu_mul_rows(const T* gu, int64_t ld, T* out, int64_t M, int64_t I) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t m = 0; m < M; m++)
    for (int64_t i = 0; i < I; i += kBlock) {
      const __mmask16 mask = tail_mask(I, i);
      const __m512 g = load16(gu + m * ld + i, mask), up = load16(gu + m * ld + I + i, mask);
      const __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      store16(out + m * I + i, _mm512_mul_ps(round16<T>(s), up), mask);
    }
}

// Index of row's maximum as torch.argmax: the first maximal value, and the first NaN if there is one (torch
// treats NaN as the maximum). Vectorized: the row's max (and whether it has a NaN) in one pass, then the first
// lane equal to it; a greedy step's sampling was torch's scalar-ish reduction, 1-5 ms at [8-32, 49152].
int64_t argmax_row(const float* x, int64_t V) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  for (int64_t i = 0; i < V; i += kBlock) {
    const __mmask16 m = tail_mask(V, i);
    const __m512 v = _mm512_mask_loadu_ps(mx, m, x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mx = _mm512_max_ps(mx, v);
  }
  if (nan) {
    for (int64_t i = 0; i < V; i++)
      if (std::isnan(x[i])) return i;
  }
  const __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  for (int64_t i = 0; i < V; i += kBlock) {
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(tail_mask(V, i), _mm512_maskz_loadu_ps(tail_mask(V, i), x + i), best, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  return 0;  // V == 0
}

}  // namespace

torch::Tensor argmax_rows(const torch::Tensor& logits) {
  check_rows(logits, "logits");
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.size(1) > 0, "argmax_rows: float32 logits [B, V > 0]");
  const int64_t B = logits.size(0), V = logits.size(1);
  auto out = torch::empty({B}, logits.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++) o[b] = argmax_row(logits.data_ptr<float>() + b * logits.stride(0), V);
  return out;
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.is_contiguous() && w.numel() == x.size(1), "rms_norm: weight");
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t H = x.size(1);
    parallel_for(0, x.size(0), row_grain(x.size(0), H), [&](int64_t m0, int64_t m1) {
      rms_norm_rows<T>(x.data_ptr<T>() + m0 * x.stride(0), x.stride(0), w.data_ptr<T>(), out.data_ptr<T>() + m0 * H,
                       m1 - m0, H, static_cast<float>(eps));
    });
  });
  return out;
}

torch::Tensor silu_mul(const torch::Tensor& gu) {
  check_rows(gu, "gu");
  const int64_t I = gu.size(1) / 2;
  auto out = torch::empty({gu.size(0), I}, gu.options());
  dispatch(gu.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    parallel_for(0, gu.size(0), row_grain(gu.size(0), I), [&](int64_t m0, int64_t m1) {
      silu_mul_rows<T>(gu.data_ptr<T>() + m0 * gu.stride(0), gu.stride(0), out.data_ptr<T>() + m0 * I, m1 - m0, I);
    });
  });
  return out;
}

// ---- A layer's parts in one call each (the model's base-model path: no adapters). Each composes the functions
// above, so it computes what the separate calls compute; what it saves is the Python between them: a bf16 b8
// decode step made 8 calls a layer (30 layers), each ~5-10 µs of interpreter and binding work around µs-sized
// norms and SiLU·up. Tests hold each to the torch ops.

torch::Tensor norm_linear(const torch::Tensor& x, const torch::Tensor& ln, double eps, const torch::Tensor& wp, int64_t n,
                          const c10::optional<torch::Tensor>& bias) {
  return linear(rms_norm(x, ln, eps), wp, n, bias);
}

// x += o(attention(qkv(rms_norm(x)))): the attention half of a decode-only step's layer (one token per row).
void decode_attention_into(torch::Tensor& x, const torch::Tensor& ln, double eps, const torch::Tensor& qkv_wp,
                           int64_t qkv_n, const c10::optional<torch::Tensor>& qkv_bias, const torch::Tensor& cos,
                           const torch::Tensor& sin, const torch::Tensor& positions, torch::Tensor& kc, torch::Tensor& vc,
                           const torch::Tensor& tables, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                           const torch::Tensor& o_wp, int64_t o_n, const c10::optional<torch::Tensor>& o_bias) {
  const auto qkv = norm_linear(x, ln, eps, qkv_wp, qkv_n, qkv_bias);
  const auto attn = attend_decode(qkv, cos, sin, positions, kc, vc, tables, num_heads, num_kv_heads, head_dim);
  linear_into(attn, o_wp, o_n, o_bias, x, true);
}

// x += down(silu(gate) · up) of [gate | up] = gate_up(rms_norm(x)): a layer's MLP half.
void mlp_into(torch::Tensor& x, const torch::Tensor& ln, double eps, const torch::Tensor& gu_wp, int64_t gu_n,
              const c10::optional<torch::Tensor>& gu_bias, const torch::Tensor& down_wp, int64_t down_n,
              const c10::optional<torch::Tensor>& down_bias) {
  const auto act = silu_mul(norm_linear(x, ln, eps, gu_wp, gu_n, gu_bias));
  linear_into(act, down_wp, down_n, down_bias, x, true);
}

}  // namespace trtllm_peft
