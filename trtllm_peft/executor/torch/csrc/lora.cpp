// Mixed-adapter LoRA for one (layer, projection group), per adapter segment (the SGMV idea of Punica):
//
//     for each adapter j of the batch, over the tokens t that use it:
//         xa[t]              = x[t] · A_jᵀ                          [P·R_j]  (rounded to the dtype, as PEFT)
//         y[t, slice_p]     += xa[t, p-th R_j block] · B_jpᵀ          per part p (scale already in B)
//
// Each adapter's weights are read once per call, for its own tokens only: no [T, Σ R] masked product, no
// restacking when the batch's adapters change (the device tier's packed tensors are used in place). Rows are
// addressed by pointer, so tokens need not be contiguous.
//
// A DoRA adapter (mag[j]: its factor g = m / ‖W + s·B·A‖_row, normalized once at load) then rescales its own
// rows of y, which hold W x + bias + the delta: y = g·y + bias·(1 - g), in float32, rounded once — PEFT's
// (m / ‖…‖) ⊙ (W x + s·B·A x) + bias. Rows of other adapters and of the base are not touched.

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>

#include "kernels.h"

namespace trtllm_peft {
namespace {

constexpr int64_t kAmxRows = 8;      // see apply_adapter
constexpr int64_t kSideRows = 4;     // equal segments of at most this many tokens stream side by side
constexpr int64_t kPieceRows = 16;   // tokens of one piece of side-by-side adapters (a thread's unit of work)

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
void apply_adapter(const LoraGroup& g, size_t j, const int64_t* rows, int64_t t, const torch::Tensor& x,
                   torch::Tensor& y, const T* bias, bool may_split, const std::function<void()>* before_b = nullptr) {
  thread_local Scratch<T> s;
  const int64_t rank = g.ranks[j];
  const int64_t parts = static_cast<int64_t>(g.starts.size()), width = parts * rank;
  s.xa.resize(t * width);
  s.in.resize(t);
  s.out.resize(t);
  for (int64_t i = 0; i < t; i++) {
    s.in[i] = x.data_ptr<T>() + rows[i] * x.stride(0);
    s.out[i] = s.xa.data() + i * width;
  }
  // bfloat16 LoRA-A of kAmxRows or more tokens on AMX tiles, below linear_rows' own threshold: a half-empty
  // 16-row tile still multiplies faster than the streaming kernel from 8 rows on (batch 64 of 8 adapters).
  bool amx = false;
  if constexpr (std::is_same<T, bf16>::value) {
    amx = t >= kAmxRows && amx_fits(1 << 20, x.size(1));
    if (amx)
      amx_linear_rows(s.in.data(), t, g.a[j]->data_ptr<T>(), x.size(1), width, nullptr, s.out.data(), false, may_split);
  }
  if (!amx)
    linear_rows<T>(s.in.data(), t, g.a[j]->data_ptr<T>(), x.size(1), width, nullptr, s.out.data(), false, may_split);
  if (before_b) (*before_b)();  // project_side: y's base columns must all be written first
  for (int64_t p = 0; p < parts; p++) {
    for (int64_t i = 0; i < t; i++) {
      s.in[i] = s.xa.data() + i * width + p * rank;
      s.out[i] = y.data_ptr<T>() + rows[i] * y.stride(0) + g.starts[p];
    }
    linear_rows<T>(s.in.data(), t, g.b[j][p].data_ptr<T>(), rank, g.widths[p], nullptr, s.out.data(), true, may_split);
  }
  if (g.mag[j]) dora_rows<T>(*g.mag[j], bias, rows, t, y);
}

// Adapters work[w0..w1) of equal rank and equal token count r (a decode step of distinct adapters): their
// products run side by side (linear_each, each row against its own adapter's weights), so several adapters'
// weights stream at once instead of one small array after another. before_b: as apply_adapter's.
template <typename T>
void apply_equal(const LoraGroup& g, const std::vector<size_t>& work, const LoraRows& segs, int64_t w0, int64_t w1,
                 const torch::Tensor& x, torch::Tensor& y, const T* bias,
                 const std::function<void()>* before_b = nullptr) {
  thread_local Scratch<T> s;
  const int64_t r = segs.count(work[w0]), n = (w1 - w0) * r, rank = g.ranks[work[w0]];
  const int64_t parts = static_cast<int64_t>(g.starts.size()), width = parts * rank;
  auto adapter = [&](int64_t i) -> size_t { return work[w0 + i / r]; };
  auto row = [&](int64_t i) -> int64_t { return segs.rows[segs.start[adapter(i)] + i % r]; };
  s.xa.resize(n * width);
  s.in.resize(n);
  s.w.resize(n);
  s.out.resize(n);
  for (int64_t i = 0; i < n; i++) {
    s.in[i] = x.data_ptr<T>() + row(i) * x.stride(0);
    const torch::Tensor& wa = *g.a[adapter(i)];
    s.w[i] = wa.data_ptr<T>();
    s.out[i] = s.xa.data() + i * width;
  }
  linear_each<T>(s.in.data(), s.w.data(), n, x.size(1), width, s.out.data(), false);
  if (before_b) (*before_b)();
  for (int64_t p = 0; p < parts; p++) {
    for (int64_t i = 0; i < n; i++) {
      s.in[i] = s.xa.data() + i * width + p * rank;
      const torch::Tensor& wb = g.b[adapter(i)][p];
      s.w[i] = wb.data_ptr<T>();
      s.out[i] = y.data_ptr<T>() + row(i) * y.stride(0) + g.starts[p];
    }
    linear_each<T>(s.in.data(), s.w.data(), n, rank, g.widths[p], s.out.data(), true);
  }
  for (int64_t w = w0; w < w1; w++)
    if (g.mag[work[w]]) dora_rows<T>(*g.mag[work[w]], bias, segs.rows.data() + segs.start[work[w]], r, y);
}

// ---- the base projection and its LoRA in one parallel region (LoraGroup::project) --------------------------

// Packed elements of one 16-column block of a W with K inputs (linear.cpp's layout).
template <typename T>
constexpr int64_t block_elems(int64_t K) {
  return std::is_same<T, float>::value ? K * kBlock : (K + 1) / 2 * 2 * kBlock;
}

// Columns [c0, c1) of y (c0 a multiple of 16; a part starting inside it does too) for the M rows xr -> yr:
// y (+)= x · W[c0:c1]ᵀ (+ bias) from a packed W [N, K], whose blocks from c0 / 16 on are a packed W themselves.
template <typename T>
void columns(const T* const* xr, int64_t M, const T* wp, int64_t K, int64_t c0, int64_t c1, const T* bias,
             T* const* yr, bool accumulate, std::vector<T*>& shifted) {
  shifted.resize(M);
  for (int64_t m = 0; m < M; m++) shifted[m] = yr[m] + c0;
  linear_rows<T>(xr, M, wp + c0 / kBlock * block_elems<T>(K), K, c1 - c0, bias ? bias + c0 : nullptr, shifted.data(),
                 accumulate, false);
}

// Whether the base projection prefetches the adapters' weights that follow it (the A/B knob).
std::atomic<bool> trail_on{true};

using Ranges = std::vector<std::pair<const char*, int64_t>>;

// The 64-byte lines of adapters work's A and B_p, in the order apply_work reads them (each adapter's group
// is one stretch of its mapping: lora_grouped.prepare_packed).
Ranges adapter_lines(const LoraGroup& g, const std::vector<size_t>& work) {
  Ranges r;
  auto add = [&](const torch::Tensor& t) {
    r.emplace_back(static_cast<const char*>(t.data_ptr()), (t.numel() * t.element_size() + 63) / 64);
  };
  for (size_t j : work) {
    add(*g.a[j]);
    for (const auto& b : g.b[j]) add(b);
  }
  return r;
}

// Adapter j over its rows (a segment of the batch, or all of it), y's columns shared out over the threads: each
// computes xa = x_j · A_jᵀ itself (A is small, and this way no thread waits for another's), then its columns of
// the base projection, then its columns of the delta xa · B_pᵀ — so every element of y gets W x first and the
// delta second, as in two calls, in one parallel region instead of two calls with the LoRA on one thread.
template <typename T>
void project_rows(const LoraGroup& g, const LoraRows& segs, size_t j, const torch::Tensor& x, const torch::Tensor& wp,
                  int64_t n, const T* bias, torch::Tensor& y, bool accumulate) {
  const int64_t tokens = x.size(0), K = x.size(1), parts = static_cast<int64_t>(g.starts.size());
  const int64_t c = segs.count(j), rank = g.ranks[j], width = parts * rank;
  const int64_t* rows = segs.rows.data() + segs.start[j];
  const auto xr = row_pointers<const T*>(x);
  const auto yr = row_pointers<T*>(y);
  std::vector<const T*> xj(c);
  std::vector<T*> yj(c);
  for (int64_t i = 0; i < c; i++) {
    xj[i] = xr[rows[i]];
    yj[i] = yr[rows[i]];
  }
  auto body = [&](int64_t b0, int64_t b1) {
    thread_local std::vector<T> xa;  // [c, P·R]
    thread_local std::vector<const T*> in;
    thread_local std::vector<T*> out, shifted;
    const int64_t c0 = b0 * kBlock, c1 = std::min(n, b1 * kBlock);
    xa.resize(c * width);
    in.resize(c);
    out.resize(c);
    for (int64_t i = 0; i < c; i++) out[i] = xa.data() + i * width;
    linear_rows<T>(xj.data(), c, g.a[j]->data_ptr<T>(), K, width, nullptr, out.data(), false, false);
    columns<T>(xr.data(), tokens, wp.data_ptr<T>(), K, c0, c1, bias, yr.data(), accumulate, shifted);
    for (int64_t p = 0; p < parts; p++) {
      const int64_t start = g.starts[p], u0 = std::max(c0, start), u1 = std::min(c1, start + g.widths[p]);
      if (u0 >= u1) continue;
      for (int64_t i = 0; i < c; i++) {
        in[i] = xa.data() + i * width + p * rank;
        out[i] = yj[i] + start;
      }
      columns<T>(in.data(), c, g.b[j][p].data_ptr<T>(), rank, u0 - start, u1 - start, nullptr, out.data(), true, shifted);
    }
  };
  // A thread's first column must start a block of every part it meets: parts starting mid-block (not in the
  // models here) stay on one thread.
  bool aligned = true;
  for (int64_t s : g.starts) aligned &= s % kBlock == 0;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  if (aligned)
    parallel_for(0, blocks, 1, body);
  else
    body(0, blocks);
}

// Adapters a piece when work's segments are equal (same rank, same token count r <= kSideRows: a decode step
// of distinct adapters; they stream side by side), up to kPieceRows tokens, >= 1 piece a thread; else 0.
int64_t side_by_side(const LoraGroup& g, const LoraRows& segs, const std::vector<size_t>& work) {
  const int64_t r = segs.count(work[0]), n = static_cast<int64_t>(work.size()), threads = kernel_threads();
  bool equal = r <= kSideRows;
  for (size_t j : work) equal &= segs.count(j) == r && g.ranks[j] == g.ranks[work[0]];
  return equal ? std::max<int64_t>(1, std::min(kPieceRows / r, (n + threads - 1) / threads)) : 0;
}

// Until `left` is 0 (others' work in progress, short): spinning, then yielding to a descheduled thread.
void spin_until_zero(const std::atomic<int64_t>& left) {
  for (int i = 0; left.load(std::memory_order_acquire) > 0; i++) i < 4096 ? _mm_pause() : std::this_thread::yield();
}

// Several adapters' rows of a decode-sized batch: the base projection and apply_work's pieces in ONE parallel
// region (two before: the threads met at the base's end, then the pool was woken again, 240 times a SmolLM2
// step). Thread c: share c of y's column blocks (with the trail, prefetching the lines of its own pieces,
// p % shares == c), then pieces, its own first: A products, then — once every share's base columns are
// written — B products into y (W x first, then the delta, as in two calls: bit for bit). A thread that would
// wait for a share nobody started runs it itself: a late or absent worker holds nothing up.
template <typename T>
void project_side(const LoraGroup& g, const LoraRows& segs, const std::vector<size_t>& work, const torch::Tensor& x,
                  const torch::Tensor& wp, int64_t n, const T* bias, torch::Tensor& y, bool accumulate, bool trail) {
  const int64_t tokens = x.size(0), K = x.size(1), blocks = (n + kBlock - 1) / kBlock;
  const int64_t equal = side_by_side(g, segs, work), side = std::max<int64_t>(equal, 1);
  const int64_t nw = static_cast<int64_t>(work.size()), pieces = (nw + side - 1) / side;
  const int64_t shares = std::max<int64_t>(1, std::min<int64_t>(kernel_threads(), blocks));
  const auto xr = row_pointers<const T*>(x);
  const auto yr = row_pointers<T*>(y);
  std::unique_ptr<std::atomic<bool>[]> share_taken(new std::atomic<bool>[shares]());
  std::unique_ptr<std::atomic<bool>[]> piece_taken(new std::atomic<bool>[pieces]());
  std::atomic<int64_t> shares_left{shares};
  auto base = [&](int64_t c, bool with_trail) {
    thread_local std::vector<T*> shifted;
    std::vector<size_t> own;  // the adapters of its pieces, p % shares == c
    for (int64_t w = 0; with_trail && w < nw; w++)
      if (w / side % shares == c) own.push_back(work[w]);
    const Ranges lines = adapter_lines(g, own);
    int64_t total = 0;
    for (const auto& r : lines) total += r.second;
    Trail t{lines.data(), static_cast<int64_t>(lines.size()), total};
    set_trail(total ? &t : nullptr);
    columns<T>(xr.data(), tokens, wp.data_ptr<T>(), K, blocks * c / shares * kBlock,
               std::min(n, blocks * (c + 1) / shares * kBlock), bias, yr.data(), accumulate, shifted);
    set_trail(nullptr);
    shares_left.fetch_sub(1, std::memory_order_acq_rel);
  };
  const std::function<void()> base_written = [&] {
    for (int64_t d = 0; d < shares; d++)
      if (!share_taken[d].exchange(true)) base(d, false);
    spin_until_zero(shares_left);
  };
  auto piece = [&](int64_t p) {
    const int64_t w0 = p * side, w1 = std::min(nw, w0 + side);
    if (piece_taken[p].exchange(true)) return;
    if (equal)
      apply_equal<T>(g, work, segs, w0, w1, x, y, nullptr, &base_written);
    else
      apply_adapter<T>(g, work[w0], segs.rows.data() + segs.start[work[w0]], segs.count(work[w0]), x, y, nullptr,
                       false, &base_written);
  };
  parallel_pieces(shares, [&](int64_t c) {
    if (!share_taken[c].exchange(true)) base(c, trail);
    for (int64_t p = c; p < pieces; p += shares) piece(p);  // its own pieces (their lines prefetched), then any
    for (int64_t p = 0; p < pieces; p++) piece(p);
  });
}

// Adapters work (each with tokens in segs) of the batch: one adapter on every thread, equal segments side by
// side, any other mix adapter by adapter.
template <typename T>
void apply_work(const LoraGroup& g, const torch::Tensor& x, torch::Tensor& y, const LoraRows& segs,
                const std::vector<size_t>& work, const T* bias) {
  auto segment = [&](size_t j, bool may_split) {
    apply_adapter<T>(g, j, segs.rows.data() + segs.start[j], segs.count(j), x, y, bias, may_split);
  };
  if (work.size() == 1) return segment(work[0], true);  // one adapter: its own products may use every thread
  // Pieces (side_by_side's, or one adapter each) go to the threads as they come free; each writes only its
  // own tokens' rows of y.
  const int64_t n = static_cast<int64_t>(work.size()), equal = side_by_side(g, segs, work);
  const int64_t side = std::max<int64_t>(equal, 1);
  parallel_pieces((n + side - 1) / side, [&](int64_t p) {
    const int64_t w0 = p * side, w1 = std::min(n, w0 + side);
    if (equal)
      apply_equal<T>(g, work, segs, w0, w1, x, y, bias);
    else
      for (int64_t w = w0; w < w1; w++) segment(work[w], false);
  });
}

// What apply() and project() check alike (x and y rows, DoRA factors and bias y's width wide), the call's adapter
// segments (the caller's rows, or every token on adapter 0) and the adapters with tokens among them.
class Segments {
 public:
  Segments(const LoraGroup& g, const torch::Tensor& x, const torch::Tensor& y, const LoraRows* rows,
           const c10::optional<torch::Tensor>& bias)
      : given_(rows), all_(0, 1) {
    check_rows(x, "x");
    check_rows(y, "y");
    TORCH_CHECK(x.scalar_type() == y.scalar_type() && x.size(0) == y.size(0), "lora: x and y disagree");
    TORCH_CHECK(g.mag.size() == g.a.size(), "lora: one DoRA entry per adapter");
    for (const auto& m : g.mag)
      TORCH_CHECK(!m || (m->scalar_type() == at::kFloat && m->is_contiguous() && m->numel() == y.size(1)),
                  "lora: DoRA factors must be contiguous float32 [out]");
    TORCH_CHECK(!bias || (bias->scalar_type() == y.scalar_type() && bias->is_contiguous() && bias->numel() == y.size(1)),
                "lora: bias must be contiguous [out] in y's dtype");
    if (!rows) all_ = LoraRows(x.size(0), static_cast<int64_t>(g.a.size()));
    const LoraRows& s = segs();
    TORCH_CHECK(s.tokens == x.size(0) && s.start.size() == g.a.size() + 1, "lora: rows do not match this batch");
    for (size_t j = 0; j < g.a.size(); j++)
      if (g.a[j] && s.count(j) > 0) work.push_back(j);
  }
  const LoraRows& segs() const { return given_ ? *given_ : all_; }
  std::vector<size_t> work;

