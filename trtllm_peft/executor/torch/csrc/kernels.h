// Shared helpers of the CPU decode kernels (x86 AVX-512 + AVX512-BF16). Built by ../cpu_kernels.py.
//
// Every kernel computes in float32 lanes and rounds once to the tensor's dtype (float32 or bfloat16,
// round-to-nearest-even), except where it mirrors an op that transformers rounds in between (noted there).
#pragma once

#include <ATen/Parallel.h>  // at::get_num_threads
#include <immintrin.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

namespace trtllm_peft {

using bf16 = at::BFloat16;

constexpr int64_t kBlock = 16;  // float32 lanes of a zmm register: output columns per packed weight block
constexpr int64_t kMaxHeadDim = 256;

// The lanes of a 16-wide chunk at offset i that fall inside length n.
inline __mmask16 tail_mask(int64_t n, int64_t i) {
  return n - i >= kBlock ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
}

inline __m512 bf16_to_f32(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }
inline __m512 load16(const float* p, __mmask16 m = 0xFFFF) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const bf16* p, __mmask16 m = 0xFFFF) { return bf16_to_f32(_mm256_maskz_loadu_epi16(m, p)); }
inline void store16(float* p, __m512 v, __mmask16 m = 0xFFFF) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(bf16* p, __m512 v, __mmask16 m = 0xFFFF) {
  _mm256_mask_storeu_epi16(p, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

// v rounded to T's precision, kept in float32 lanes.
template <typename T>
inline __m512 round16(__m512 v) {
  if constexpr (std::is_same<T, float>::value)
    return v;
  else
    return bf16_to_f32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

inline float to_f(float v) { return v; }
inline float to_f(bf16 v) { return static_cast<float>(v); }
template <typename T>
inline T round_to(float v) { return static_cast<T>(v); }

// exp of float32 lanes: Cody-Waite reduction to r in [-ln2/2, ln2/2], degree-6 Taylor (rel. err < 2e-7).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), 0);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// Calls fn with a float or bf16 value whose type selects the instantiation.
template <typename Fn>
void dispatch(at::ScalarType t, Fn&& fn) {
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16, "float32 or bfloat16 only");
  if (t == at::kFloat)
    fn(float{});
  else
    fn(bf16{});
}

inline void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be 2-D with contiguous rows");
}

// Rows per thread for row-wise ops: decode-sized inputs stay on the calling thread (a pool wake-up costs
// more than they do); prefill-sized ones split.
inline int64_t row_grain(int64_t rows, int64_t cols) { return rows * cols < 65536 ? std::max<int64_t>(rows, 1) : 1; }

// fn over [begin, end) split into contiguous ranges of at least `grain`, on up to torch's thread count
// (thread_pool.cpp: the kernels' own workers, woken without a syscall between back-to-back calls).
void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);
void set_num_threads(int n);  // the kernels' own thread count (0: follow torch's)
int kernel_threads();         // the threads parallel_for and parallel_pieces use
// fn(0..n-1), pieces handed out one at a time to whichever thread is free: a thread the OS descheduled
// holds up one piece, not half of the work (a shared 2-core machine does that often).
void parallel_pieces(int64_t n, const std::function<void(int64_t)>& fn);
// fn(u, next) for units u = 0..n-1 of a streamed product: each thread runs its own contiguous share front to
// back, then takes units left in the others' shares from their back ends, one at a time — a descheduled thread
// holds up the unit it is in, not the rest of its share. next: the unit this thread takes after u if nobody
// takes it first (-1: none), for fn to prefetch.
void parallel_units(int64_t n, const std::function<void(int64_t, int64_t)>& fn);
// A/B knobs: parallel_units' stealing, the workers' idle spin, the caller asleep while its workers are late
void set_split(bool steal, int64_t spin_us, bool sleep);

// ---- the module's functions (linear.cpp, lora.cpp, layer_ops.cpp, attend_*.cpp) ------------------------

