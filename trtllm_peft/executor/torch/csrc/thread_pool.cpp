// The kernels' own worker threads (kernels.h: parallel_for).
//
// Why not OpenMP: the engine runs in a background thread, and libgomp's team for a non-initial thread is
// woken through the kernel on every parallel region: measured ~40 µs per region here, 25% of a decode
// step's matmul time. These workers spin briefly between regions (a decode step issues them back to back)
// and sleep on a condition variable when idle, so an idle server costs no CPU.

#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "kernels.h"

namespace trtllm_peft {
namespace {

constexpr auto kSpin = std::chrono::microseconds(200);  // idle spinning before a worker sleeps
constexpr int kSpinsBeforeYield = 1024;                  // ~50 µs of _mm_pause

// Spins until done(), yielding the core after a while: on a shared machine the thread we wait for may be
// the one the OS descheduled, maybe onto this very core, and pure spinning would keep it off for a whole
// time slice (measured: a 2-thread step with a spin-only wait ran up to 20x slower at load 4 on 2 cores).
template <typename Done>
void wait_until(Done done) {
  for (int i = 0; !done(); i++) {
    if (i < kSpinsBeforeYield)
      _mm_pause();
    else
      std::this_thread::yield();
  }
}

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
    wait_until([&] { return done_.load() >= n; });
    gen_.store(open + 1);  // closed: late workers won't join
    wait_until([&] { return inflight_.load() == 0; });
  }

 private:
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
    }
  }

  // The next open job's generation (spinning first, then sleeping).
  uint64_t wait_for_job(uint64_t seen) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
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
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int64_t> next_{0}, done_{0};
  std::atomic<int> inflight_{0}, sleepers_{0};
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

}  // namespace

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
