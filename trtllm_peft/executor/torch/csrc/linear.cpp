// y (+)= x · Wᵀ (+ b) from a packed W, for any number of rows; the workhorse of a decode step.
//
// Packed layout: W [N, K] becomes blocks of 16 output columns, k-major inside a block, so one 64-byte load
// feeds 16 columns and each weight byte is read once per call however many rows x has:
//   float32:  [ceil(N/16), K, 16]          bfloat16: [ceil(N/16), ceil(K/2), 16, 2]  (k pairs for vdpbf16ps)
// Columns past N and the odd k past K are zero. Accumulation is float32; the output is rounded once.
// Rows are passed as pointers, so a caller can read and write scattered rows (lora.cpp) without copies.

#include <atomic>

#include "kernels.h"

namespace trtllm_peft {
namespace {

constexpr int kRows = 8;  // rows per micro-kernel call (at most 8 x 3 = 24 zmm accumulators)

// Blocks a thread streams side by side: as many as the registers allow (rows x blocks accumulators <= 24),
// since more independent weight streams in flight pull more memory bandwidth (measured on the SmolLM2
// decode linears at batch 8: 2 blocks 23-29 GB/s, 3 blocks 28-36 GB/s).
constexpr int64_t unit_blocks(int64_t rows) { return rows <= 2 ? 8 : rows <= 4 ? 6 : 3; }

// The lines of the next unit a pass prefetches into L2, a few each k step. A unit (its blocks are adjacent,
// so one contiguous range) is read from memory once and then by every 8-row pass from cache: without this,
// memory is busy only during the first pass and idle while the others compute (a float32 step at batch 32
// took the sum of both). Spreading the next unit's lines over the current unit's passes overlaps the two.
// bfloat16 with one pass too, above kPrefetchMinRows rows: on 2 MiB pages the hardware prefetcher alone kept a
// batch-8 decode at 0.75x of this; with up to 4 rows it keeps up alone (prefetching cost 4-7% at 1 and 4 rows),
// and float32 batch 8 measured 0.96-1.00x engine, 0.97-0.98x kernel alone (quiet runs): left to it.
// bench/linear_stream.py, bench/decode_profile.py --ab; figures in bench/README.md.
struct Ahead {
  const char* p = nullptr;
  int64_t lines = 0, per_k = 0;
  Trail* trail = nullptr;  // the thread's trail (set_trail), trail_per_k lines a k step
  int64_t trail_per_k = 0;
  inline void at(int64_t k) const {
    const int64_t end = std::min(lines, (k + 1) * per_k);
    for (int64_t i = k * per_k; i < end; i++) _mm_prefetch(p + i * 64, _MM_HINT_T1);
    if (trail) trail->fetch(trail_per_k);
  }
};

thread_local Trail* current_trail = nullptr;

template <int M, int NB>
inline void dot_f32(const float* const* x, const float* wp, int64_t K, const Ahead& ahead, __m512 (&acc)[M][NB]) {
  for (int64_t k = 0; k < K; k++) {
    ahead.at(k);
    __m512 w[NB];
    for (int j = 0; j < NB; j++) w[j] = _mm512_loadu_ps(wp + (j * K + k) * kBlock);
    for (int m = 0; m < M; m++) {
      const __m512 xb = _mm512_set1_ps(x[m][k]);
      for (int j = 0; j < NB; j++) acc[m][j] = _mm512_fmadd_ps(xb, w[j], acc[m][j]);
    }
  }
}

template <int M, int NB>
inline void dot_bf16_pair(const bf16* const* x, const bf16* wp, int64_t pairs, int64_t k, bool lone,
                          __m512 (&acc)[M][NB]) {
  __m512bh w[NB];
  for (int j = 0; j < NB; j++) w[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(wp + (j * pairs + k) * 2 * kBlock));
  for (int m = 0; m < M; m++) {
    int32_t pair = 0;
    if (lone)  // the odd last k: x's partner lane must be zero, and must not be read past the row
      std::memcpy(&pair, x[m] + 2 * k, sizeof(bf16));
    else
      std::memcpy(&pair, x[m] + 2 * k, sizeof(pair));
    const __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
    for (int j = 0; j < NB; j++) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xb, w[j]);
  }
}

template <int M, int NB>
inline void dot_bf16(const bf16* const* x, const bf16* wp, int64_t K, const Ahead& ahead, __m512 (&acc)[M][NB]) {
  const int64_t pairs = (K + 1) / 2;  // the packed block's k pairs (an odd K padded with a zero k)
  for (int64_t k = 0; k < K / 2; k++) {
    ahead.at(k);
    dot_bf16_pair<M, NB>(x, wp, pairs, k, false, acc);
  }
  if (K % 2) {
    ahead.at(K / 2);
    dot_bf16_pair<M, NB>(x, wp, pairs, K / 2, true, acc);
  }
}

// acc (+ bias) written (or added) into y's rows at the columns of blocks blk..blk+NB.
template <typename T, int M, int NB>
inline void store_tile(const __m512 (&acc)[M][NB], int64_t blk, int64_t N, const T* bias, T* const* y, bool accumulate) {
  for (int j = 0; j < NB; j++) {
    const int64_t col = (blk + j) * kBlock;
    const __mmask16 mask = tail_mask(N, col);
    const __m512 b = bias ? load16(bias + col, mask) : _mm512_setzero_ps();
    for (int m = 0; m < M; m++) {
      __m512 v = _mm512_add_ps(acc[m][j], b);
      if (accumulate) v = _mm512_add_ps(v, load16(y[m] + col, mask));
      store16(y[m] + col, v, mask);
    }
  }
}

// 64-byte lines of one packed block: a k (float32) or a k pair (bfloat16) of its 16 columns per line.
template <typename T>
constexpr int64_t block_lines(int64_t K) {
  return std::is_same<T, float>::value ? K : (K + 1) / 2;
}

// Rows x[0..M) against blocks blk..blk+NB of W, written (or added) into y's rows at those columns.
template <typename T, int M, int NB>
void tile(const T* const* x, const T* wp, int64_t K, int64_t blk, int64_t N, const T* bias, T* const* y, bool accumulate,
          const Ahead& ahead) {
  __m512 acc[M][NB];
  for (int m = 0; m < M; m++)
    for (int j = 0; j < NB; j++) acc[m][j] = _mm512_setzero_ps();
  const T* w = wp + blk * block_lines<T>(K) * kBlock * (std::is_same<T, float>::value ? 1 : 2);
  if constexpr (std::is_same<T, float>::value)
    dot_f32<M, NB>(x, w, K, ahead, acc);
  else
    dot_bf16<M, NB>(x, w, K, ahead, acc);
  store_tile<T, M, NB>(acc, blk, N, bias, y, accumulate);
}

// Row m against its own W_m (all [N, K]): blocks blk..blk+NB of every W_m streamed side by side.
template <typename T, int M, int NB>
void tile_each(const T* const* x, const T* const* w, int64_t K, int64_t blk, int64_t N, T* const* y, bool accumulate) {
  __m512 acc[M][NB];
  for (int m = 0; m < M; m++)
    for (int j = 0; j < NB; j++) acc[m][j] = _mm512_setzero_ps();
  if constexpr (std::is_same<T, float>::value) {
    for (int64_t k = 0; k < K; k++)
      for (int m = 0; m < M; m++) {
        const __m512 xb = _mm512_set1_ps(x[m][k]);
        for (int j = 0; j < NB; j++)
          acc[m][j] = _mm512_fmadd_ps(xb, _mm512_loadu_ps(w[m] + ((blk + j) * K + k) * kBlock), acc[m][j]);
      }
  } else {
    const int64_t pairs = (K + 1) / 2;
    for (int64_t k = 0; k < pairs; k++)
      for (int m = 0; m < M; m++) {
        int32_t pair = 0;
        if (2 * k + 1 == K)  // the odd last k: x's partner lane must be zero, and must not be read past the row
          std::memcpy(&pair, x[m] + 2 * k, sizeof(bf16));
        else
          std::memcpy(&pair, x[m] + 2 * k, sizeof(pair));
        const __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
        for (int j = 0; j < NB; j++) {
          const auto* p = w[m] + ((blk + j) * pairs + k) * 2 * kBlock;
          acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xb, reinterpret_cast<__m512bh>(_mm512_loadu_si512(p)));
        }
      }
  }
  store_tile<T, M, NB>(acc, blk, N, nullptr, y, accumulate);
}

