// bfloat16 y (+)= x · Wᵀ (+ b) on AMX tiles, for products of more than a few rows (decode at batch >= 5, prefill,
// the lm_head): the weight-streaming kernel of linear.cpp does 32 bf16 MACs per vdpbf16ps, a tile multiply does
// 16·16·32, so once a product has enough rows to reuse each weight tile it is compute-bound there and not here.
//
// No repacking: linear.cpp's bfloat16 layout [ceil(N/16), ceil(K/2), 16, 2] already is the VNNI layout of
// AMX's B operand — 16 k-pairs × 16 columns × 2 of one block are one 1 KiB tile with a 64-byte stride. So
// the same packed weight serves both kernels and nothing is converted per step. x's rows (any pointers) are
// copied once per call into a contiguous zero-padded buffer, the A operand.
//
// Blocking: 2×2 C tiles (32 rows × 32 columns, float32) with 2 A and 2 B tiles per 32 k; threads split the
// output columns (a unit's weights, K·64 B, stay in L2 while all row blocks reuse them).
//
// Runtime gate (any CPU the module loads on): cpuid AMX-TILE + AMX-BF16, the OS enabling the tile state in
// XCR0, and Linux granting this process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM). Compiled with target
// attributes only: the rest of the module never contains an AMX instruction.

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>

#include "kernels.h"

namespace trtllm_peft {
namespace {

constexpr int64_t kTileK = 32;  // bf16 k per tile multiply (16 rows of 64 bytes in A, 16 k pairs in B)
constexpr int64_t kTileM = 16;  // rows of an A / C tile
constexpr int64_t kStreamRows = 64;  // products with more rows load x with the streaming hint (tile_block)

bool detect_amx() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
  if (!tile || !bf16 || !(c & (1u << 27))) return false;  // ecx bit 27: OSXSAVE, so xgetbv is allowed
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;  // XTILECFG and XTILEDATA enabled by the OS
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // <asm/prctl.h>, Linux >= 5.16
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

bool amx_here() {
  static const bool ok = detect_amx();
  return ok;
}

std::atomic<bool> amx_on{true};
std::atomic<int64_t> products{0};  // AMX products since load (tests check which path ran)
constexpr int64_t kPieceUnits = 2;
std::atomic<int64_t> amx_min_rows{kAmxMinRows};
std::atomic<bool> amx_prefetch{true};   // software prefetch of the weights (bench/amx.py compares)
// set_amx_streaming's knobs: how the weights are prefetched (kAheadUnit: the next unit at the same k into L1;
// kAheadSteps / kAheadStepsL2: `distance` k steps of 32 ahead, across the unit's end, into L1 / L2) and about
// how many dynamic pieces each thread takes.
enum Ahead : int { kAheadUnit = 1, kAheadSteps = 2, kAheadStepsL2 = 3 };
std::atomic<int> ahead_mode{kAheadUnit};
std::atomic<int64_t> ahead_distance{4}, pieces_per_thread{4};

// Where a unit's weights are prefetched from while it computes (tile_block): `unit` is its first block's
// k-step-0 tile; both blocks' tiles `distance` k steps ahead are prefetched each step, continuing into the
// next unit (contiguous after this one) unless this is the piece's last unit.
struct Prefetch {
  int mode = 0;  // 0: none
  const bf16* next = nullptr;  // kAheadUnit: the next unit (null: none)
  const bf16* unit = nullptr;
  int64_t distance = 0;
  bool last = true;
};

// Both 1 KiB tiles (block 0 and 1) of the unit starting at `u`, k step `s` (of 32 k), as 32 line prefetches.
template <_mm_hint Hint>
inline void prefetch_tiles(const bf16* u, int64_t K, int64_t s) {
  const char* t0 = reinterpret_cast<const char*>(u + s * kTileK * kBlock);
  const char* t1 = t0 + K * kBlock * sizeof(bf16);
  for (int64_t line = 0; line < 1024; line += 64) {
    _mm_prefetch(t0 + line, Hint);
    _mm_prefetch(t1 + line, Hint);
  }
}

// The prefetches of k step `s` (of 32 k) of a unit.
inline void prefetch_step(const Prefetch& pf, int64_t K, int64_t s) {
  if (pf.mode == kAheadUnit) {
    if (pf.next) prefetch_tiles<_MM_HINT_T0>(pf.next, K, s);
    return;
  }
  const int64_t steps = K / kTileK, t = s + pf.distance;
  if (t >= steps && pf.last) return;
  const bf16* u = t < steps ? pf.unit : pf.unit + 2 * K * kBlock;  // the next unit follows this one
  if (pf.mode == kAheadSteps)
    prefetch_tiles<_MM_HINT_T0>(u, K, t % steps);
  else
    prefetch_tiles<_MM_HINT_T1>(u, K, t % steps);
}

// Tile configuration: palette 1, tiles 0-3 C (16 × 64 B), 4-5 A (16 × 64 B), 6-7 B (16 × 64 B).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; t++) {
      colsb[t] = 64;
      rows[t] = 16;
    }
  }
};

