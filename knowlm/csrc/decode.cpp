// knowlm's CPU decoding kernels, MindSpore AOT custom ops (knowlm/cpu_ops.py builds and calls them), float32:
//
// - KnowLMGemv: y (M, N) = x (M, K) . w (N, K)^T for a few rows M (one new token per sequence): the lm_head.
// - KnowLMRmsNorm: LLaMA's RMSNorm, for the final norm of a generation model.
// - KnowLMRope, KnowLMRopeGrad: rotate-half RoPE and its gradient, for training (one thread).
// - KnowLMDecodeLayer: one whole LLaMA decoder layer for one new token per sequence (RMSNorm, q/k/v, rotate-half
//   RoPE, KV-cache write, attention over the cache, o, residual, RMSNorm, SwiGLU feed-forward, residual). A decode
//   step of MindSpore ops is ~50 kernels per layer whose launches cost more than their arithmetic on small models;
//   this is one.
//
// Decoding reads every weight once per token, so memory bandwidth is the limit. Eight weight rows stream at once:
// eight independent accumulators keep enough loads in flight to reach the machine's read bandwidth (measured on
// 2 cores: 1 row at a time 12 GB/s, 8 rows 26-34 GB/s, a plain sum 32 GB/s). GCC/Clang vector extensions, so it
// compiles to AVX-512/AVX2/NEON alike.
//
// Threads: work is split between the calling thread and helpers of our own, KnowLMSetThreads in all (knowlm.cpu_ops
// passes OMP_NUM_THREADS as the process started with it: MindSpore sets the variable to 1 once it runs a graph, which
// left the kernels on one thread), else one per core. Not OpenMP: its idle workers busy-wait without yielding and
// starve MindSpore's runtime threads (a decode step took 35 ms instead of 19 ms); these helpers, like MindSpore's,
// yield while they wait, then sleep.
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

namespace {

constexpr int kLanes = 16;
constexpr int kRows = 8;
// How long a helper yields, waiting for the next job, before it sleeps: long enough to stay awake through the
// other ops between two jobs of a decode step (waking a sleeping thread costs tens of microseconds, a product of
// the small benchmark config 50-150), short enough to leave the cores alone once decoding stops.
constexpr std::chrono::microseconds kAwake(1000);
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float *p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));   // unaligned load; compiles to one vector move
  return v;
}