 private:
  const LoraRows* given_;
  LoraRows all_;
};

template <typename T>
const T* data_or_null(const c10::optional<torch::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

}  // namespace

void set_lora_trail(bool on) { trail_on.store(on); }

LoraRows::LoraRows(const torch::Tensor& token_adapter, int64_t adapters) {
  TORCH_CHECK(token_adapter.scalar_type() == at::kLong && token_adapter.dim() == 1, "lora: token_adapter must be int64 [T]");
  TORCH_CHECK(adapters >= 0, "lora: adapters must be >= 0");
  const torch::Tensor owner = token_adapter.contiguous();
  const int64_t* ta = owner.data_ptr<int64_t>();
  tokens = owner.numel();
  start.assign(adapters + 1, 0);
  for (int64_t t = 0; t < tokens; t++)
    if (ta[t] >= 0) {
      TORCH_CHECK(ta[t] < adapters, "lora: adapter index out of range");
      start[ta[t] + 1]++;
    }
  for (int64_t j = 0; j < adapters; j++) start[j + 1] += start[j];
  rows.resize(start[adapters]);
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < tokens; t++)
    if (ta[t] >= 0) rows[next[ta[t]]++] = t;
}

LoraRows::LoraRows(int64_t tokens_, int64_t adapters) : rows(tokens_), start(adapters + 1, tokens_), tokens(tokens_) {
  TORCH_CHECK(adapters >= 1, "lora: no adapter");
  start[0] = 0;
  for (int64_t t = 0; t < tokens; t++) rows[t] = t;
}

void LoraGroup::apply(const torch::Tensor& x, torch::Tensor& y, const LoraRows* rows,
                      const c10::optional<torch::Tensor>& bias) const {
  const Segments s(*this, x, y, rows, bias);
  if (s.work.empty()) return;
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    apply_work<T>(*this, x, y, s.segs(), s.work, data_or_null<T>(bias));
  });
}

