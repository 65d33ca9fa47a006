// A decode-only step in one call: the embedding rows, every layer's two fused halves (layer_ops.cpp), the final
// norm, the LM head and float32 logits. The layer loop in Python made two bound calls a layer with ~15 arguments
// each (each tensor converted, the cache's layer views made by indexing), ~10 µs a layer of a ~10 ms bf16
// batch-8 step; here the weights are handed over once, when the model is built, and a step converts its 6
// inputs once. Each part is the function the per-layer calls run: bit for bit the same.
//
// With adapters (DecodeLora) a layer is what model.py's `_forward` runs op by op — rms_norm, the qkv group's
// projection with its LoRA (LoraGroup::project), attend_decode, o's into the residual, rms_norm, gate_up's,
// silu_mul, down's into the residual — the same functions in the same order, without the ~8 bound calls and
// the Python between them a layer (and without torch's .float() of the logits, an OpenMP region).

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

// GroupedLoraBatch.project's result (with lora_ops.project_then_apply where it falls back to two calls):
// x · Wᵀ (+ bias) plus the deltas of g's adapters (g null: none), as a new tensor (out null) or added into *out,
// the residual. A DoRA group (scaled) rescales W x + bias + delta before the residual add, PEFT's order.
torch::Tensor project(const LoraGroup* g, bool scaled, const torch::Tensor& x, const torch::Tensor& wp, int64_t n,
                      const c10::optional<torch::Tensor>& bias, torch::Tensor* out, const LoraRows* rows) {
  if (g && !scaled) {
    torch::Tensor y = out ? *out : torch::empty({x.size(0), n}, x.options());
    g->project(x, wp, n, bias, y, out != nullptr, rows);
    return y;
  }
  if (!g && out) {
    linear_into(x, wp, n, bias, *out, true);
    return *out;
  }
  auto y = linear(x, wp, n, bias);
  if (g) g->apply(x, y, rows, bias);
  if (out) out->add_(y);
  return y;
}

}  // namespace

DecodeLora::DecodeLora(const std::vector<const LoraGroup*>& layer_groups) {
  TORCH_CHECK(layer_groups.size() % kGroups == 0, "DecodeLora: ", kGroups, " groups a layer (qkv, o, gate_up, down)");
  for (const LoraGroup* g : layer_groups) {
    groups.emplace_back(g ? c10::optional<LoraGroup>(*g) : c10::nullopt);
    bool dora = false;
    if (g)
      for (const auto& m : g->mag) dora |= m.has_value();
    scaled.push_back(dora);
  }
}

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
                                const torch::Tensor& tables, const DecodeLora* lora, const LoraRows* rows) const {
  TORCH_CHECK(kc.dim() == 5 && kc.size(0) == layers_ && vc.sizes() == kc.sizes(), "DecodeModel: cache [layers, ...]");
  TORCH_CHECK(!lora || static_cast<int64_t>(lora->groups.size()) == DecodeLora::kGroups * layers_,
              "DecodeModel: the adapters' groups are not this model's layers");
  auto x = embed_.index_select(0, ids);  // [B, H]: the residual stream, written in place below
  const c10::optional<torch::Tensor> none;
  for (int64_t i = 0; i < layers_; i++) {
    const torch::Tensor* w = &weights_[kParts * i];
    auto k = kc.select(0, i), v = vc.select(0, i);
    if (lora) {
      lora_layer(x, i, cos, sin, positions, k, v, tables, *lora, rows);
      continue;
    }
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

// Layer i of a step with adapters: model.py `_forward`'s ops, in its order (see the top of the file).
void DecodeModel::lora_layer(torch::Tensor& x, int64_t i, const torch::Tensor& cos, const torch::Tensor& sin,
                             const torch::Tensor& positions, torch::Tensor& k, torch::Tensor& v,
                             const torch::Tensor& tables, const DecodeLora& lora, const LoraRows* rows) const {
  const torch::Tensor* w = &weights_[kParts * i];
  const c10::optional<torch::Tensor> none;
  auto part = [&](int64_t g, const torch::Tensor& in, int64_t p, const c10::optional<torch::Tensor>& bias,
                  torch::Tensor* out) {
    const auto& group = lora.groups[DecodeLora::kGroups * i + g];
    return project(group ? &*group : nullptr, lora.scaled[DecodeLora::kGroups * i + g], in, w[p], widths_[g],
                   bias, out, rows);
  };
  const auto qkv = part(0, rms_norm(x, w[0], eps_), 1, qkv_bias_[i], nullptr);  // [B, q + 2kv]
  part(1, attend_decode(qkv, cos, sin, positions, k, v, tables, shape_[0], shape_[1], shape_[2]), 2, none, &x);
  const auto gu = part(2, rms_norm(x, w[3], eps_), 4, none, nullptr);  // [B, 2I]
  part(3, silu_mul(gu), 5, none, &x);
}

}  // namespace trtllm_peft