inline float Dot(const float *a, const float *b, int64_t n) {
  Vec acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += Load(a + i) * Load(b + i);
  float sum = 0.0f;
  for (int lane = 0; lane < kLanes; ++lane) sum += acc[lane];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

struct Job {
  virtual void Part(int part, int parts) const = 0;
  virtual ~Job() = default;
};

// y_s (M, N_s) = x (M, K) . w_s (N_s, K)^T for up to three weights sharing x (q/k/v, gate/up), split between the
// threads by groups of kRows rows.
struct Products : Job {
  static constexpr int kMax = 3;
  const float *x;
  int64_t m_rows, k_len;
  int count = 0;
  const float *w[kMax];
  float *y[kMax];
  int64_t n[kMax];

  Products(const float *x_, int64_t m_rows_, int64_t k_len_) : x(x_), m_rows(m_rows_), k_len(k_len_) {}

  Products &Add(const float *weight, float *out, int64_t rows) {
    w[count] = weight;
    y[count] = out;
    n[count] = rows;
    ++count;
    return *this;
  }

  template <int R>
  void Rows(int s, int64_t first) const {
    const float *rows = w[s] + first * k_len;
    // The next group's rows are fetched into L2 while this group streams: the hardware prefetcher alone restarts at
    // every group, which held rows of 512 to 23 GB/s on the 2-core machine (29-31 GB/s with this).
    const float *ahead = first + 2 * R <= n[s] ? rows + R * k_len : rows;
    for (int64_t m = 0; m < m_rows; ++m) {
      const float *xm = x + m * k_len;
      Vec acc[R] = {};
      int64_t k = 0;
      for (; k + kLanes <= k_len; k += kLanes) {
        const Vec xv = Load(xm + k);
        for (int r = 0; r < R; ++r) {
          __builtin_prefetch(ahead + r * k_len + k, 0, 2);
          acc[r] += Load(rows + r * k_len + k) * xv;
        }
      }
      for (int r = 0; r < R; ++r) {
        float sum = 0.0f;
        for (int lane = 0; lane < kLanes; ++lane) sum += acc[r][lane];
        for (int64_t j = k; j < k_len; ++j) sum += rows[r * k_len + j] * xm[j];
        y[s][m * n[s] + first + r] = sum;
      }
    }
  }

  void Part(int part, int parts) const override {
    int64_t groups[kMax], total = 0;
    for (int s = 0; s < count; ++s) total += groups[s] = (n[s] + kRows - 1) / kRows;
    const int64_t first = total * part / parts, last = total * (part + 1) / parts;
    int s = 0;
    int64_t base = 0;                 // groups of the weights before s
    for (int64_t g = first; g < last; ++g) {
      while (g - base >= groups[s]) base += groups[s++];
      const int64_t row = (g - base) * kRows;
      if (row + kRows <= n[s]) {
        Rows<kRows>(s, row);
      } else {
        for (int64_t r = row; r < n[s]; ++r) Rows<1>(s, r);
      }
    }
  }
};

// Attention of one new token per sequence over its cached keys/values, split between the threads by
// (sequence, head). Caches are head-major (kv_heads * rows_per_head, dim); a sequence's position p is in slot
// block_tables[p / block_size] * block_size + p % block_size; positions >= valid[b] are not attended to.
struct Attention : Job {
  const float *q, *key_cache, *value_cache;
  const int32_t *block_tables, *valid;
  float *out;
  int64_t batch, heads, kv_heads, dim, max_blocks, block_size, rows_per_head;
  float scale;

  void Part(int part, int parts) const override {
    const int64_t tasks = batch * heads;
    std::vector<float> scores;
    for (int64_t task = tasks * part / parts; task < tasks * (part + 1) / parts; ++task) {
      const int64_t b = task / heads, head = task % heads;
      const float *query = q + task * dim;
      const float *keys = key_cache + head / (heads / kv_heads) * rows_per_head * dim;
      const float *values = value_cache + (keys - key_cache);
      const int32_t *blocks = block_tables + b * max_blocks;
      const int64_t length = valid[b];
      scores.resize(length);
      float top = -INFINITY;
      for (int64_t p = 0; p < length; ++p) {
        const int64_t slot = int64_t{blocks[p / block_size]} * block_size + p % block_size;
        scores[p] = Dot(query, keys + slot * dim, dim) * scale;
        top = std::max(top, scores[p]);
      }
      float total = 0.0f;
      for (int64_t p = 0; p < length; ++p) total += scores[p] = std::exp(scores[p] - top);
      float *context = out + task * dim;
      std::fill(context, context + dim, 0.0f);
      for (int64_t p = 0; p < length; ++p) {
        const int64_t slot = int64_t{blocks[p / block_size]} * block_size + p % block_size;
        const float weight = scores[p] / total;
        const float *value = values + slot * dim;
        for (int64_t d = 0; d < dim; ++d) context[d] += weight * value[d];
      }
    }
  }
};

std::atomic<int> requested_threads{0};    // KnowLMSetThreads; 0: one per core

int ThreadCount() {
  const int threads = requested_threads.load();
  return std::max(threads > 0 ? threads : static_cast<int>(std::thread::hardware_concurrency()), 1);
}

class Pool {
 public:
  explicit Pool(int helpers) : pid_(getpid()), helpers_(helpers) {
    for (int i = 0; i < helpers; ++i) std::thread(&Pool::Help, this, i + 1).detach();
  }

  bool ForkedSince() const { return getpid() != pid_; }
  int Threads() const { return helpers_ + 1; }

  void Run(const Job &job) {
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
  const Job *volatile job_ = nullptr;
};

std::atomic<Pool *> built_pool{nullptr};

Pool &Helpers() {
  // Built by the first kernel call; never destroyed (helpers may be asleep at exit); rebuilt in a forked child,
  // which has no helper threads.
  static Pool *pool = new Pool(ThreadCount() - 1);
  static std::mutex rebuild;
  if (pool->ForkedSince()) {
    std::lock_guard<std::mutex> lock(rebuild);
    if (pool->ForkedSince()) pool = new Pool(ThreadCount() - 1);
  }
  built_pool.store(pool);
  return *pool;
}

// out = x / sqrt(mean(x^2) + eps) * weight, per row of x (rows, width): MindFormers' LlamaRMSNorm.
void RmsNorm(const float *x, const float *weight, float eps, int64_t rows, int64_t width, float *out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *row = x + r * width;
    const float factor = 1.0f / std::sqrt(Dot(row, row, width) / width + eps);
    for (int64_t i = 0; i < width; ++i) out[r * width + i] = row[i] * factor * weight[i];
  }
}

bool AllOf(const char **dtypes, int first, int last, const char *dtype) {
  for (int i = first; i < last; ++i) {
    if (std::strcmp(dtypes[i], dtype) != 0) return false;
  }
  return true;
}

int64_t Product(const int64_t *shape, int count) {
  int64_t product = 1;
  for (int d = 0; d < count; ++d) product *= shape[d];
  return product;
}

// Rotate-half RoPE of the `rows` rows of x (dim values each; `out` may be x), one thread: out = x * cos +
// rotate_half(x) * sin, or with `transpose` its gradient dx = dy * cos + rotate_half^T(dy * sin) (rotate_half(x) =
// [-x2, x1], its transpose [y2, -y1]). Row r takes cos/sin row r / repeat % period: x (..., S, D) with one table has
// repeat 1, period S; a decode step's q or k (B, heads, D) with a row per sequence has repeat heads, period B.
// MindFormers' training RoPE is ~14 MindSpore ops a layer forward and as many backward: 70 ms of the benchmark's
// 640 ms small LoRA step.
void RopeRows(const float *x, const float *cos, const float *sin, int64_t rows, int64_t dim, int64_t repeat,
              int64_t period, bool transpose, float *out) {
  const int64_t half = dim / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t table_row = r / repeat % period;
    const float *xr = x + r * dim, *c = cos + table_row * dim, *s = sin + table_row * dim;
    float *o = out + r * dim;
    for (int64_t i = 0; i < half; ++i) {
      const float first = xr[i], second = xr[i + half];
      if (transpose) {
        o[i] = first * c[i] + second * s[i + half];
        o[i + half] = second * c[i + half] - first * s[i];
      } else {
        o[i] = first * c[i] - second * s[i];
        o[i + half] = second * c[i + half] + first * s[i + half];
      }
    }
  }
}