// The tile for `nb` blocks (1..NB), chosen at compile time.
template <typename T, int M, int NB = unit_blocks(M)>
void tile_rows(const T* const* x, const T* wp, int64_t K, int64_t blk, int64_t nb, int64_t N, const T* bias,
               T* const* y, bool acc, const Ahead& ahead) {
  if constexpr (NB == 1) {
    tile<T, M, 1>(x, wp, K, blk, N, bias, y, acc, ahead);
  } else {
    if (nb == NB) return tile<T, M, NB>(x, wp, K, blk, N, bias, y, acc, ahead);
    tile_rows<T, M, NB - 1>(x, wp, K, blk, nb, N, bias, y, acc, ahead);
  }
}

// set_streaming's knobs. prefetch: the next unit into L2 (Ahead; off only for A/B runs), for products of
// several passes, and bfloat16 ones of more than kPrefetchMinRows rows.
std::atomic<bool> prefetch_next{true};
constexpr int64_t kPrefetchMinRows = 4;
// blocks x K below which a product stays on the calling thread: LoRA's A and B (rank 16: 576), not SmolLM2's
// o-proj (36 x 576 = 20736; it stayed on one thread at 32768, but two threads win at every batch here:
// bench/decode_profile.py --ab, variant "o on one thread", 2-core AMD EPYC without AMX, load 2.0: engine
// decode 1.00-1.10x at batch 1-64, both dtypes)
std::atomic<int64_t> split_min{16384};
// ... unless rows x blocks x K reaches this: products of ~100 rows and more (prefill) split whatever their
// weights
constexpr int64_t kSplitRowsWork = int64_t{1} << 21;
// Products of more rows than a decode batch (prefill) go to the threads in pieces of kPieceUnits units
// (512-row gate|up: 32 pieces, o: 6); decode-sized ones in shares of single units (parallel_units: the next
// unit prefetched across them, a thread done early taking the rest of a descheduled thread's share).
constexpr int64_t kPieceMinRows = 64, kPieceUnits = 2;

