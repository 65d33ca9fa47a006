// Mixed-adapter LoRA for one (layer, projection group), per adapter segment (the SGMV idea of Punica):
//
//     for each adapter j of the batch, over the tokens t that use it:
//         xa[t]              = x[t] · A_jᵀ                          [P·R_j]  (rounded to the dtype, as PEFT)
//         y[t, slice_p]     += xa[t, p-th R_j block] · B_jpᵀ          per part p (scale already in B)
//
// Each adapter's weights are read once per call and only its own tokens are computed: no [T, Σ R] masked
// product, and no restacking when the batch's set of adapters changes (the device tier's packed tensors
// are used in place). Rows are addressed by pointer, so tokens need not be contiguous.
//
// A DoRA adapter (mag[j]: its factor g = m / ‖W + s·B·A‖_row, normalized once at load) then rescales its own
// rows of y, which hold W x + bias + the delta: y = g·y + bias·(1 - g), in float32, rounded once — PEFT's
// (m / ‖…‖) ⊙ (W x + s·B·A x) + bias. Rows of other adapters and of the base are not touched.

#include "kernels.h"

namespace trtllm_peft {
namespace {

// Scratch reused across calls on a thread: an adapter segment's products allocate nothing.
template <typename T>
struct Scratch {
  std::vector<T> xa;
  std::vector<const T*> in, w;
  std::vector<T*> out;
};

// y[row] = g ⊙ y[row] + bias ⊙ (1 - g) for the given rows (bias may be null).
template <typename T>
void dora_rows(const torch::Tensor& g, const T* bias, const int64_t* rows, int64_t n, torch::Tensor& y) {
  const float* gp = g.data_ptr<float>();
  const int64_t width = g.numel();
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i++) {
    T* yr = y.data_ptr<T>() + rows[i] * y.stride(0);
    for (int64_t c = 0; c < width; c += kBlock) {
      const __mmask16 m = tail_mask(width, c);
      const __m512 gv = load16(gp + c, m);
      __m512 r = _mm512_mul_ps(load16(yr + c, m), gv);
      if (bias) r = _mm512_fmadd_ps(load16(bias + c, m), _mm512_sub_ps(one, gv), r);
      store16(yr + c, r, m);
    }
  }
}

template <typename T>
void apply_adapter(const LoraGroup& g, size_t j, const std::vector<int64_t>& rows, const torch::Tensor& x,
                   torch::Tensor& y, const T* bias, bool may_split) {
  thread_local Scratch<T> s;
  const int64_t t = static_cast<int64_t>(rows.size()), rank = g.ranks[j];
  const int64_t parts = static_cast<int64_t>(g.starts.size()), width = parts * rank;
  s.xa.resize(t * width);
  s.in.resize(t);
  s.out.resize(t);
  for (int64_t i = 0; i < t; i++) {
    s.in[i] = x.data_ptr<T>() + rows[i] * x.stride(0);
    s.out[i] = s.xa.data() + i * width;
  }
  linear_rows<T>(s.in.data(), t, g.a[j]->data_ptr<T>(), x.size(1), width, nullptr, s.out.data(), false, may_split);
  for (int64_t p = 0; p < parts; p++) {
    for (int64_t i = 0; i < t; i++) {
      s.in[i] = s.xa.data() + i * width + p * rank;
      s.out[i] = y.data_ptr<T>() + rows[i] * y.stride(0) + g.starts[p];
    }
    linear_rows<T>(s.in.data(), t, g.b[j][p].data_ptr<T>(), rank, g.widths[p], nullptr, s.out.data(), true, may_split);
  }
  if (g.mag[j]) dora_rows<T>(*g.mag[j], bias, rows.data(), t, y);
}

// Adapters work[w0..w1) of equal rank, one token each (a decode step of distinct adapters): their products
// run side by side (linear_each), so every adapter's weights stream at once instead of one small array
// after another.
template <typename T>
void apply_single_tokens(const LoraGroup& g, const std::vector<size_t>& work, const std::vector<std::vector<int64_t>>& rows,
                         int64_t w0, int64_t w1, const torch::Tensor& x, torch::Tensor& y, const T* bias) {
  thread_local Scratch<T> s;
  const int64_t n = w1 - w0, rank = g.ranks[work[w0]];
  const int64_t parts = static_cast<int64_t>(g.starts.size()), width = parts * rank;
  s.xa.resize(n * width);
  s.in.resize(n);
  s.w.resize(n);
  s.out.resize(n);
  for (int64_t i = 0; i < n; i++) {
    const size_t j = work[w0 + i];
    s.in[i] = x.data_ptr<T>() + rows[j][0] * x.stride(0);
    s.w[i] = g.a[j]->data_ptr<T>();
    s.out[i] = s.xa.data() + i * width;
  }
  linear_each<T>(s.in.data(), s.w.data(), n, x.size(1), width, s.out.data(), false);
  for (int64_t p = 0; p < parts; p++) {
    for (int64_t i = 0; i < n; i++) {
      const size_t j = work[w0 + i];
      s.in[i] = s.xa.data() + i * width + p * rank;
      s.w[i] = g.b[j][p].data_ptr<T>();
      s.out[i] = y.data_ptr<T>() + rows[j][0] * y.stride(0) + g.starts[p];
    }
    linear_each<T>(s.in.data(), s.w.data(), n, rank, g.widths[p], s.out.data(), true);
  }
  for (int64_t i = 0; i < n; i++) {
    const size_t j = work[w0 + i];
    if (g.mag[j]) dora_rows<T>(*g.mag[j], bias, rows[j].data(), 1, y);
  }
}

}  // namespace