int Rope(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool transpose) {
  if (nparam != 4 || ndims[0] < 2) return 1;
  if (!AllOf(dtypes, 0, 4, "float32")) return 2;
  const int64_t seq = shapes[0][ndims[0] - 2], dim = shapes[0][ndims[0] - 1];
  if (dim % 2 != 0 || Product(shapes[1], ndims[1]) != seq * dim) return 3;
  RopeRows(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
           static_cast<const float *>(params[2]), Product(shapes[0], ndims[0] - 1), dim, 1, seq, transpose,
           static_cast<float *>(params[3]));
  return 0;
}

}  // namespace

// Threads of the kernels (the caller and its helpers), when set before the first kernel call.
extern "C" void KnowLMSetThreads(int threads) { requested_threads.store(threads); }

// Threads the kernels run on; 0 before the first kernel call of this process.
extern "C" int KnowLMThreads() {
  const Pool *pool = built_pool.load();
  return pool != nullptr && !pool->ForkedSince() ? pool->Threads() : 0;
}

// MindSpore's AOT calling convention: params = inputs then outputs; returns 0 on success.
extern "C" int KnowLMGemv(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 2 || shapes[0][1] != shapes[1][1]) return 1;
  if (!AllOf(dtypes, 0, 3, "float32")) return 2;
  Products job(static_cast<const float *>(params[0]), shapes[0][0], shapes[0][1]);
  job.Add(static_cast<const float *>(params[1]), static_cast<float *>(params[2]), shapes[1][0]);
  Helpers().Run(job);
  return 0;
}

// Inputs: x (..., S, D), cos, sin (S * D values). Output: RoPE of x, like x.
extern "C" int KnowLMRope(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return Rope(nparam, params, ndims, shapes, dtypes, false);
}

// Inputs: dy (..., S, D), cos, sin. Output: the gradient of KnowLMRope's x.
extern "C" int KnowLMRopeGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return Rope(nparam, params, ndims, shapes, dtypes, true);
}

// Inputs: x (..., H), weight (H), meta float32 [eps]. Output: x / sqrt(mean(x^2) + eps) * weight, like x. A model's
// final norm as one op instead of MindFormers' ~8 (a quarter of a millisecond of a small model's decode step).
extern "C" int KnowLMRmsNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4 || ndims[1] != 1 || shapes[1][0] != shapes[0][ndims[0] - 1]) return 1;
  if (!AllOf(dtypes, 0, 4, "float32")) return 2;
  RmsNorm(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
          static_cast<const float *>(params[2])[0], Product(shapes[0], ndims[0] - 1), shapes[1][0],
          static_cast<float *>(params[3]));
  return 0;
}