torch::Tensor pack(const torch::Tensor& w);
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& wp, int64_t n, const c10::optional<torch::Tensor>& bias);
void linear_into(const torch::Tensor& x, const torch::Tensor& wp, int64_t n, const c10::optional<torch::Tensor>& bias,
                 torch::Tensor& y, bool accumulate);
// bfloat16 products of at least `min_rows` rows (and K a multiple of 32) go to AMX tiles where the CPU has
// them (amx.cpp); fewer rows stream the weights (linear.cpp).
bool amx_available();  // AMX-BF16 here and granted to this process
// Fewest rows a bf16 product runs on AMX by default. Measured in the engine (bf16 base-model decode, quiet, one
// process, alternating): AMX / streaming tokens/s at batch 4: 0.90, 5: 1.09, 6: 1.18, 7: 1.30, 8: 1.46 — the
// streaming kernel's vdpbf16ps is compute-bound from ~4 rows on, a tile multiply is not.
constexpr int64_t kAmxMinRows = 5;
bool set_amx(bool on, int64_t min_rows, bool prefetch);  // use AMX where it fits (default on); returns whether used
bool amx_fits(int64_t M, int64_t K);
int64_t amx_products();  // products run on AMX since the module loaded
void amx_linear_rows(const bf16* const* xr, int64_t M, const bf16* wp, int64_t K, int64_t N, const bf16* bias,
                     bf16* const* yr, bool accumulate, bool may_split);
// The weight-streaming kernel's knobs (linear.cpp; bench and tests A/B them): the next unit's prefetch, the
// smallest product (blocks x k) split over threads; and the smallest decode attention work split over threads
// (attend_decode.cpp; tests reach the split path with 0).
void set_streaming(bool prefetch, int64_t split_min_blocks_k, int64_t attend_split);
void set_attend_split(int64_t work);
// Decode attention of at least this much work (positions x query dims over the rows) is split over the threads
// (less stays on the calling thread): it mostly waits on the K/V cache's DRAM misses (the step's weight
// streaming evicted it), and two cores wait for twice as many at once.
constexpr int64_t kAttendSplit = 32768;
// Row-wise argmax of float32 [B, V] logits, as torch.argmax(dim=-1): the first maximum, a NaN wins (layer_ops.cpp).
torch::Tensor argmax_rows(const torch::Tensor& logits);
// Lines a thread reads right after its next products (lora.cpp: the adapters' weights that follow the base
// projection): linear_rows on that thread spreads their prefetches into L2 over its k steps, beside the next
// unit's, while the product is compute-bound and memory has room; they are then read from cache, not at
// memory latency. Set and cleared by the caller on its own thread (set_trail), one call's worth.
struct Trail {
  const std::pair<const char*, int64_t>* ranges = nullptr;  // (first byte, 64-byte lines)
  int64_t n = 0, total = 0;  // ranges, lines in them
  int64_t i = 0, line = 0, done = 0;
  int64_t left() const { return total - done; }
  inline void fetch(int64_t count) {
    for (; count > 0 && i < n; count--, done++) {
      _mm_prefetch(ranges[i].first + line * 64, _MM_HINT_T1);
      if (++line == ranges[i].second) i++, line = 0;
    }
  }
};
void set_trail(Trail* trail);  // nullptr: none
// Each row's first element of t [rows, ...] (rows may be strided): P is `const T*` or `T*`.
template <typename P>
std::vector<P> row_pointers(const torch::Tensor& t) {
  using T = std::remove_const_t<std::remove_pointer_t<P>>;
  std::vector<P> r(t.size(0));
  for (int64_t i = 0; i < t.size(0); i++) r[i] = t.data_ptr<T>() + i * t.stride(0);
  return r;
}
template <typename T>
void linear_rows(const T* const* xr, int64_t M, const T* wp, int64_t K, int64_t N, const T* bias, T* const* yr,
                 bool accumulate, bool may_split);
