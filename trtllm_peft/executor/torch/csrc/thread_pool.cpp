// The kernels' own worker threads (kernels.h: parallel_for).
//
// Why not OpenMP: the engine runs in a background thread, and libgomp's team for a non-initial thread is
// woken through the kernel on every parallel region: measured ~40 µs per region here, 25% of a decode
// step's matmul time. These workers spin briefly between regions (a decode step issues them back to back)
// and sleep on a condition variable when idle, so an idle server costs no CPU; the caller, waiting for a late
// worker, sleeps too (Pool::await).

#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

#include "kernels.h"

namespace trtllm_peft {
namespace {

// Idle spinning before a worker sleeps (set_split). 50 µs, not 200: the workers spun ~40% of their CPU between
// regions while the engine thread ran serial work; beside a busy-looping process, 50 µs (with the caller
// asleep while late and decode products stolen, below) gave 1.05-1.27x the tokens per CPU-second of 200
// (bench/decode_split.py --busy 1, six cases), and quiet the same tokens/s within noise.
std::atomic<int64_t> spin_us{50};
std::atomic<bool> steal{true};      // parallel_units: shares with stealing (false: contiguous halves, A/B)
std::atomic<bool> block{true};      // the caller sleeps when its workers are late (false: yields in a loop, A/B)
constexpr int kSpinsBeforeWait = 1024;  // ~20-50 µs of _mm_pause before the caller sleeps (or yields)

class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; i++) threads_.emplace_back([this, i] { work(i); });
  }
  int workers() const { return static_cast<int>(threads_.size()); }

  // Runs task(0..n-1) on the caller and up to `helpers` workers; returns when every task is done.
  void run(int64_t n, int helpers, const std::function<void(int64_t)>& task) {
    std::unique_lock<std::mutex> busy(run_, std::try_to_lock);
    if (!busy.owns_lock() || helpers <= 0) {  // another caller holds the pool: do the work here
      for (int64_t i = 0; i < n; i++) task(i);
      return;
    }
    task_ = &task;
    n_ = n;
    helpers_ = helpers;
    next_.store(0);
    done_.store(0);
    const uint64_t open = gen_.load() + 1;  // odd: a job is open
    gen_.store(open);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lk(m_);
      cv_.notify_all();
    }
    drain();
    await([&] { return done_.load() >= n; });
    gen_.store(open + 1);  // closed: late workers won't join
    await([&] { return inflight_.load() == 0; });
  }

 private:
  // The caller waits for its workers: spinning briefly (they are usually about to finish), then asleep until
  // one wakes it. On a shared machine the thread waited for may be the one the OS descheduled; pure spinning
  // would keep it off for a whole time slice (measured: a 2-thread step with a spin-only wait ran up to 20x
  // slower at load 4 on 2 cores), and yielding in a loop keeps this core busy, so the scheduler never gives
  // it the waiting thread. Asleep, its core goes idle and may.
  template <typename Done>
  void await(Done done) {
    for (int i = 0; !done(); i++) {
      if (i < kSpinsBeforeWait) {
        _mm_pause();
      } else if (!block.load(std::memory_order_relaxed)) {
        std::this_thread::yield();
      } else {
        std::unique_lock<std::mutex> lk(m_);
        caller_asleep_.store(true);
        caller_cv_.wait(lk, done);
        caller_asleep_.store(false);
        return;
      }
    }
  }

  // After a worker's last task or its leaving a job: the caller may be asleep in await().
  void wake_caller() {
    if (!caller_asleep_.load()) return;
    std::lock_guard<std::mutex> lk(m_);
    caller_cv_.notify_one();
  }

  void drain() {
    for (int64_t i; (i = next_.fetch_add(1)) < n_;) {
      (*task_)(i);
      done_.fetch_add(1);
    }
  }

  void work(int id) {
    uint64_t seen = 0;
    for (;;) {
      const uint64_t g = wait_for_job(seen);
      seen = g;
      if (id >= helpers_) continue;
      inflight_.fetch_add(1);
      if (gen_.load() == g) drain();
      inflight_.fetch_sub(1);
      wake_caller();
    }
  }

  // The next open job's generation (spinning first, then sleeping).
  uint64_t wait_for_job(uint64_t seen) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us.load());
    for (int i = 0;; i++) {
      const uint64_t g = gen_.load();
      if (g != seen && (g & 1)) return g;
      if ((i & 255) == 0 && std::chrono::steady_clock::now() > until) break;
      _mm_pause();
    }
    std::unique_lock<std::mutex> lk(m_);
    sleepers_.fetch_add(1);
    cv_.wait(lk, [&] {
      const uint64_t g = gen_.load();
      return g != seen && (g & 1);
    });
    sleepers_.fetch_sub(1);
    return gen_.load();
  }

  std::vector<std::thread> threads_;
  std::mutex run_, m_;
  std::condition_variable cv_, caller_cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int64_t> next_{0}, done_{0};
  std::atomic<int> inflight_{0}, sleepers_{0};
  std::atomic<bool> caller_asleep_{false};
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t n_ = 0;
  int helpers_ = 0;
};

