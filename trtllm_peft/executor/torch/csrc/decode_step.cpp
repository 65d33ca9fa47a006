// A decode-only step of the base model (no adapters) in one call: the embedding rows, every layer's two fused
// halves (layer_ops.cpp), the final norm, the LM head and float32 logits. The layer loop in Python made two
// bound calls a layer with ~15 arguments each (each tensor converted, the cache's layer views made by indexing),
// ~10 µs a layer of a ~10 ms bf16 batch-8 step; here the weights are handed over once, when the model is built,
// and a step converts its 6 inputs once. Each part is the function the per-layer calls run: bit for bit the same.

#include "kernels.h"

namespace trtllm_peft {
namespace {

// bfloat16 rows [B, V] -> float32 (exact), as torch's .float(): the logits the sampler reads.
void widen_rows(const torch::Tensor& in, torch::Tensor& out) {
  const int64_t V = in.size(1);
  parallel_for(0, in.size(0), row_grain(in.size(0), V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const bf16* src = in.data_ptr<bf16>() + r * in.stride(0);
      float* dst = out.data_ptr<float>() + r * V;
      for (int64_t i = 0; i < V; i += kBlock) {
        const __mmask16 m = tail_mask(V, i);
        store16(dst + i, load16(src + i, m), m);
      }
    }
  });
}

}  // namespace

DecodeModel::DecodeModel(torch::Tensor embed, std::vector<torch::Tensor> weights,
                         std::vector<c10::optional<torch::Tensor>> qkv_bias, std::vector<int64_t> widths,
                         torch::Tensor norm, torch::Tensor head, double eps, std::vector<int64_t> shape)
    : embed_(std::move(embed)), weights_(std::move(weights)), qkv_bias_(std::move(qkv_bias)),
      widths_(std::move(widths)), norm_(std::move(norm)), head_(std::move(head)), eps_(eps), shape_(std::move(shape)) {
  layers_ = static_cast<int64_t>(qkv_bias_.size());
  TORCH_CHECK(static_cast<int64_t>(weights_.size()) == kParts * layers_, "DecodeModel: ", kParts,
              " tensors a layer (ln1, qkv, o, ln2, gate_up, down)");
  TORCH_CHECK(widths_.size() == 5 && shape_.size() == 3,
              "DecodeModel: widths (qkv, o, gate_up, down, head), shape (heads, kv heads, head dim)");
}

// ids [B] int64, positions [B] int64, kc/vc the whole cache [layers, blocks, kv, tpb, hd], tables [B, W] int32
// -> float32 logits [B, V]; the cache gets each row's k and v at its position in every layer.
torch::Tensor DecodeModel::step(const torch::Tensor& ids, const torch::Tensor& cos, const torch::Tensor& sin,
                                const torch::Tensor& positions, const torch::Tensor& kc, const torch::Tensor& vc,
                                const torch::Tensor& tables) const {
  TORCH_CHECK(kc.dim() == 5 && kc.size(0) == layers_ && vc.sizes() == kc.sizes(), "DecodeModel: cache [layers, ...]");
  auto x = embed_.index_select(0, ids);  // [B, H]: the residual stream, written in place below
  const c10::optional<torch::Tensor> none;
  for (int64_t i = 0; i < layers_; i++) {
    const torch::Tensor* w = &weights_[kParts * i];
    auto k = kc.select(0, i), v = vc.select(0, i);
    decode_attention_into(x, w[0], eps_, w[1], widths_[0], qkv_bias_[i], cos, sin, positions, k, v, tables, shape_[0],
                          shape_[1], shape_[2], w[2], widths_[1], none);
    mlp_into(x, w[3], eps_, w[4], widths_[2], none, w[5], widths_[3], none);
  }
  auto logits = norm_linear(x, norm_, eps_, head_, widths_[4], none);
  if (logits.scalar_type() == at::kFloat) return logits;
  auto out = torch::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  widen_rows(logits, out);
  return out;
}

}  // namespace trtllm_peft