// One product's units (`width` blocks each), every row in passes of kRows, each pass prefetching its share of
// the unit the thread runs next (Ahead).
template <typename T>
struct Stream {
  const T* const* xr;
  int64_t M;
  const T* wp;
  int64_t K, N;
  const T* bias;
  T* const* yr;
  bool accumulate;
  int64_t width, blocks = (N + kBlock - 1) / kBlock, lines = block_lines<T>(K), passes = (M + kRows - 1) / kRows;
  bool pf = (passes > 1 || (std::is_same<T, bf16>::value && M > kPrefetchMinRows)) &&
            prefetch_next.load(std::memory_order_relaxed);

  // Unit u, prefetching unit `next` (-1: none) and trail_per_k lines of `trail` (may be null) a k step.
  void unit(int64_t u, int64_t next, Trail* trail, int64_t trail_per_k) const {
    const int64_t blk = width * u, nb = std::min<int64_t>(width, blocks - blk);
    const int64_t next_lines = next >= 0 && pf ? std::min<int64_t>(width, blocks - width * next) * lines : 0;
    const int64_t share = (next_lines + passes - 1) / passes;
    const char* ahead = reinterpret_cast<const char*>(wp) + width * std::max<int64_t>(next, 0) * lines * 64;
    for (int64_t p = 0, m0 = 0; m0 < M; p++, m0 += kRows) {
      const int64_t first = std::min(next_lines, p * share), count = std::min(next_lines, first + share) - first;
      const Ahead at{ahead + first * 64, count, (count + lines - 1) / lines, trail_per_k ? trail : nullptr, trail_per_k};
      switch (std::min<int64_t>(kRows, M - m0)) {
#define TILE(r) \
  case r: tile_rows<T, r>(xr + m0, wp, K, blk, nb, N, bias, yr + m0, accumulate, at); break;
        TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8)
#undef TILE
      }
    }
  }

  // Units u0..u1 on this thread, in order, its trail's lines (set_trail) spread evenly over their k steps.
  void units(int64_t u0, int64_t u1) const {
    Trail* trail = current_trail;
    const int64_t steps = (u1 - u0) * passes * lines;
    const int64_t trail_per_k = trail && steps > 0 ? (trail->left() + steps - 1) / steps : 0;
    for (int64_t u = u0; u < u1; u++) unit(u, u + 1 < u1 ? u + 1 : -1, trail, trail_per_k);
  }
};

template <typename T>
void run_linear(const torch::Tensor& x, const torch::Tensor& wp, int64_t n, const c10::optional<torch::Tensor>& bias,
                torch::Tensor& y, bool accumulate) {
  const int64_t M = x.size(0);
  const auto xr = row_pointers<const T*>(x);
  const auto yr = row_pointers<T*>(y);
  linear_rows<T>(xr.data(), M, wp.data_ptr<T>(), x.size(1), n, bias ? bias->data_ptr<T>() : nullptr, yr.data(),
                 accumulate, true);
}

}  // namespace

