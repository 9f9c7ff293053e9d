// knowlm's CPU decoding kernels, MindSpore AOT custom ops (knowlm/models/kernels.py builds and calls them), float32:
//
// - KnowLMGemv: y (M, N) = x (M, K) . w (N, K)^T for a few rows M (one new token per sequence): the lm_head.
// - KnowLMRmsNorm: LLaMA's RMSNorm, for the final norm of a generation model.
// - KnowLMRope, KnowLMRopeGrad: rotate-half RoPE and its gradient, for training (one thread).
// - KnowLMDecodeLayer: one whole LLaMA decoder layer for one new token per sequence (RMSNorm, q/k/v, rotate-half
//   RoPE, KV-cache write, attention over the cache, o, residual, RMSNorm, SwiGLU feed-forward, residual). A decode
//   step of MindSpore ops is ~50 kernels per layer whose launches cost more than their arithmetic on small models;
//   this is one.
// - KnowLMDecodeSteps: up to N greedy decode steps of a whole model (embedding, those layers, final norm, lm_head,
//   argmax) in one call, for generation without a graph call and a return to Python per token.
//
// Decoding reads every weight once per token, so memory bandwidth is the limit: independent sums and software
// prefetch keep enough loads in flight to reach the machine's read bandwidth (one row at a time with one sum reaches
// about a third of it). GCC/Clang vector extensions, so it compiles to AVX-512/AVX2/NEON alike.
//
// Threads: work is split between the calling thread and helpers of our own, KnowLMSetThreads in all (knowlm's kernels.py
// passes OMP_NUM_THREADS as the process started with it: MindSpore sets the variable to 1 once it runs a graph, which
// left the kernels on one thread), else one per core. Not OpenMP: its idle workers busy-wait without yielding and
// starve MindSpore's runtime threads (a decode step took almost twice as long); these helpers, like MindSpore's,
// yield while they wait, then sleep.
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