// y_m (+)= x_m · W_mᵀ for rows m = 0..M-1, each row with its own packed W_m (all [N, K]): the rows' weights
// are streamed side by side (LoRA's one-token adapter segments).
template <typename T>
void linear_each(const T* const* xr, const T* const* wr, int64_t M, int64_t K, int64_t N, T* const* yr, bool accumulate);

// A batch's tokens grouped by adapter (lora.cpp): built once per step from each token's adapter index
// (-1: none) and shared by the step's calls of every (layer, group).
struct LoraRows {
  std::vector<int64_t> rows;   // token indices, adapter by adapter, ascending within one
  std::vector<int64_t> start;  // adapter j's tokens: rows[start[j] .. start[j + 1])
  int64_t tokens = 0;
  LoraRows(const torch::Tensor& token_adapter, int64_t adapters);
  LoraRows(int64_t tokens, int64_t adapters);  // every token uses adapter 0
  int64_t count(size_t j) const { return start[j + 1] - start[j]; }
};

// One (layer, projection group) of a batch's adapters, for LoRA applied per adapter segment (lora.cpp).
struct LoraGroup {
  std::vector<c10::optional<torch::Tensor>> a;  // per adapter: packed A [P·R_j, in], none if it lacks the group
  std::vector<std::vector<torch::Tensor>> b;    // per adapter: P packed B [out_p, R_j] (scale folded in)
  std::vector<int64_t> ranks;                   // R_j
  std::vector<int64_t> starts, widths;          // per part p: its columns of the group's output
  std::vector<c10::optional<torch::Tensor>> mag;  // per adapter: DoRA factor, float32 [out] (1 on plain parts), or none
  // rows: null = every token uses adapter 0
  void apply(const torch::Tensor& x, torch::Tensor& y, const LoraRows* rows, const c10::optional<torch::Tensor>& bias) const;
  // y (+)= x · Wᵀ (+ bias) + the LoRA delta, W packed [n, K] (the base projection): up to 64 rows (decode) in one
  // parallel region, base columns, adapters' A, then their B once the base is written. No DoRA adapter here.
  void project(const torch::Tensor& x, const torch::Tensor& wp, int64_t n, const c10::optional<torch::Tensor>& bias,
               torch::Tensor& y, bool accumulate, const LoraRows* rows) const;
};

// Whether LoraGroup::project prefetches several adapters' weights during the base projection (default on).
void set_lora_trail(bool on);

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps);
torch::Tensor silu_mul(const torch::Tensor& gu);
// A layer's parts in one call each (layer_ops.cpp): rms_norm then the projection; the attention half of a
// decode-only layer (x += o(attention(qkv(norm(x))))); the MLP half (x += down(silu·up(gate_up(norm(x))))).
torch::Tensor norm_linear(const torch::Tensor& x, const torch::Tensor& ln, double eps, const torch::Tensor& wp, int64_t n,
                          const c10::optional<torch::Tensor>& bias);
void decode_attention_into(torch::Tensor& x, const torch::Tensor& ln, double eps, const torch::Tensor& qkv_wp,
                           int64_t qkv_n, const c10::optional<torch::Tensor>& qkv_bias, const torch::Tensor& cos,
                           const torch::Tensor& sin, const torch::Tensor& positions, torch::Tensor& kc, torch::Tensor& vc,
                           const torch::Tensor& tables, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                           const torch::Tensor& o_wp, int64_t o_n, const c10::optional<torch::Tensor>& o_bias);
void mlp_into(torch::Tensor& x, const torch::Tensor& ln, double eps, const torch::Tensor& gu_wp, int64_t gu_n,
              const c10::optional<torch::Tensor>& gu_bias, const torch::Tensor& down_wp, int64_t down_n,
              const c10::optional<torch::Tensor>& down_bias);