void LoraGroup::apply(const torch::Tensor& x, torch::Tensor& y, const c10::optional<torch::Tensor>& token_adapter,
                      const c10::optional<torch::Tensor>& bias) const {
  check_rows(x, "x");
  check_rows(y, "y");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && x.size(0) == y.size(0), "lora: x and y disagree");
  TORCH_CHECK(mag.size() == a.size(), "lora: one DoRA entry per adapter");
  for (const auto& m : mag)
    TORCH_CHECK(!m || (m->scalar_type() == at::kFloat && m->is_contiguous() && m->numel() == y.size(1)),
                "lora: DoRA factors must be contiguous float32 [out]");
  TORCH_CHECK(!bias || (bias->scalar_type() == y.scalar_type() && bias->is_contiguous() && bias->numel() == y.size(1)),
              "lora: bias must be contiguous [out] in y's dtype");
  const int64_t tokens = x.size(0);
  // Each adapter's tokens; none given means every token uses adapter 0.
  std::vector<std::vector<int64_t>> rows(a.size());
  if (token_adapter) {
    TORCH_CHECK(token_adapter->scalar_type() == at::kLong && token_adapter->numel() == tokens, "lora: token_adapter");
    const torch::Tensor owner = token_adapter->contiguous();
    const int64_t* ta = owner.data_ptr<int64_t>();
    for (int64_t t = 0; t < tokens; t++)
      if (ta[t] >= 0) {
        TORCH_CHECK(ta[t] < static_cast<int64_t>(a.size()), "lora: adapter index out of range");
        rows[ta[t]].push_back(t);
      }
  } else {
    for (int64_t t = 0; t < tokens; t++) rows[0].push_back(t);
  }
  std::vector<size_t> work;
  for (size_t j = 0; j < a.size(); j++)
    if (a[j] && !rows[j].empty()) work.push_back(j);
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* b = bias ? bias->data_ptr<T>() : nullptr;
    if (work.size() == 1) {  // one adapter: its own products may use every thread
      apply_adapter<T>(*this, work[0], rows[work[0]], x, y, b, true);
      return;
    }
    bool single_tokens = true;
    for (size_t j : work) single_tokens &= rows[j].size() == 1 && ranks[j] == ranks[work[0]];
    // Several: the threads split the adapters (each writes only its own tokens' rows of y).
    parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t w0, int64_t w1) {
      if (single_tokens)
        apply_single_tokens<T>(*this, work, rows, w0, w1, x, y, b);
      else
        for (int64_t w = w0; w < w1; w++) apply_adapter<T>(*this, work[w], rows[work[w]], x, y, b, false);
    });
  });
}

}  // namespace trtllm_peft
