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
constexpr int64_t kPieceUnits = 2, kPiecesPerThread = 4;
std::atomic<int64_t> amx_min_rows{kAmxMinRows};
std::atomic<bool> amx_prefetch{true};   // software prefetch of the next unit's weights (bench/amx.py compares)

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
// `ahead`: the next unit's weights (or null), prefetched tile by tile while this unit computes — a tile
// load that misses to DRAM stalls the multiplies behind it (measured in the engine: 4-5 GB/s from DRAM
// without it). SA: x's tiles are loaded with the streaming hint (tileloaddt1), for products of more than
// kStreamRows rows (prefill): there x is re-read once per unit from L2 while the unit's weights serve every
// row block, so x must not evict them from L1 (measured, weights in cache, 1 thread: 512 rows 1.2-1.6x,
// 128 rows 1.1x; at 64 rows with the weights streamed from DRAM (decode) it was 15% slower).
template <int MA, int NB, bool SA>
__attribute__((target("amx-tile,amx-bf16"))) void tile_block(const bf16* xa, int64_t K, const bf16* wp, int64_t blk,
                                                             int64_t rows, int64_t N, const bf16* bias,
                                                             bf16* const* y, bool accumulate, const bf16* ahead) {
  const int64_t pairs = K / 2, xstride = K * sizeof(bf16);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const bf16* b0 = wp + blk * pairs * 2 * kBlock;
  const bf16* b1 = b0 + pairs * 2 * kBlock;
  for (int64_t k = 0; k < K; k += kTileK) {
    if (ahead)
      for (int64_t line = 0; line < 2 * kTileM * 64; line += 64)  // both tiles of the next unit at this k
        _mm_prefetch(reinterpret_cast<const char*>(ahead + k * kBlock) + (line & 1023) + (line >> 10) * pairs * 64,
                     _MM_HINT_T0);
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
               const bf16* bias, bf16* const* y, bool accumulate, const bf16* ahead) {
  if (rows > kTileM) {
    if (two)
      tile_block<2, 2, SA>(x, K, wp, blk, rows, N, bias, y, accumulate, ahead);
    else
      tile_block<2, 1, SA>(x, K, wp, blk, rows, N, bias, y, accumulate, ahead);
  } else if (two) {
    tile_block<1, 2, SA>(x, K, wp, blk, rows, N, bias, y, accumulate, ahead);
  } else {
    tile_block<1, 1, SA>(x, K, wp, blk, rows, N, bias, y, accumulate, ahead);
  }
}

// Column units u0..u1 (two 16-column blocks each) over every row block.
__attribute__((target("amx-tile,amx-bf16"))) void amx_units(const bf16* xa, int64_t M, int64_t K, const bf16* wp,
                                                            int64_t N, const bf16* bias, bf16* const* yr,
                                                            bool accumulate, int64_t u0, int64_t u1) {
  static const TileConfig config;
  _tile_loadconfig(&config);  // per thread: the tile state is per thread
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  const bool prefetch = amx_prefetch.load(std::memory_order_relaxed);
  for (int64_t u = u0; u < u1; u++) {
    const int64_t blk = 2 * u;
    const bool two = blocks - blk >= 2;
    const bf16* next = u + 1 < u1 && prefetch ? wp + (blk + 2) * (K / 2) * 2 * kBlock : nullptr;
    for (int64_t m0 = 0; m0 < M; m0 += 2 * kTileM) {
      const int64_t rows = std::min<int64_t>(2 * kTileM, M - m0);
      const bf16* x = xa + m0 * K;
      const bf16* ahead = m0 == 0 ? next : nullptr;  // once per unit
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
  const int64_t per = std::max<int64_t>(kPieceUnits, units / (kPiecesPerThread * kernel_threads()));
  parallel_pieces((units + per - 1) / per, [&](int64_t p) {
    amx_units(xa, M, K, wp, N, bias, yr, accumulate, p * per, std::min(units, (p + 1) * per));
  });
}

int64_t amx_products() { return products.load(); }

}  // namespace trtllm_peft