// A batch's adapters as a decode-only step reads them (decode_step.cpp): each layer's qkv, o, gate_up and down
// groups (none: no adapter of the batch has it), made once per set of adapters (GroupedLoraBatch).
struct DecodeLora {
  static constexpr int64_t kGroups = 4;           // qkv, o, gate_up, down: lora_ops.GROUPS' order
  std::vector<c10::optional<LoraGroup>> groups;  // [layers · kGroups]
  std::vector<char> scaled;                      // a DoRA adapter rescales the group's output
  explicit DecodeLora(const std::vector<const LoraGroup*>& layer_groups);
};
// A decode-only step in one call (decode_step.cpp): weights handed over once, at model build; with a batch's
// adapters (lora, each token's adapter in rows: null = all on adapter 0) or without (lora null).
class DecodeModel {
 public:
  static constexpr int64_t kParts = 6;  // per layer: ln1, qkv, o, ln2, gate_up, down (packed projections)
  // widths: output features of qkv, o, gate_up, down, LM head; shape: heads, kv heads, head dim
  DecodeModel(torch::Tensor embed, std::vector<torch::Tensor> weights, std::vector<c10::optional<torch::Tensor>> qkv_bias,
              std::vector<int64_t> widths, torch::Tensor norm, torch::Tensor head, double eps, std::vector<int64_t> shape);
  torch::Tensor step(const torch::Tensor& ids, const torch::Tensor& cos, const torch::Tensor& sin,
                     const torch::Tensor& positions, const torch::Tensor& kc, const torch::Tensor& vc,
                     const torch::Tensor& tables, const DecodeLora* lora, const LoraRows* rows) const;

 private:
  void lora_layer(torch::Tensor& x, int64_t i, const torch::Tensor& cos, const torch::Tensor& sin,
                  const torch::Tensor& positions, torch::Tensor& k, torch::Tensor& v, const torch::Tensor& tables,
                  const DecodeLora& lora, const LoraRows* rows) const;
  torch::Tensor embed_;
  std::vector<torch::Tensor> weights_;
  std::vector<c10::optional<torch::Tensor>> qkv_bias_;
  std::vector<int64_t> widths_;
  torch::Tensor norm_, head_;
  double eps_;
  std::vector<int64_t> shape_;
  int64_t layers_ = 0;
};
torch::Tensor attend_decode(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                            const torch::Tensor& positions, torch::Tensor& kc, torch::Tensor& vc,
                            const torch::Tensor& tables, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim);
torch::Tensor attend_chunk(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                           int64_t start, torch::Tensor& kc, torch::Tensor& vc, const torch::Tensor& table,
                           int64_t num_heads, int64_t num_kv_heads, int64_t head_dim);
torch::Tensor fresh_qkv(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& positions, torch::Tensor& kc, torch::Tensor& vc, const torch::Tensor& rows,
                        int64_t num_heads, int64_t num_kv_heads, int64_t head_dim);

// An adapter's (layer, group)s in the packed layout, written onto `pages` (uint8) at `at` (per output: page
// index, byte offset), from its own tensors (lora_pack.cpp). groups: per group (parts P, in features, output
// width); per part: cols (first output column, width), a [r, in] / b [out_p, r] (none: module absent), B's
// scale, DoRA magnitude [out_p] (none: plain). Returns per group packed A [P·R, in], P × packed B_p [out_p, R]
// (scale folded in) and, where a part has a magnitude, the float32 [width] factor (1 elsewhere).
std::vector<torch::Tensor> pack_adapter(const std::vector<torch::Tensor>& pages, const std::vector<int64_t>& at,
                                        at::ScalarType dtype, int64_t width, const std::vector<int64_t>& groups,
                                        const std::vector<int64_t>& cols,
                                        const std::vector<c10::optional<torch::Tensor>>& a,
                                        const std::vector<c10::optional<torch::Tensor>>& b,
                                        const std::vector<double>& scale,
                                        const std::vector<c10::optional<torch::Tensor>>& mag);

}  // namespace trtllm_peft
