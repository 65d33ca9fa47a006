// The Python module of the CPU decode kernels (loaded by ../cpu_kernels.py).

#include "kernels.h"

namespace tp = trtllm_peft;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels take tensors and numbers only: without the GIL while they run, the server's event loop and
  // poller run beside a kernel instead of waiting for the engine's Python gaps between kernels.
  const pybind11::call_guard<pybind11::gil_scoped_release> nogil;
  m.def("set_num_threads", &tp::set_num_threads, "threads the kernels use (0: torch's count)");
  m.def("amx_available", &tp::amx_available, "AMX-BF16 on this CPU and granted to this process");
  m.def("set_amx", &tp::set_amx, "bf16 products of >= min_rows rows on AMX tiles (default on); returns whether used",
        pybind11::arg("on"), pybind11::arg("min_rows") = tp::kAmxMinRows, pybind11::arg("prefetch") = true);
  m.def("amx_products", &tp::amx_products, "products run on AMX tiles since load (which path ran)");
  m.def("set_streaming", &tp::set_streaming, "weight streaming knobs: prefetch the next unit (default on), smallest "
        "product (blocks x k) split over threads, smallest decode attention split", pybind11::arg("prefetch") = true,
        pybind11::arg("split_min") = 16384, pybind11::arg("attend_split") = tp::kAttendSplit);
  m.def("set_split", &tp::set_split, "decode products' split: shares with stealing (default on), the pool workers' "
        "idle spin in us before they sleep, the caller asleep while they are late", pybind11::arg("steal") = true,
        pybind11::arg("spin_us") = 50, pybind11::arg("sleep") = true);
  m.def("argmax_rows", &tp::argmax_rows, nogil, "torch.argmax(logits, -1) of float32 [B, V] logits");
  m.def("pack", &tp::pack, nogil, "W [N, K] -> packed 16-column blocks (linear.cpp)");
  m.def("linear", &tp::linear, nogil, "x · Wᵀ (+ b) from a packed W");
  m.def("linear_into", &tp::linear_into, nogil, "y (+)= x · Wᵀ (+ b); y may be a column slice");
  m.def("rms_norm", &tp::rms_norm, nogil, "RMSNorm as transformers computes it");
  m.def("silu_mul", &tp::silu_mul, nogil, "silu(gate) · up of [gate | up]");
  m.def("norm_linear", &tp::norm_linear, nogil, "rms_norm then x · Wᵀ (+ b) from a packed W, one call");
  m.def("decode_attention_into", &tp::decode_attention_into, nogil,
        "x += o(attention(qkv(rms_norm(x)))) of one token per row (RoPE + KV write as attend_decode), one call");
  m.def("mlp_into", &tp::mlp_into, nogil, "x += down(silu(gate) · up) of [gate | up] = gate_up(rms_norm(x)), one call");
  m.def("attend_decode", &tp::attend_decode, nogil, "RoPE + KV write + attention, one token per row");
  m.def("attend_chunk", &tp::attend_chunk, nogil,
        "RoPE + KV write + causal attention of one sequence's prompt chunk");
  m.def("fresh_qkv", &tp::fresh_qkv, nogil,
        "RoPE of q and k + KV write of a prefill's fresh chunks -> qk [F, heads + kv, hd]");
  m.def("set_lora_trail", &tp::set_lora_trail, "LoRA: prefetch several adapters' weights during the base "
        "projection (default on)", pybind11::arg("on") = true);
  pybind11::class_<tp::LoraGroup>(m, "LoraGroup", pybind11::module_local())
      .def(pybind11::init<std::vector<c10::optional<torch::Tensor>>, std::vector<std::vector<torch::Tensor>>,
                          std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                          std::vector<c10::optional<torch::Tensor>>>(),
           pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("ranks"), pybind11::arg("starts"),
           pybind11::arg("widths"), pybind11::arg("mag"))
      .def("apply", &tp::LoraGroup::apply, nogil,
           "y += each token's adapter's LoRA delta, then DoRA adapters' rows y = g*y + bias*(1-g) "
           "(rows None: all adapter 0)",
           pybind11::arg("x"), pybind11::arg("y"), pybind11::arg("rows").none(true), pybind11::arg("bias") = c10::nullopt)
      .def("project", &tp::LoraGroup::project, nogil,
           "y (+)= x Wt (+ b) + each token's adapter's LoRA delta, W packed (the base projection); no DoRA rows",
           pybind11::arg("x"), pybind11::arg("wp"), pybind11::arg("n"), pybind11::arg("bias").none(true),
           pybind11::arg("y"), pybind11::arg("accumulate"), pybind11::arg("rows").none(true));
  pybind11::class_<tp::DecodeModel>(m, "DecodeModel", pybind11::module_local())
      .def(pybind11::init<torch::Tensor, std::vector<torch::Tensor>, std::vector<c10::optional<torch::Tensor>>,
                          std::vector<int64_t>, torch::Tensor, torch::Tensor, double, std::vector<int64_t>>(),
           pybind11::arg("embed"), pybind11::arg("weights"), pybind11::arg("qkv_bias"), pybind11::arg("widths"),
           pybind11::arg("norm"), pybind11::arg("head"), pybind11::arg("eps"), pybind11::arg("shape"))
      .def("step", &tp::DecodeModel::step, nogil,
           "float32 logits [B, V] of one decode-only step (KV written in every layer), with the batch's adapters "
           "(lora; rows: each token's, None: all on adapter 0) or without (lora None)",
           pybind11::arg("ids"), pybind11::arg("cos"), pybind11::arg("sin"), pybind11::arg("positions"),
           pybind11::arg("kc"), pybind11::arg("vc"), pybind11::arg("tables"),
           pybind11::arg("lora").none(true) = pybind11::none(), pybind11::arg("rows").none(true) = pybind11::none());
  pybind11::class_<tp::DecodeLora>(m, "DecodeLora", pybind11::module_local())
      .def(pybind11::init<const std::vector<const tp::LoraGroup*>&>(), pybind11::arg("groups"),
           "a batch's LoraGroups (None: none) for every layer's qkv, o, gate_up, down, as a decode step reads them");
  pybind11::class_<tp::LoraRows>(m, "LoraRows", pybind11::module_local())
      .def(pybind11::init<const torch::Tensor&, int64_t>(), pybind11::arg("token_adapter"), pybind11::arg("adapters"),
           "each token's adapter index (int64 [T], -1: none) grouped by adapter, once per step")
      .def_readonly("tokens", &tp::LoraRows::tokens);
  m.def("pack_adapter", &tp::pack_adapter, nogil,
        "an adapter's (layer, group)s packed for the kernels, written onto the given pages (lora_pack.cpp)",
        pybind11::arg("pages"), pybind11::arg("at"), pybind11::arg("dtype"), pybind11::arg("width"),
        pybind11::arg("groups"), pybind11::arg("cols"), pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("scale"),
        pybind11::arg("mag"));
}