// Inputs: x (B, H); attention_norm (H); wq (heads*D, H); wk, wv (kv_heads*D, H); wo (H, heads*D); ffn_norm (H);
// w1 (I, H); w2 (H, I); w3 (I, H); key_cache, value_cache (kv_heads * rows_per_head, D), written in place;
// cos, sin (B, D) at each sequence's new position; batch_valid_length (B,) int32 (length with the new token);
// block_tables (B, max_blocks) int32; slot_mapping (B,) int32 (-1: padding, written to each head's last row);
// meta float32 [heads, eps, block_size]. Output: the layer's output (B, H).
extern "C" int KnowLMDecodeLayer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  (void)stream;
  (void)extra;
  enum { kX, kNorm1, kWq, kWk, kWv, kWo, kNorm2, kW1, kW2, kW3, kKeys, kValues, kCos, kSin, kValid, kBlocks, kSlots,
         kMeta, kOut, kCount };
  if (nparam != kCount) return 1;
  if (!AllOf(dtypes, kX, kValid, "float32") || !AllOf(dtypes, kValid, kMeta, "int32") ||
      !AllOf(dtypes, kMeta, kCount, "float32")) {
    return 2;
  }
  auto in = [&](int i) { return static_cast<const float *>(params[i]); };
  const float *meta = in(kMeta);
  const int64_t batch = shapes[kX][0], hidden = shapes[kX][1], heads = static_cast<int64_t>(meta[0]);
  const int64_t q_width = shapes[kWq][0], dim = q_width / heads, kv_width = shapes[kWk][0];
  const int64_t kv_heads = kv_width / dim, inter = shapes[kW1][0];
  const int64_t rows_per_head = shapes[kKeys][0] / kv_heads, block_size = static_cast<int64_t>(meta[2]);
  const float eps = meta[1];
  if (ndims[kX] != 2 || shapes[kWo][0] != hidden || shapes[kWq][1] != hidden || shapes[kW2][1] != inter ||
      shapes[kKeys][1] != dim || shapes[kCos][1] != dim || heads % kv_heads != 0) {
    return 3;
  }
  const int32_t *valid = static_cast<const int32_t *>(params[kValid]);
  const int32_t *slots = static_cast<const int32_t *>(params[kSlots]);
  float *keys = static_cast<float *>(params[kKeys]);
  float *values = static_cast<float *>(params[kValues]);
  float *out = static_cast<float *>(params[kOut]);

  thread_local std::vector<float> scratch;
  scratch.resize(batch * (2 * hidden + 2 * q_width + 2 * kv_width + 2 * inter));
  float *normed = scratch.data(), *q = normed + batch * hidden, *k = q + batch * q_width;
  float *v = k + batch * kv_width, *context = v + batch * kv_width, *gate = context + batch * q_width;
  float *up = gate + batch * inter, *residual = up + batch * inter;
  Pool &pool = Helpers();

  RmsNorm(in(kX), in(kNorm1), eps, batch, hidden, normed);
  pool.Run(Products(normed, batch, hidden).Add(in(kWq), q, q_width).Add(in(kWk), k, kv_width)
               .Add(in(kWv), v, kv_width));
  RopeRows(q, in(kCos), in(kSin), batch * heads, dim, heads, batch, false, q);
  RopeRows(k, in(kCos), in(kSin), batch * kv_heads, dim, kv_heads, batch, false, k);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t slot = slots[b] < 0 ? rows_per_head - 1 : slots[b];
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t row = h * rows_per_head + slot;
      std::memcpy(keys + row * dim, k + (b * kv_heads + h) * dim, dim * sizeof(float));
      std::memcpy(values + row * dim, v + (b * kv_heads + h) * dim, dim * sizeof(float));
    }
  }
  Attention attention;
  attention.q = q;
  attention.key_cache = keys;
  attention.value_cache = values;
  attention.block_tables = static_cast<const int32_t *>(params[kBlocks]);
  attention.valid = valid;
  attention.out = context;
  attention.batch = batch;
  attention.heads = heads;
  attention.kv_heads = kv_heads;
  attention.dim = dim;
  attention.max_blocks = shapes[kBlocks][1];
  attention.block_size = block_size;
  attention.rows_per_head = rows_per_head;
  attention.scale = 1.0f / std::sqrt(static_cast<float>(dim));
  pool.Run(attention);
  pool.Run(Products(context, batch, q_width).Add(in(kWo), residual, hidden));
  for (int64_t i = 0; i < batch * hidden; ++i) residual[i] += in(kX)[i];
  RmsNorm(residual, in(kNorm2), eps, batch, hidden, normed);
  pool.Run(Products(normed, batch, hidden).Add(in(kW1), gate, inter).Add(in(kW3), up, inter));
  for (int64_t i = 0; i < batch * inter; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  pool.Run(Products(gate, batch, inter).Add(in(kW2), out, hidden));
  for (int64_t i = 0; i < batch * hidden; ++i) out[i] += residual[i];
  return 0;
}