// C tile `c` (float32, 16 × 16 in buf) plus bias, added to or written into y's rows at column `col`.
void store_c(const float* buf, int64_t rows, int64_t col, int64_t N, const bf16* bias, bf16* const* y, bool accumulate) {
  const __mmask16 mask = tail_mask(N, col);
  const __m512 b = bias ? load16(bias + col, mask) : _mm512_setzero_ps();
  for (int64_t m = 0; m < rows; m++) {
    __m512 v = _mm512_add_ps(_mm512_loadu_ps(buf + m * kTileM), b);
    if (accumulate) v = _mm512_add_ps(v, load16(y[m] + col, mask));
    store16(y[m] + col, v, mask);
  }
}

// Rows m0.. (MA A tiles) of the padded x against column blocks blk.. (NB B tiles), all of K.
// `pf`: the weights ahead (Prefetch), prefetched tile by tile while this unit computes — a tile load that
// misses to DRAM stalls the multiplies behind it (measured in the engine: 4-5 GB/s from DRAM without it). SA: x's tiles are loaded with the streaming hint (tileloaddt1), for products of more than
// kStreamRows rows (prefill): there x is re-read once per unit from L2 while the unit's weights serve every
// row block, so x must not evict them from L1 (measured, weights in cache, 1 thread: 512 rows 1.2-1.6x,
// 128 rows 1.1x; at 64 rows with the weights streamed from DRAM (decode) it was 15% slower).
template <int MA, int NB, bool SA>
__attribute__((target("amx-tile,amx-bf16"))) void tile_block(const bf16* xa, int64_t K, const bf16* wp, int64_t blk,
                                                             int64_t rows, int64_t N, const bf16* bias,
                                                             bf16* const* y, bool accumulate, const Prefetch& pf) {
  const int64_t pairs = K / 2, xstride = K * sizeof(bf16);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const bf16* b0 = wp + blk * pairs * 2 * kBlock;
  const bf16* b1 = b0 + pairs * 2 * kBlock;
  for (int64_t k = 0; k < K; k += kTileK) {
    if (pf.mode) prefetch_step(pf, K, k / kTileK);
    if constexpr (SA) {
      _tile_stream_loadd(4, xa + k, xstride);
      if (MA == 2) _tile_stream_loadd(5, xa + kTileM * K + k, xstride);
    } else {
      _tile_loadd(4, xa + k, xstride);
      if (MA == 2) _tile_loadd(5, xa + kTileM * K + k, xstride);
    }
    _tile_loadd(6, b0 + k * kBlock, 64);
    if (NB == 2) _tile_loadd(7, b1 + k * kBlock, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (NB == 2) _tile_dpbf16ps(1, 4, 7);
    if (MA == 2) _tile_dpbf16ps(2, 5, 6);
    if (MA == 2 && NB == 2) _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float buf[4][kTileM * kBlock];
  _tile_stored(0, buf[0], 64);
  if (NB == 2) _tile_stored(1, buf[1], 64);
  if (MA == 2) _tile_stored(2, buf[2], 64);
  if (MA == 2 && NB == 2) _tile_stored(3, buf[3], 64);
  for (int a = 0; a < MA; a++) {
    const int64_t r = std::min<int64_t>(kTileM, rows - a * kTileM);
    for (int j = 0; j < NB; j++)
      store_c(buf[a * 2 + j], r, (blk + j) * kBlock, N, bias, y + a * kTileM, accumulate);
  }
}

// The tile_block for `rows` (1..32) and one or two column blocks.
template <bool SA>
__attribute__((target("amx-tile,amx-bf16"))) void row_block(const bf16* x, int64_t K, const bf16* wp, int64_t blk, bool two, int64_t rows, int64_t N,
               const bf16* bias, bf16* const* y, bool accumulate, const Prefetch& pf) {
  if (rows > kTileM) {
    if (two)
      tile_block<2, 2, SA>(x, K, wp, blk, rows, N, bias, y, accumulate, pf);
    else
      tile_block<2, 1, SA>(x, K, wp, blk, rows, N, bias, y, accumulate, pf);
  } else if (two) {
    tile_block<1, 2, SA>(x, K, wp, blk, rows, N, bias, y, accumulate, pf);
  } else {
    tile_block<1, 1, SA>(x, K, wp, blk, rows, N, bias, y, accumulate, pf);
  }
}

// Column units u0..u1 (two 16-column blocks each) over every row block.
__attribute__((target("amx-tile,amx-bf16"))) void amx_units(const bf16* xa, int64_t M, int64_t K, const bf16* wp,
                                                            int64_t N, const bf16* bias, bf16* const* yr,
                                                            bool accumulate, int64_t u0, int64_t u1) {
  static const TileConfig config;
  _tile_loadconfig(&config);  // per thread: the tile state is per thread
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  const int mode = amx_prefetch.load(std::memory_order_relaxed) ? ahead_mode.load(std::memory_order_relaxed) : 0;
  const int64_t distance = std::min(ahead_distance.load(std::memory_order_relaxed), K / kTileK);
  const Prefetch none;
  if (mode >= kAheadSteps)  // the piece's first unit: its first `distance` steps, before the first tile load
    for (int64_t s = 0; s < distance; s++)
      prefetch_tiles<_MM_HINT_T0>(wp + 2 * u0 * (K / 2) * 2 * kBlock, K, s);
  for (int64_t u = u0; u < u1; u++) {
    const int64_t blk = 2 * u;
    const bool two = blocks - blk >= 2;
    const bf16* unit = wp + blk * (K / 2) * 2 * kBlock;
    Prefetch pf{mode, nullptr, unit, distance, u + 1 >= u1};
    if (mode == kAheadUnit && u + 1 < u1) pf.next = unit + 2 * K * kBlock;
    for (int64_t m0 = 0; m0 < M; m0 += 2 * kTileM) {
      const int64_t rows = std::min<int64_t>(2 * kTileM, M - m0);
      const bf16* x = xa + m0 * K;
      const Prefetch& ahead = m0 == 0 ? pf : none;  // once per unit
      if (M > kStreamRows)
        row_block<true>(x, K, wp, blk, two, rows, N, bias, yr + m0, accumulate, ahead);
      else
        row_block<false>(x, K, wp, blk, two, rows, N, bias, yr + m0, accumulate, ahead);
    }
  }
  _tile_release();
}

}  // namespace

bool amx_available() { return amx_here(); }

bool set_amx(bool on, int64_t min_rows, bool prefetch) {
  amx_on.store(on && amx_here());
  amx_min_rows.store(std::max<int64_t>(min_rows, 1));
  amx_prefetch.store(prefetch);
  return amx_on.load();
}

// amx_here() on first use, whichever thread that is: detection also asks Linux for the tile state, which a
// tile instruction before it would fault on (SIGILL).
bool amx_fits(int64_t M, int64_t K) {
  return M >= amx_min_rows.load() && K % kTileK == 0 && amx_on.load() && amx_here();
}

void amx_linear_rows(const bf16* const* xr, int64_t M, const bf16* wp, int64_t K, int64_t N, const bf16* bias,
                     bf16* const* yr, bool accumulate, bool may_split) {
  thread_local std::vector<bf16> buffer;  // [ceil(M/16)·16, K]: rows past M zero
  const int64_t padded = (M + kTileM - 1) / kTileM * kTileM;
  buffer.resize(padded * K);
  bf16* xa = buffer.data();  // the workers see this thread's buffer through the pointer, not their own
  for (int64_t m = 0; m < M; m++) std::memcpy(xa + m * K, xr[m], K * sizeof(bf16));
  std::memset(static_cast<void*>(xa + M * K), 0, (padded - M) * K * sizeof(bf16));
  const int64_t units = ((N + kBlock - 1) / kBlock + 1) / 2;
  products.fetch_add(1, std::memory_order_relaxed);
  if (!may_split || kernel_threads() == 1) return amx_units(xa, M, K, wp, N, bias, yr, accumulate, 0, units);
  // Pieces of at least kPieceUnits units, about kPiecesPerThread per thread, handed out dynamically.
  const int64_t per = std::max<int64_t>(kPieceUnits, units / (pieces_per_thread.load() * kernel_threads()));
  parallel_pieces((units + per - 1) / per, [&](int64_t p) {
    amx_units(xa, M, K, wp, N, bias, yr, accumulate, p * per, std::min(units, (p + 1) * per));
  });
}

int64_t amx_products() { return products.load(); }

void set_amx_streaming(int64_t mode, int64_t distance, int64_t pieces) {
  TORCH_CHECK(mode >= kAheadUnit && mode <= kAheadStepsL2 && distance >= 1 && pieces >= 1,
              "set_amx_streaming: mode 1-3, distance >= 1, pieces >= 1");
  ahead_mode.store(static_cast<int>(mode));
  ahead_distance.store(distance);
  pieces_per_thread.store(pieces);
}

}  // namespace trtllm_peft