Pool& pool() {
  // Workers live for the process (detached at exit): one fewer than the cores, the caller being the other.
  static Pool* p = new Pool(std::max(1u, std::thread::hardware_concurrency()) - 1);
  return *p;
}

// Threads the kernels use, set by the engine (0: torch's count in the calling thread). Our own setting, since
// torch's is shared with every other thread of the process: another executor's engine thread dropping
// torch to one thread (the plain-torch ops do, between their big matmuls) must not slow this one.
std::atomic<int> num_threads{0};

// One thread's share of a parallel_units call: a contiguous stretch of units, taken from its front by its
// owner and from its back by threads done with their own. Both ends in one word: a claim is one
// compare-exchange, and the line stays in the owner's cache until a thief comes.
struct alignas(64) Share {
  std::atomic<uint64_t> ends{0};  // front | back << 32
  void set(int64_t front, int64_t back) { ends.store(static_cast<uint64_t>(front) | static_cast<uint64_t>(back) << 32); }
  // The unit at the front (or back) end, and the one after it at that end (-1: none); false when empty.
  bool take(bool back_end, int64_t& u, int64_t& next) {
    uint64_t v = ends.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t f = static_cast<int64_t>(v & 0xffffffffu), b = static_cast<int64_t>(v >> 32);
      if (f >= b) return false;
      const uint64_t w = back_end ? v - (uint64_t{1} << 32) : v + 1;
      if (ends.compare_exchange_weak(v, w, std::memory_order_acq_rel)) {
        u = back_end ? b - 1 : f;
        next = back_end ? (u - 1 >= f ? u - 1 : -1) : (u + 1 < b ? u + 1 : -1);
        return true;
      }
    }
  }
};

}  // namespace

void set_split(bool steal_units, int64_t spin, bool sleep) {
  steal.store(steal_units);
  block.store(sleep);
  spin_us.store(std::max<int64_t>(spin, 0));
}

void parallel_units(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t threads = std::min<int64_t>(kernel_threads(), n);
  if (threads <= 1) {
    for (int64_t u = 0; u < n; u++) fn(u, u + 1 < n ? u + 1 : -1);
    return;
  }
  if (!steal.load(std::memory_order_relaxed)) {  // the A/B's old split: one contiguous stretch per thread
    pool().run(threads, static_cast<int>(threads - 1), [&](int64_t c) {
      for (int64_t u = n * c / threads, end = n * (c + 1) / threads; u < end; u++) fn(u, u + 1 < end ? u + 1 : -1);
    });
    return;
  }
  std::unique_ptr<Share[]> shares(new Share[threads]);
  for (int64_t c = 0; c < threads; c++) shares[c].set(n * c / threads, n * (c + 1) / threads);
  pool().run(threads, static_cast<int>(threads - 1), [&](int64_t c) {
    int64_t u, next;
    while (shares[c].take(false, u, next)) fn(u, next);
    for (int64_t d = 1; d < threads; d++)  // then the others' leftovers, from their back ends
      while (shares[(c + d) % threads].take(true, u, next)) fn(u, next);
  });
}

void set_num_threads(int n) { num_threads.store(std::max(n, 0)); }

int kernel_threads() {
  const int wanted = num_threads.load() > 0 ? num_threads.load() : at::get_num_threads();
  return std::max(1, std::min(wanted, pool().workers() + 1));
}

void parallel_pieces(int64_t n, const std::function<void(int64_t)>& fn) {
  const int threads = kernel_threads();
  if (threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; i++) fn(i);
    return;
  }
  pool().run(n, threads - 1, fn);
}

void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int threads = kernel_threads();
  const int64_t chunks = std::min<int64_t>(threads, (n + std::max<int64_t>(grain, 1) - 1) / std::max<int64_t>(grain, 1));
  if (chunks <= 1) {
    fn(begin, end);
    return;
  }
  const int64_t step = (n + chunks - 1) / chunks;
  pool().run(chunks, static_cast<int>(chunks - 1), [&](int64_t c) {
    const int64_t b = begin + c * step;
    if (b < end) fn(b, std::min(end, b + step));
  });
}

}  // namespace trtllm_peft