// Products of more rows than this (prefill) keep linear_rows' own piece split, then apply().
constexpr int64_t kProjectMaxRows = 64;
// Several adapters' weights are prefetched during the base projection from this many rows on (two 8-row passes
// over W); with one pass the base already reads W as fast as memory traffic goes (8 distinct bf16 at batch 8:
// base / step 0.729 with, 0.763 without, in one region).
constexpr int64_t kTrailMinRows = 9;

void LoraGroup::project(const torch::Tensor& x, const torch::Tensor& wp, int64_t n,
                        const c10::optional<torch::Tensor>& bias, torch::Tensor& y, bool accumulate,
                        const LoraRows* rows) const {
  const Segments s(*this, x, y, rows, bias);
  TORCH_CHECK(x.scalar_type() == wp.scalar_type() && y.size(1) == n, "lora: W's dtype or y's width [T, n] disagree");
  const int64_t packed_k = x.scalar_type() == at::kFloat ? x.size(1) : (x.size(1) + 1) / 2;
  TORCH_CHECK(wp.dim() >= 2 && wp.size(1) == packed_k && wp.size(0) * kBlock >= n, "lora: W does not match x");
  for (size_t j : s.work) TORCH_CHECK(!mag[j], "lora: project() of a DoRA adapter: compute W x + bias, then apply()");
  // Several adapters: apply()'s pieces after the base columns, in one region (project_side); fused per column,
  // their few rows ran one small product after another (float32 b8, 8 adapters: 0.71 against 0.78).
  const bool decode = x.size(0) <= kProjectMaxRows, fuse = decode && s.work.size() == 1;
  const bool side = decode && s.work.size() > 1;
  if (!fuse && !side) linear_into(x, wp, n, bias, y, accumulate);
  if (s.work.empty()) return;
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const bool trail = x.size(0) >= kTrailMinRows && trail_on.load(std::memory_order_relaxed);
    if (side)
      project_side<T>(*this, s.segs(), s.work, x, wp, n, data_or_null<T>(bias), y, accumulate, trail);
    else if (fuse)
      project_rows<T>(*this, s.segs(), s.work[0], x, wp, n, data_or_null<T>(bias), y, accumulate);
    else
      apply_work<T>(*this, x, y, s.segs(), s.work, nullptr);
  });
}

}  // namespace trtllm_peft
