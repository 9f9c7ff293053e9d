// y (M, N) = x (M, K) . w (N, K)^T in float32, for decoding on CPU: M is the batch (one new token per sequence),
// so every weight is read once per token and memory bandwidth is the limit. A MindSpore AOT custom op
// (knowlm/cpu_ops.py builds it); GCC/Clang vector extensions, so it compiles to AVX-512/AVX2/NEON alike.
//
// Eight rows of w stream at once: eight independent accumulators keep enough loads in flight to reach the
// machine's read bandwidth (measured on 2 cores: 1 row at a time 12 GB/s, 8 rows 26-34 GB/s, a plain sum 32 GB/s).
//
// Threads: the rows are split between the calling thread and helpers of our own (OMP_NUM_THREADS in all, else one
// per core). Not OpenMP: its idle workers busy-wait without yielding and starve MindSpore's runtime threads (a
// decode step took 35 ms instead of 19 ms); these helpers, like MindSpore's, yield while they wait, then sleep.
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

namespace {

constexpr int kLanes = 16;
constexpr int kRows = 8;
// How long a helper yields, waiting for the next product, before it sleeps: long enough to stay awake through the
// other ops between two products of a decode step (waking a sleeping thread costs tens of microseconds, a
// product of the small benchmark config 50-150), short enough to leave the cores alone once decoding stops.
// In-process A/B on the small config, kernel vs MatMul: 0.5 ms 16.9 vs 17.5 ms, 2 ms 18.1 vs 18.5, 10 ms 19.4 vs 18.4.
constexpr std::chrono::microseconds kAwake(1000);
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float *p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));   // unaligned load; compiles to one vector move
  return v;
}

struct Gemv {
  const float *x, *w;
  float *y;
  int64_t m_rows, n_cols, k_len;

  template <int R>
  void Rows(int64_t n) const {
    const float *rows = w + n * k_len;
    for (int64_t m = 0; m < m_rows; ++m) {
      const float *xm = x + m * k_len;
      Vec acc[R] = {};
      int64_t k = 0;
      for (; k + kLanes <= k_len; k += kLanes) {
        const Vec xv = Load(xm + k);
        for (int r = 0; r < R; ++r) acc[r] += Load(rows + r * k_len + k) * xv;
      }
      for (int r = 0; r < R; ++r) {
        float sum = 0.0f;
        for (int lane = 0; lane < kLanes; ++lane) sum += acc[r][lane];
        for (int64_t j = k; j < k_len; ++j) sum += rows[r * k_len + j] * xm[j];
        y[m * n_cols + n + r] = sum;
      }
    }
  }

  // Part `part` of `parts`: whole groups of kRows rows; the last part also takes the rows left over.
  void Part(int part, int parts) const {
    const int64_t groups = n_cols / kRows;
    const int64_t first = groups * part / parts, last = groups * (part + 1) / parts;
    for (int64_t g = first; g < last; ++g) Rows<kRows>(g * kRows);
    if (part + 1 == parts) {
      for (int64_t n = groups * kRows; n < n_cols; ++n) Rows<1>(n);
    }
  }
};

int ThreadCount() {
  const char *env = std::getenv("OMP_NUM_THREADS");   // the knob torch and BLAS libraries follow too
  const int threads = env ? std::atoi(env) : static_cast<int>(std::thread::hardware_concurrency());
  return threads > 0 ? threads : 1;
}

class Pool {
 public:
  explicit Pool(int helpers) : pid_(getpid()), helpers_(helpers) {
    for (int i = 0; i < helpers; ++i) std::thread(&Pool::Help, this, i + 1).detach();
  }

  bool ForkedSince() const { return getpid() != pid_; }

  void Run(const Gemv &job) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || helpers_ == 0) {   // another MindSpore thread has the helpers: do it alone
      job.Part(0, 1);
      return;
    }
    job_ = &job;
    pending_.store(helpers_, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(sleep_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    job.Part(0, helpers_ + 1);
    while (pending_.load(std::memory_order_acquire) != 0) sched_yield();
  }

 private:
  void Help(int part) {
    uint64_t seen = 0;
    for (;;) {
      const auto idle = std::chrono::steady_clock::now();
      while (generation_.load(std::memory_order_acquire) == seen) {
        if (std::chrono::steady_clock::now() - idle < kAwake) {
          sched_yield();
        } else {
          std::unique_lock<std::mutex> lock(sleep_);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      job_->Part(part, helpers_ + 1);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  const pid_t pid_;
  const int helpers_;
  std::mutex busy_, sleep_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  const Gemv *volatile job_ = nullptr;
};

Pool &Helpers() {
  // Never destroyed (helpers may be asleep at exit); rebuilt in a forked child, which has no helper threads.
  static Pool *pool = new Pool(ThreadCount() - 1);
  static std::mutex rebuild;
  if (pool->ForkedSince()) {
    std::lock_guard<std::mutex> lock(rebuild);
    if (pool->ForkedSince()) pool = new Pool(ThreadCount() - 1);
  }
  return *pool;
}

}  // namespace

// MindSpore's AOT calling convention: params = inputs then outputs; returns 0 on success.
extern "C" int KnowLMGemv(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 2 || shapes[0][1] != shapes[1][1]) return 1;
  for (int i = 0; i < 3; ++i) {
    if (std::strcmp(dtypes[i], "float32") != 0) return 2;
  }
  const Gemv job{static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                 static_cast<float *>(params[2]), shapes[0][0], shapes[1][0], shapes[0][1]};
  Helpers().Run(job);
  return 0;
}