template <typename T>
void linear_rows(const T* const* xr, int64_t M, const T* wp, int64_t K, int64_t N, const T* bias, T* const* yr,
                 bool accumulate, bool may_split) {
  if constexpr (std::is_same<T, bf16>::value)
    if (amx_fits(M, K)) return amx_linear_rows(xr, M, wp, K, N, bias, yr, accumulate, may_split);
  const int64_t width = unit_blocks(M), blocks = (N + kBlock - 1) / kBlock, units = (blocks + width - 1) / width;
  const Stream<T> st{xr, M, wp, K, N, bias, yr, accumulate, width};
  auto body = [&](int64_t u0, int64_t u1) { st.units(u0, u1); };
  // Weights dominate: threads split the output columns, and every 8-row pass reuses a unit's weights from
  // cache. Small products stay on the calling thread (waking a worker costs more than they do): few weights
  // and few rows (a prefill's 512-row o-proj, 36 blocks × 576, ran on one thread: 13% of a bf16 prefill).
  const int64_t weights = blocks * K;
  if (!may_split || (weights < split_min.load(std::memory_order_relaxed) && M * weights < kSplitRowsWork))
    body(0, units);
  else if (M <= kPieceMinRows)  // decode-sized: shares of units, the idle thread stealing (parallel_units)
    parallel_units(units, [&](int64_t u, int64_t next) { st.unit(u, next, nullptr, 0); });
  else  // prefill-sized: pieces of units handed out as threads free up (a descheduled thread holds up one piece)
    parallel_pieces((units + kPieceUnits - 1) / kPieceUnits, [&](int64_t p) {
      body(p * kPieceUnits, std::min(units, (p + 1) * kPieceUnits));
    });
}

void set_trail(Trail* trail) { current_trail = trail; }

void set_streaming(bool prefetch, int64_t split_min_blocks_k, int64_t attend_split) {
  set_attend_split(attend_split);
  prefetch_next.store(prefetch);
  split_min.store(std::max<int64_t>(split_min_blocks_k, 0));
}

template void linear_rows<float>(const float* const*, int64_t, const float*, int64_t, int64_t, const float*,
                                 float* const*, bool, bool);
template void linear_rows<bf16>(const bf16* const*, int64_t, const bf16*, int64_t, int64_t, const bf16*,
                                bf16* const*, bool, bool);

template <typename T>
void linear_each(const T* const* xr, const T* const* wr, int64_t M, int64_t K, int64_t N, T* const* yr, bool accumulate) {
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  for (int64_t m0 = 0; m0 < M; m0 += kRows)
    for (int64_t blk = 0; blk < blocks; blk += 2) {
      const bool two = blocks - blk >= 2;
      switch (std::min<int64_t>(kRows, M - m0)) {
#define EACH(r)                                                                         \
  case r:                                                                               \
    if (two)                                                                            \
      tile_each<T, r, 2>(xr + m0, wr + m0, K, blk, N, yr + m0, accumulate);             \
    else                                                                                \
      tile_each<T, r, 1>(xr + m0, wr + m0, K, blk, N, yr + m0, accumulate);             \
    break;
        EACH(1) EACH(2) EACH(3) EACH(4) EACH(5) EACH(6) EACH(7) EACH(8)
#undef EACH
      }
    }
}

template void linear_each<float>(const float* const*, const float* const*, int64_t, int64_t, int64_t, float* const*, bool);
template void linear_each<bf16>(const bf16* const*, const bf16* const*, int64_t, int64_t, int64_t, bf16* const*, bool);

// W [N, K] -> the packed layout above.
torch::Tensor pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "pack: W must be 2-D [N, K]");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, "pack: float32 or bfloat16 only");
  const bool pairs = w.scalar_type() == at::kBFloat16;
  const int64_t N = w.size(0), K = w.size(1), Np = (N + kBlock - 1) / kBlock * kBlock, Kp = K + (pairs ? K % 2 : 0);
  auto padded = torch::zeros({Np, Kp}, w.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(w);
  if (!pairs) return padded.view({Np / kBlock, kBlock, Kp}).transpose(1, 2).contiguous();
  return padded.view({Np / kBlock, kBlock, Kp / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

// y (+)= x · Wᵀ (+ bias) into `y` (which may be a column slice of a wider tensor).
void linear_into(const torch::Tensor& x, const torch::Tensor& wp, int64_t n, const c10::optional<torch::Tensor>& bias,
                 torch::Tensor& y, bool accumulate) {
  check_rows(x, "x");
  check_rows(y, "y");
  TORCH_CHECK(x.scalar_type() == wp.scalar_type() && y.scalar_type() == x.scalar_type(), "linear: dtype mismatch");
  TORCH_CHECK(y.size(0) == x.size(0) && y.size(1) == n, "linear: y must be [M, N]");
  const int64_t K = x.size(1), packed_k = x.scalar_type() == at::kFloat ? K : (K + 1) / 2;
  TORCH_CHECK(wp.dim() >= 2 && wp.size(1) == packed_k && wp.size(0) * kBlock >= n, "linear: W does not match x");
  dispatch(x.scalar_type(), [&](auto tag) { run_linear<decltype(tag)>(x, wp, n, bias, y, accumulate); });
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& wp, int64_t n, const c10::optional<torch::Tensor>& bias) {
  auto y = torch::empty({x.size(0), n}, x.options());
  linear_into(x, wp, n, bias, y, false);
  return y;
}

}  // namespace trtllm_peft