namespace {

constexpr int kLanes = 16;
constexpr int kRows = 8;
// Rows of up to kShortRow values are read one after another, as one sequential stream, kAhead values prefetched ahead
// into L2; longer ones kRows at a time (a last group of fewer rows one after another): on the machine the kernels
// were tuned on, short rows read faster as one stream and long rows faster interleaved (the README has the figures).
constexpr int64_t kShortRow = 1024;
constexpr int64_t kAhead = 2048;
constexpr int kUnroll = 4;
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

// Asks Linux to keep a weight on 2 MB pages, once per weight. A decode step reads every weight once, and on 4 KB pages
// every 4 KB is a TLB miss: ~25 000 per token for the small benchmark model's layers, whose weights (1-3 MB) MindSpore
// puts on the heap (numpy already asks for huge pages for arrays of 4 MB and more). The advice covers the 2 MB pages around
// the weight, falling back to those inside it where that range is not all mapped; neither changes what the memory
// holds. MADV_COLLAPSE (Linux 6.1+) moves the weight to huge pages now; older kernels refuse it and khugepaged does
// it later.
void OnHugePages(const float *weight, int64_t count) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static std::mutex lock;
  static std::set<const float *> done;
  std::lock_guard<std::mutex> guard(lock);
  if (!done.insert(weight).second) return;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t first = reinterpret_cast<uintptr_t>(weight), last = first + count * sizeof(float);
  uintptr_t start = first & ~(kHuge - 1), end = (last + kHuge - 1) & ~(kHuge - 1);
  if (madvise(reinterpret_cast<void *>(start), end - start, MADV_HUGEPAGE) != 0) {
    start = (first + kHuge - 1) & ~(kHuge - 1);
    end = last & ~(kHuge - 1);
    if (end <= start || madvise(reinterpret_cast<void *>(start), end - start, MADV_HUGEPAGE) != 0) return;
  }
  constexpr int kCollapse = 25;       // MADV_COLLAPSE, which older C libraries do not name
  madvise(reinterpret_cast<void *>(start), end - start, kCollapse);
#else
  (void)weight;
  (void)count;
#endif
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
    OnHugePages(weight, rows * k_len);
    w[count] = weight;
    y[count] = out;
    n[count] = rows;
    ++count;
    return *this;
  }

  // Weight rows first..first + kRows of weight s against every row of x, one sum per row.
  void Rows(int s, int64_t first) const {
    constexpr int R = kRows;
    const float *rows = w[s] + first * k_len;
    // The next group's rows are fetched into L2 while this group streams: the hardware prefetcher alone restarts at
    // every group.
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

  // Weight row `r` of weight s against every row of x, kUnroll independent sums.
  void Row(int s, int64_t r) const {
    const float *row = w[s] + r * k_len;
    for (int64_t m = 0; m < m_rows; ++m) {
      const float *xm = x + m * k_len;
      Vec acc[kUnroll] = {};
      int64_t k = 0;
      for (; k + kUnroll * kLanes <= k_len; k += kUnroll * kLanes) {
        for (int u = 0; u < kUnroll; ++u) {
          __builtin_prefetch(row + k + u * kLanes + kAhead, 0, 2);
          acc[u] += Load(row + k + u * kLanes) * Load(xm + k + u * kLanes);
        }
      }
      for (; k + kLanes <= k_len; k += kLanes) acc[0] += Load(row + k) * Load(xm + k);
      const Vec total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      float sum = 0.0f;
      for (int lane = 0; lane < kLanes; ++lane) sum += total[lane];
      for (; k < k_len; ++k) sum += row[k] * xm[k];
      y[s][m * n[s] + r] = sum;
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
      if (k_len > kShortRow && row + kRows <= n[s]) {
        Rows(s, row);
      } else {
        for (int64_t r = row; r < std::min(row + kRows, n[s]); ++r) Row(s, r);
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
// MindFormers' training RoPE is ~14 MindSpore ops a layer forward and as many backward: a tenth of a small LoRA step.
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

// One decoder layer's weights and KV cache (knowlm.cpu_ops passes them in this order), with the widths they imply.
struct Layer {
  enum { kNorm1, kWq, kWk, kWv, kWo, kNorm2, kW1, kW2, kW3, kKeys, kValues, kCount };
  const float *norm1, *wq, *wk, *wv, *wo, *norm2, *w1, *w2, *w3;
  float *keys, *values;             // (kv_heads * rows_per_head, dim), written in place
  int64_t hidden, heads, dim, q_width, kv_heads, kv_width, inter, rows_per_head;

  // From the kCount params at `first`; false if their shapes do not make a layer of `heads` heads.
  bool Read(void **params, int *ndims, int64_t **shapes, int first, int64_t heads_) {
    auto in = [&](int i) { return static_cast<float *>(params[first + i]); };
    auto shape = [&](int i) { return shapes[first + i]; };
    norm1 = in(kNorm1), wq = in(kWq), wk = in(kWk), wv = in(kWv), wo = in(kWo), norm2 = in(kNorm2);
    w1 = in(kW1), w2 = in(kW2), w3 = in(kW3), keys = in(kKeys), values = in(kValues);
    heads = heads_;
    hidden = shape(kWq)[1], q_width = shape(kWq)[0], dim = q_width / heads, kv_width = shape(kWk)[0];
    inter = shape(kW1)[0];
    if (dim == 0 || kv_width % dim != 0 || shape(kWo)[0] != hidden || shape(kW2)[1] != inter ||
        ndims[first + kKeys] != 2 || shape(kKeys)[1] != dim) {
      return false;
    }
    kv_heads = kv_width / dim;
    if (kv_heads == 0 || heads % kv_heads != 0) return false;
    rows_per_head = shape(kKeys)[0] / kv_heads;
    return true;
  }
};

// Where the new token of each of `batch` sequences goes and what it attends to.
struct NewTokens {
  int64_t batch;
  const float *cos, *sin;           // (batch, dim) at each sequence's new position
  const int32_t *valid;             // (batch,) length with the new token
  const int32_t *blocks;            // (batch, max_blocks) block tables
  const int32_t *slots;             // (batch,) the new token's cache slot (-1: padding, to each head's last row)
  int64_t max_blocks, block_size;
};

// out (batch, hidden) = the layer applied to x (batch, hidden); out may be x.
void DecodeLayer(const Layer &w, const NewTokens &t, float eps, const float *x, float *out) {
  const int64_t batch = t.batch, hidden = w.hidden;
  thread_local std::vector<float> scratch;
  scratch.resize(batch * (2 * hidden + 2 * w.q_width + 2 * w.kv_width + 2 * w.inter));
  float *normed = scratch.data(), *q = normed + batch * hidden, *k = q + batch * w.q_width;
  float *v = k + batch * w.kv_width, *context = v + batch * w.kv_width, *gate = context + batch * w.q_width;
  float *up = gate + batch * w.inter, *residual = up + batch * w.inter;
  Pool &pool = Helpers();

  RmsNorm(x, w.norm1, eps, batch, hidden, normed);
  pool.Run(Products(normed, batch, hidden).Add(w.wq, q, w.q_width).Add(w.wk, k, w.kv_width)
               .Add(w.wv, v, w.kv_width));
  RopeRows(q, t.cos, t.sin, batch * w.heads, w.dim, w.heads, batch, false, q);
  RopeRows(k, t.cos, t.sin, batch * w.kv_heads, w.dim, w.kv_heads, batch, false, k);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t slot = t.slots[b] < 0 ? w.rows_per_head - 1 : t.slots[b];
    for (int64_t h = 0; h < w.kv_heads; ++h) {
      const int64_t row = h * w.rows_per_head + slot;
      std::memcpy(w.keys + row * w.dim, k + (b * w.kv_heads + h) * w.dim, w.dim * sizeof(float));
      std::memcpy(w.values + row * w.dim, v + (b * w.kv_heads + h) * w.dim, w.dim * sizeof(float));
    }
  }
  Attention attention;
  attention.q = q;
  attention.key_cache = w.keys;
  attention.value_cache = w.values;
  attention.block_tables = t.blocks;
  attention.valid = t.valid;
  attention.out = context;
  attention.batch = batch;
  attention.heads = w.heads;
  attention.kv_heads = w.kv_heads;
  attention.dim = w.dim;
  attention.max_blocks = t.max_blocks;
  attention.block_size = t.block_size;
  attention.rows_per_head = w.rows_per_head;
  attention.scale = 1.0f / std::sqrt(static_cast<float>(w.dim));
  pool.Run(attention);
  pool.Run(Products(context, batch, w.q_width).Add(w.wo, residual, hidden));
  for (int64_t i = 0; i < batch * hidden; ++i) residual[i] += x[i];
  RmsNorm(residual, w.norm2, eps, batch, hidden, normed);
  pool.Run(Products(normed, batch, hidden).Add(w.w1, gate, w.inter).Add(w.w3, up, w.inter));
  for (int64_t i = 0; i < batch * w.inter; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  pool.Run(Products(gate, batch, w.inter).Add(w.w2, out, hidden));
  for (int64_t i = 0; i < batch * hidden; ++i) out[i] += residual[i];
}

// numpy's argmax: the first largest value, or the first NaN.
int64_t Argmax(const float *x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n && !std::isnan(x[best]); ++i) {
    if (x[i] > x[best] || std::isnan(x[i])) best = i;
  }
  return best;
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

// Inputs: x (B, H); the layer's Layer::kCount weights and caches (attention_norm (H); wq (heads*D, H); wk, wv
// (kv_heads*D, H); wo (H, heads*D); ffn_norm (H); w1 (I, H); w2 (H, I); w3 (I, H); key_cache, value_cache
// (kv_heads * rows_per_head, D), written in place); cos, sin (B, D) at each sequence's new position;
// batch_valid_length (B,) int32 (length with the new token); block_tables (B, max_blocks) int32; slot_mapping (B,)
// int32 (-1: padding); meta float32 [heads, eps, block_size]. Output: the layer's output (B, H).
extern "C" int KnowLMDecodeLayer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  (void)stream;
  (void)extra;
  enum { kX, kLayer, kCos = kLayer + Layer::kCount, kSin, kValid, kBlocks, kSlots, kMeta, kOut, kCount };
  if (nparam != kCount) return 1;
  if (!AllOf(dtypes, kX, kValid, "float32") || !AllOf(dtypes, kValid, kMeta, "int32") ||
      !AllOf(dtypes, kMeta, kCount, "float32")) {
    return 2;
  }
  const float *meta = static_cast<const float *>(params[kMeta]);
  Layer layer;
  if (!layer.Read(params, ndims, shapes, kLayer, static_cast<int64_t>(meta[0])) || ndims[kX] != 2 ||
      shapes[kX][1] != layer.hidden || shapes[kCos][1] != layer.dim) {
    return 3;
  }
  NewTokens tokens;
  tokens.batch = shapes[kX][0];
  tokens.cos = static_cast<const float *>(params[kCos]);
  tokens.sin = static_cast<const float *>(params[kSin]);
  tokens.valid = static_cast<const int32_t *>(params[kValid]);
  tokens.blocks = static_cast<const int32_t *>(params[kBlocks]);
  tokens.slots = static_cast<const int32_t *>(params[kSlots]);
  tokens.max_blocks = shapes[kBlocks][1];
  tokens.block_size = static_cast<int64_t>(meta[2]);
  DecodeLayer(layer, tokens, meta[1], static_cast<const float *>(params[kX]), static_cast<float *>(params[kOut]));
  return 0;
}

// Greedy decoding of up to N tokens per sequence in one call, for a model whose every layer KnowLMDecodeLayer
// computes: a decode step as one graph call adds MindSpore's graph entry and exit and Python on top of its kernels
// (a sizeable part of a small model's step). Each step computes what a graph call of the decode-step
// graph computes, with the same functions, so the tokens are the same.
// Inputs: tokens (B,) int32, each sequence's last token; valid (B,) int32, its length with that token; steps (B,)
// int32, at most this many new tokens for it (0: none); block_tables (B, max_blocks) int32, covering every position
// written; eos (E,) int32: a sequence stops after one of these; embedding (V, H); cos, sin (P, D), the RoPE tables of
// all positions; final_norm (H); lm_head (V, H); meta float32 [heads, eps, block_size, final norm eps]; then
// Layer::kCount inputs per layer. Output: (B, N) int32, each sequence's new tokens, then -1.
extern "C" int KnowLMDecodeSteps(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  (void)stream;
  (void)extra;
  enum { kTokens, kValid, kSteps, kBlocks, kEos, kEmbedding, kCos, kSin, kNorm, kHead, kMeta, kLayers };
  const int out_index = nparam - 1, layers = (nparam - kLayers - 1) / Layer::kCount;
  if (layers < 1 || kLayers + layers * Layer::kCount + 1 != nparam) return 1;
  if (!AllOf(dtypes, kTokens, kEmbedding, "int32") || !AllOf(dtypes, kEmbedding, out_index, "float32") ||
      !AllOf(dtypes, out_index, nparam, "int32")) {
    return 2;
  }
  auto ints = [&](int i) { return static_cast<const int32_t *>(params[i]); };
  auto floats = [&](int i) { return static_cast<const float *>(params[i]); };
  const float *meta = floats(kMeta);
  const int64_t batch = shapes[kTokens][0], width = shapes[out_index][1], vocab = shapes[kHead][0];
  const int64_t positions = shapes[kCos][0], max_blocks = shapes[kBlocks][1];
  const int64_t block_size = static_cast<int64_t>(meta[2]);
  std::vector<Layer> weights(layers);
  for (int l = 0; l < layers; ++l) {
    if (!weights[l].Read(params, ndims, shapes, kLayers + l * Layer::kCount, static_cast<int64_t>(meta[0]))) return 3;
  }
  const int64_t hidden = weights[0].hidden, dim = weights[0].dim;
  if (shapes[kEmbedding][1] != hidden || shapes[kHead][1] != hidden || shapes[kCos][1] != dim ||
      shapes[kNorm][0] != hidden || block_size < 1) {
    return 3;
  }
  int32_t *out = static_cast<int32_t *>(params[out_index]);
  std::fill(out, out + batch * width, -1);

  std::vector<int32_t> last(ints(kTokens), ints(kTokens) + batch), valid(batch), blocks(batch * max_blocks);
  std::vector<int32_t> slots(batch);
  std::vector<int64_t> rows;        // the sequences still decoding at this step
  std::vector<float> x(batch * hidden), normed(batch * hidden), cos(batch * dim), sin(batch * dim);
  std::vector<float> logits(batch * vocab);
  std::vector<bool> stopped(batch, false);
  for (int64_t step = 0; step < width; ++step) {
    rows.clear();
    for (int64_t r = 0; r < batch; ++r) {
      if (!stopped[r] && step < ints(kSteps)[r]) rows.push_back(r);
    }
    if (rows.empty()) break;
    const int64_t n = static_cast<int64_t>(rows.size());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = rows[i], position = ints(kValid)[r] - 1 + step;
      const int32_t *table = ints(kBlocks) + r * max_blocks;
      if (last[r] < 0 || last[r] >= vocab || position < 0 || position >= positions ||
          position / block_size >= max_blocks || table[position / block_size] < 0) {
        return 4;
      }
      std::memcpy(&x[i * hidden], floats(kEmbedding) + int64_t{last[r]} * hidden, hidden * sizeof(float));
      std::memcpy(&cos[i * dim], floats(kCos) + position * dim, dim * sizeof(float));
      std::memcpy(&sin[i * dim], floats(kSin) + position * dim, dim * sizeof(float));
      std::copy(table, table + max_blocks, &blocks[i * max_blocks]);
      valid[i] = static_cast<int32_t>(position + 1);
      slots[i] = static_cast<int32_t>(table[position / block_size] * block_size + position % block_size);
    }
    NewTokens tokens{n, cos.data(), sin.data(), valid.data(), blocks.data(), slots.data(), max_blocks, block_size};
    for (const Layer &layer : weights) DecodeLayer(layer, tokens, meta[1], x.data(), x.data());
    RmsNorm(x.data(), floats(kNorm), meta[3], n, hidden, normed.data());
    Helpers().Run(Products(normed.data(), n, hidden).Add(floats(kHead), logits.data(), vocab));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = rows[i];
      last[r] = static_cast<int32_t>(Argmax(&logits[i * vocab], vocab));
      out[r * width + step] = last[r];
      stopped[r] = std::find(ints(kEos), ints(kEos) + shapes[kEos][0], last[r]) != ints(kEos) + shapes[kEos][0];
    }
  }
  return 0;
}
