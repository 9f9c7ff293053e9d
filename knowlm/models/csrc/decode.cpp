// knowlm's CPU inference kernels, MindSpore AOT custom ops (knowlm/models/kernels.py builds and calls them):
//
// - KnowLMForward: a whole model for any number of new tokens per sequence (a prompt, a chunk of one, or one decode
//   step): embedding, every decoder layer with its KV-cache write and causal attention over the cache, final norm and
//   the lm_head of each sequence's last new token. Cost follows the tokens computed and the positions in the cache,
//   never the model's seq_length; no intermediate outlives its layer.
// - KnowLMDecodeSteps: up to N greedy decode steps of a whole model (argmax included) in one call.
// - KnowLMDecodeLayer, KnowLMGemv, KnowLMRmsNorm: one decoder layer for one new token per sequence, the lm_head and the
//   final norm, for MindFormers' decode-step graph.
// - KnowLMRope, KnowLMRopeGrad: rotate-half RoPE and its gradient, for training (one thread).
//
// Weights (the 2-D ones) come as float32, bfloat16 or uint8 = llama.cpp's Q8_0 blocks (per 32 values: a float16 scale
// d, then 32 int8 q; value d * q), told apart by dtype (`Matrix`). Arithmetic is float32 on the weights' exact values:
// one sequence's decode step streams the weights, widening each as it loads (memory-bound: the bytes read decide its
// speed); a batch's decode step reads each weight once in small panels for every sequence; a prompt is a blocked
// matrix product on panels of weight rows widened once into float32 (compute-bound). All three sum every output in
// one order (`Products`), so a row's results do not depend on the rows beside it.
//
// Decoding reads every weight once per token, so memory bandwidth is the limit: independent sums and software
// prefetch keep enough loads in flight to reach the machine's read bandwidth (one row at a time with one sum reaches
// about a third of it). GCC/Clang vector extensions, so it compiles to AVX-512/AVX2/NEON alike; fused multiply-adds
// and lane sums use AVX-512 instructions where the compiler targets them.
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
#include <initializer_list>
#include <utility>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int kLanes = 16;
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

inline Vec Fma(Vec a, Vec b, Vec c) {      // a * b + c, fused where the target has it
#if defined(__AVX512F__)
  return (Vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
  return a * b + c;
#endif
}

inline float Sum(Vec v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float sum = 0.0f;
  for (int lane = 0; lane < kLanes; ++lane) sum += v[lane];
  return sum;
#endif
}

inline Vec Splat(float value) { return Vec{} + value; }

// One dot product in the order every product here takes (see `Products`).
inline float Dot(const float *a, const float *b, int64_t n) {
  Vec acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc = Fma(Load(a + i), Load(b + i), acc);
  float sum = Sum(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// e^x (x clamped to [-87, 88]: softmax and SiLU arguments), Cephes' expf: 2^n * p(r), r = x - n ln 2 in
// [-ln2/2, ln2/2], a few ulp.
inline Vec Exp(Vec x) {
  typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));
  x = x < Splat(-87.0f) ? Splat(-87.0f) : x;
  x = x > Splat(88.0f) ? Splat(88.0f) : x;
  const Vec n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504088896341f +
                                        (x < Splat(0.0f) ? Splat(-0.5f) : Splat(0.5f)), IVec), Vec);
  const Vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Vec p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  return p * (Vec)bits;
}

// Weight storage, by the dtype MindSpore passes: float32, bfloat16, or uint8 rows of Q8_0 blocks.
enum WeightType { kFloat32, kBFloat16, kQ8 };
constexpr int64_t kQ8Values = 32, kQ8Bytes = 34;
typedef uint16_t HalfVec __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t WordVec __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef int8_t ByteVec __attribute__((vector_size(kLanes)));

inline Vec LoadBF16(const uint8_t *p) {       // bfloat16 is float32's upper half: widening is exact
#if defined(__AVX512F__)
  return (Vec)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))), 16);
#else
  HalfVec h;
  std::memcpy(&h, p, sizeof(h));
  return (Vec)(__builtin_convertvector(h, WordVec) << 16);
#endif
}

inline Vec LoadQ8(const uint8_t *p) {         // 16 int8 values as floats
#if defined(__AVX512F__)
  return (Vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))));
#else
  ByteVec b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(b, Vec);
#endif
}

inline float Half(const uint8_t *p) {         // a little-endian float16
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t{h & 0x8000u} << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else {
    float value = std::ldexp(static_cast<float>(mantissa), -24);
    std::memcpy(&bits, &value, sizeof(bits));
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}

// A weight (rows, cols) as stored; cols is the logical width (Q8_0: 32 values per 34 bytes).
struct Matrix {
  const uint8_t *data = nullptr;
  WeightType type = kFloat32;
  int64_t rows = 0, cols = 0, row_bytes = 0;

  bool Set(void *param, const char *dtype, int ndim, const int64_t *shape) {
    if (ndim != 2) return false;
    data = static_cast<const uint8_t *>(param);
    rows = shape[0];
    if (std::strcmp(dtype, "float32") == 0) {
      type = kFloat32, cols = shape[1], row_bytes = cols * 4;
    } else if (std::strcmp(dtype, "bfloat16") == 0) {
      type = kBFloat16, cols = shape[1], row_bytes = cols * 2;
    } else if (std::strcmp(dtype, "uint8") == 0 && shape[1] % kQ8Bytes == 0) {
      type = kQ8, cols = shape[1] / kQ8Bytes * kQ8Values, row_bytes = shape[1];
    } else {
      return false;
    }
    return true;
  }
  const uint8_t *Row(int64_t r) const { return data + r * row_bytes; }
  const float *Floats() const { return reinterpret_cast<const float *>(data); }

  // Row r as float32 values (exactly: bfloat16 is float32's upper half, a Q8_0 weight d * q is exact in float32).
  void Widen(int64_t r, float *out) const {
    const uint8_t *row = Row(r);
    if (type == kFloat32) {
      std::memcpy(out, row, cols * sizeof(float));
    } else if (type == kBFloat16 && cols % kLanes == 0) {
      for (int64_t k = 0; k < cols; k += kLanes) {
        const Vec v = LoadBF16(row + 2 * k);
        std::memcpy(out + k, &v, sizeof(v));
      }
    } else if (type == kQ8) {
      for (int64_t b = 0; b < cols / kQ8Values; ++b) {
        const uint8_t *block = row + b * kQ8Bytes;
        const Vec d = Splat(Half(block)), lo = LoadQ8(block + 2) * d, hi = LoadQ8(block + 2 + kLanes) * d;
        std::memcpy(out + b * kQ8Values, &lo, sizeof(lo));
        std::memcpy(out + b * kQ8Values + kLanes, &hi, sizeof(hi));
      }
    } else if (type == kBFloat16) {
      for (int64_t k = 0; k < cols; ++k) {
        const uint32_t bits = uint32_t{reinterpret_cast<const uint16_t *>(row)[k]} << 16;
        std::memcpy(out + k, &bits, sizeof(float));
      }
    }
  }
};

// Asks Linux to keep a weight on 2 MB pages, once per weight. A decode step reads every weight once, and on 4 KB pages
// every 4 KB is a TLB miss: ~25 000 per token for the small benchmark model's layers, whose weights (1-3 MB) MindSpore
// puts on the heap (numpy already asks for huge pages for arrays of 4 MB and more). The advice covers the 2 MB pages around
// the weight, falling back to those inside it where that range is not all mapped; neither changes what the memory
// holds. MADV_COLLAPSE (Linux 6.1+) moves the weight to huge pages now; older kernels refuse it and khugepaged does
// it later.
void OnHugePages(const void *weight, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static std::mutex lock;
  static std::set<const void *> done;
  std::lock_guard<std::mutex> guard(lock);
  if (!done.insert(weight).second) return;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t first = reinterpret_cast<uintptr_t>(weight), last = first + bytes;
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
  (void)bytes;
#endif
}

struct Job {
  virtual void Part(int part, int parts) const = 0;
  virtual ~Job() = default;
};

// Weight rows for the product tiles: float32 rows (a float32 weight, or rows widened into a buffer), or narrow rows
// widened in registers as they load (exactly the values `Matrix::Widen` writes).
struct FloatRows {
  const float *rows;
  int64_t k_len;
  Vec Load(int n, int64_t k) const { return ::Load(rows + n * k_len + k); }
  float At(int n, int64_t k) const { return rows[n * k_len + k]; }
};

struct NarrowRows {      // bfloat16 rows, or Q8_0 rows; k a multiple of kLanes, no tail
  const Matrix &w;
  int64_t first;
  Vec Load(int n, int64_t k) const {
    const uint8_t *row = w.Row(first + n);
    if (w.type == kBFloat16) return LoadBF16(row + 2 * k);
    const uint8_t *block = row + k / kQ8Values * kQ8Bytes;
    return LoadQ8(block + 2 + k % kQ8Values) * Splat(Half(block));
  }
  float At(int, int64_t) const { return 0.0f; }
};

// y_s (M, N_s) = x (M, K) . w_s (N_s, K)^T for up to three weights sharing x (q/k/v, gate/up): what `Gemv` (a few
// rows M) and `Gemm` (many) compute, both by the same register tiles (as llamafile's tinyBLAS does for llama.cpp, in
// the layout the weights have): each kNr weight rows (widened into float32 first if stored narrower) against each kMr
// rows of x, kMr x kNr vector sums along k, then one sum across lanes per output. So every output is one dot product
// in one order, whatever the path, the rows beside it or the thread: fused multiply-adds of kLanes lanes along k, one
// lane sum (`Sum`), then the last k % kLanes products (as `Dot`). A sequence's logits do not depend on what else is in
// its batch: a server batching requests together gives each the tokens it gets alone.
using Outputs = std::initializer_list<std::pair<Matrix, float *>>;
struct Products : Job {
  static constexpr int kMax = 3, kMr = 6, kNr = 4;
  const float *x;
  int64_t m_rows, k_len;
  int count = 0;
  Matrix w[kMax];
  float *y[kMax];

  Products(const float *x_, int64_t m_rows_, Outputs outputs)
      : x(x_), m_rows(m_rows_), k_len(outputs.begin()->first.cols) {
    for (const auto &[weight, out] : outputs) {
      w[count] = weight;
      y[count] = out;
      ++count;
    }
  }

  template <int MR, int NR, typename Rows>
  void Tile(const float *xm, const Rows &rows, float *out, int64_t ldy) const {
    Vec acc[MR][NR] = {};
    int64_t k = 0;
    for (; k + kLanes <= k_len; k += kLanes) {
      Vec wv[NR];
      for (int n = 0; n < NR; ++n) wv[n] = rows.Load(n, k);
      for (int m = 0; m < MR; ++m) {
        const Vec xv = Load(xm + m * k_len + k);
        for (int n = 0; n < NR; ++n) acc[m][n] = Fma(xv, wv[n], acc[m][n]);
      }
    }
    for (int m = 0; m < MR; ++m) {
      for (int n = 0; n < NR; ++n) {
        float sum = Sum(acc[m][n]);
        for (int64_t j = k; j < k_len; ++j) sum += xm[m * k_len + j] * rows.At(n, j);
        out[m * ldy + n] = sum;
      }
    }
  }

  template <int MR, int NR = kNr, typename Rows>
  void Tiles(int nr, const float *xm, const Rows &rows, float *out, int64_t ldy) const {
    if constexpr (NR > 1) {
      if (nr < NR) return Tiles<MR, NR - 1>(nr, xm, rows, out, ldy);
    }
    Tile<MR, NR>(xm, rows, out, ldy);
  }

  template <int MR = kMr, typename Rows>
  void Tiled(int mr, int nr, const float *xm, const Rows &rows, float *out, int64_t ldy) const {
    if constexpr (MR > 1) {
      if (mr < MR) return Tiled<MR - 1>(mr, nr, xm, rows, out, ldy);
    }
    Tiles<MR>(nr, xm, rows, out, ldy);
  }

  // each(s, first row) for this thread's part of the groups of `size` weight rows, one contiguous run of them (the
  // weights one after another): a thread reads one sequential stream.
  template <typename Each>
  void Contiguous(int part, int parts, int64_t size, Each each) const {
    int64_t groups[kMax], total = 0;
    for (int s = 0; s < count; ++s) total += groups[s] = (w[s].rows + size - 1) / size;
    int s = 0;
    int64_t base = 0;                 // groups of the weights before s
    for (int64_t g = total * part / parts; g < total * (part + 1) / parts; ++g) {
      while (g - base >= groups[s]) base += groups[s++];
      each(s, (g - base) * size);
    }
  }

  // Weight rows first..first + n of weight s, as float32 rows (widened into `wide` first if stored narrower, once for
  // every tile of x), or, for a narrow weight against at most kMr rows of x, widened in registers as they load.
  void Block(int s, int64_t first, int64_t n, std::vector<float> &wide) const {
    const int64_t ldy = w[s].rows;
    if (w[s].type != kFloat32 && m_rows <= kMr && k_len % kLanes == 0) {
      for (int64_t c = 0; c < n; c += kNr) {
        Tiled(static_cast<int>(m_rows), static_cast<int>(std::min<int64_t>(kNr, n - c)), x, NarrowRows{w[s], first + c},
              y[s] + first + c, ldy);
      }
      return;
    }
    const float *block = w[s].Floats() + first * k_len;
    if (w[s].type != kFloat32) {
      wide.resize(n * k_len);
      for (int64_t r = 0; r < n; ++r) w[s].Widen(first + r, wide.data() + r * k_len);
      block = wide.data();
    }
    for (int64_t m = 0; m < m_rows; m += kMr) {
      for (int64_t c = 0; c < n; c += kNr) {
        Tiled(static_cast<int>(std::min<int64_t>(kMr, m_rows - m)), static_cast<int>(std::min<int64_t>(kNr, n - c)),
              x + m * k_len, FloatRows{block + c * k_len, k_len}, y[s] + m * ldy + first + c, ldy);
      }
    }
  }
};
// Products for one or two rows M (one sequence's decode step: memory-bound, every weight read once): groups of kRows
// weight rows, each group read as kRows interleaved streams (one sum per row: kRows independent chains) with the next
// group fetched into L2 as it goes, narrow weights widened in registers as they stream in. The threads take
// contiguous ranges of groups.
struct Stream : Products {
  static constexpr int kRows = 8;

  Stream(const float *x_, int64_t m_rows_, Outputs outputs) : Products(x_, m_rows_, outputs) {
    for (int s = 0; s < count; ++s) OnHugePages(w[s].data, w[s].rows * w[s].row_bytes);
  }

  // Weight rows first..first + R of weight s against every row of x.
  template <int R>
  void Rows(int s, int64_t first) const {
    const Matrix &m_w = w[s];
    const uint8_t *rows = m_w.Row(first);
    const uint8_t *ahead = first + 2 * R <= m_w.rows ? rows + R * m_w.row_bytes : rows;
    for (int64_t m = 0; m < m_rows; ++m) {
      const float *xm = x + m * k_len;
      Vec acc[R] = {};
      int64_t k = 0;
      if (m_w.type == kFloat32) {
        for (; k + kLanes <= k_len; k += kLanes) {
          const Vec xv = Load(xm + k);
          for (int r = 0; r < R; ++r) {
            __builtin_prefetch(ahead + r * m_w.row_bytes + 4 * k, 0, 2);
            acc[r] = Fma(Load(reinterpret_cast<const float *>(rows + r * m_w.row_bytes) + k), xv, acc[r]);
          }
        }
      } else if (m_w.type == kBFloat16) {
        for (; k < k_len; k += kLanes) {
          const Vec xv = Load(xm + k);
          for (int r = 0; r < R; ++r) {
            __builtin_prefetch(ahead + r * m_w.row_bytes + 2 * k, 0, 2);
            acc[r] = Fma(LoadBF16(rows + r * m_w.row_bytes + 2 * k), xv, acc[r]);
          }
        }
      } else {
        for (int64_t b = 0; b < k_len / kQ8Values; ++b) {
          const Vec x0 = Load(xm + b * kQ8Values), x1 = Load(xm + b * kQ8Values + kLanes);
          for (int r = 0; r < R; ++r) {
            const uint8_t *block = rows + r * m_w.row_bytes + b * kQ8Bytes;
            __builtin_prefetch(ahead + (block - rows), 0, 2);
            // Each weight d * q (exact in float32) times x, as the widened rows of the tiles take it.
            const Vec d = Splat(Half(block));
            acc[r] = Fma(LoadQ8(block + 2) * d, x0, acc[r]);
            acc[r] = Fma(LoadQ8(block + 2 + kLanes) * d, x1, acc[r]);
          }
        }
        k = k_len;
      }
      for (int r = 0; r < R; ++r) {
        float sum = Sum(acc[r]);
        for (int64_t j = k; j < k_len; ++j) {
          sum += reinterpret_cast<const float *>(rows + r * m_w.row_bytes)[j] * xm[j];
        }
        y[s][m * m_w.rows + first + r] = sum;
      }
    }
  }

  void Group(int s, int64_t row, std::vector<float> &wide) const {
    const int64_t end = std::min<int64_t>(row + kRows, w[s].rows);
    const bool vector = w[s].type != kBFloat16 || k_len % kLanes == 0;
    if (vector && end - row == kRows) {
      Rows<kRows>(s, row);
    } else if (vector) {
      for (int64_t r = row; r < end; ++r) Rows<1>(s, r);
    } else {
      Block(s, row, end - row, wide);
    }
  }

  void Part(int part, int parts) const override {
    std::vector<float> wide;
    Contiguous(part, parts, kRows, [&](int s, int64_t row) { Group(s, row, wide); });
  }
};

// Products for a few rows M (a decode step of a few sequences: every weight read once per step). Each thread
// takes one contiguous run of kNr-row panels, so that it reads one sequential stream, and fetches the panel kAhead
// panels on into the cache while it computes this one.
struct Gemv : Products {
  static constexpr int64_t kAhead = 2;

  Gemv(const float *x_, int64_t m_rows_, Outputs outputs) : Products(x_, m_rows_, outputs) {
    for (int s = 0; s < count; ++s) OnHugePages(w[s].data, w[s].rows * w[s].row_bytes);
  }

  void Part(int part, int parts) const override {
    std::vector<float> wide;
    Contiguous(part, parts, kNr, [&](int s, int64_t row) {
      const int64_t ahead = row + kAhead * kNr;
      if (ahead < w[s].rows) {
        const uint8_t *bytes = w[s].Row(ahead);
        const int64_t size = std::min<int64_t>(kNr, w[s].rows - ahead) * w[s].row_bytes;
        for (int64_t b = 0; b < size; b += 64) __builtin_prefetch(bytes + b, 0, 2);
      }
      Block(s, row, std::min<int64_t>(kNr, w[s].rows - row), wide);
    });
  }
};

// The same products for many rows M (a prompt: compute-bound). The threads share groups of kGroup weight rows, widened
// once per group if stored narrower, the group's tiles against every row of x.
struct Gemm : Products {
  static constexpr int kGroup = 4 * kNr;

  Gemm(const float *x_, int64_t m_rows_, Outputs outputs) : Products(x_, m_rows_, outputs) {}

  void Part(int part, int parts) const override {
    int64_t groups[kMax], total = 0;
    for (int s = 0; s < count; ++s) total += groups[s] = (w[s].rows + kGroup - 1) / kGroup;
    std::vector<float> wide;
    for (int64_t g = part; g < total; g += parts) {
      int64_t p = g, s = 0;
      while (p >= groups[s]) p -= groups[s++];
      Block(static_cast<int>(s), p * kGroup, std::min<int64_t>(kGroup, w[s].rows - p * kGroup), wide);
    }
  }
};

// Attention of new tokens over their sequences' cached keys/values (the new tokens' own included). Caches are
// head-major (kv_heads * rows_per_head, dim); a position p of a token's sequence is in slot
// table[p / block_size] * block_size + p % block_size; a token attends to positions < valid[token].
//
// Tokens are taken in runs of up to kQueries consecutive positions of one sequence (a prompt; a decode step's tokens
// are runs of one), each run with the query heads that share a key/value head: for every kKeys positions, the keys
// are gathered and transposed once, then each query's kKeys scores are one vector (dim broadcast multiply-adds), and
// its softmax is kept online (a running maximum and sum, as flash attention does), so the work is vector-wide and
// nothing grows with the sequence but the loop. Work is shared by (run, key/value head), interleaved between the
// threads so that a prompt's short early runs and long late runs share out evenly.
struct Attention : Job {
  static constexpr int64_t kQueries = 16, kKeys = kLanes, kTransposeQueries = 8;
  const float *q, *key_cache, *value_cache;
  const int32_t *const *tables;
  const int32_t *valid;
  float *out;
  int64_t tokens, heads, kv_heads, dim, block_size, rows_per_head;
  float scale;
  std::vector<std::pair<int64_t, int64_t>> runs;     // (first token, tokens)

  void FindRuns() {
    runs.clear();
    for (int64_t t = 0; t < tokens; ++t) {
      if (!runs.empty() && runs.back().second < kQueries && tables[t] == tables[t - 1] &&
          valid[t] == valid[t - 1] + 1) {
        ++runs.back().second;
      } else {
        runs.emplace_back(t, 1);
      }
    }
  }

  int64_t Slot(const int32_t *table, int64_t p) const {
    return int64_t{table[p / block_size]} * block_size + p % block_size;
  }

  void Run(int64_t first, int64_t count, int64_t group, std::vector<float> &state, std::vector<float> &keys_t) const {
    const int64_t rep = heads / kv_heads, queries = rep * count, vecs = dim / kLanes;
    const float *keys = key_cache + group * rows_per_head * dim, *values = value_cache + group * rows_per_head * dim;
    const int32_t *table = tables[first];
    const int64_t length = valid[first + count - 1];
    // Per query: running maximum, running sum, then dim sums of weighted values.
    const int64_t stride = 2 + dim;
    state.assign(queries * stride, 0.0f);
    for (int64_t i = 0; i < queries; ++i) state[i * stride] = -INFINITY;
    keys_t.resize(dim * kKeys);
    // Few queries (a decode step): each score is a dot product; many: the keys are transposed once for all of them.
    const bool transpose = queries >= kTransposeQueries;
    const float *key_rows[kKeys], *rows[kKeys];
    alignas(64) float scores[kKeys], weights[kKeys];
    for (int64_t p0 = 0; p0 < length; p0 += kKeys) {
      const int64_t n_keys = std::min(kKeys, length - p0);
      if (block_size % kKeys == 0) {     // the kKeys positions are consecutive rows of one cache block
        const int64_t slot = Slot(table, p0);
        for (int64_t j = 0; j < n_keys; ++j) {
          key_rows[j] = keys + (slot + j) * dim;
          rows[j] = values + (slot + j) * dim;
        }
      } else {
        for (int64_t j = 0; j < n_keys; ++j) {
          key_rows[j] = keys + Slot(table, p0 + j) * dim;
          rows[j] = values + Slot(table, p0 + j) * dim;
        }
      }
      if (transpose) {
        for (int64_t j = 0; j < kKeys; ++j) {
          for (int64_t d = 0; d < dim; ++d) keys_t[d * kKeys + j] = j < n_keys ? key_rows[j][d] : 0.0f;
        }
      }
      for (int64_t i = 0; i < queries; ++i) {
        const int64_t token = first + i % count, head = group * rep + i / count;
        const int64_t visible = std::min(n_keys, valid[token] - p0);
        if (visible <= 0) continue;
        const float *query = q + (token * heads + head) * dim;
        if (transpose) {
          Vec s = {};
          for (int64_t d = 0; d < dim; ++d) s = Fma(Splat(query[d]), Load(&keys_t[d * kKeys]), s);
          std::memcpy(scores, &s, sizeof(s));
        } else {
          for (int64_t j = 0; j < visible; ++j) {
            Vec products = {};
            for (int64_t d = 0; d < dim; d += kLanes) products = Fma(Load(query + d), Load(key_rows[j] + d), products);
            scores[j] = Sum(products);
          }
        }
        float top = -INFINITY;
        for (int64_t j = 0; j < visible; ++j) top = std::max(top, scores[j] *= scale);
        float *st = &state[i * stride];
        const float best = std::max(st[0], top), correction = std::exp(st[0] - best);
        const Vec e = Exp(Load(scores) - best);
        std::memcpy(weights, &e, sizeof(e));
        float total = 0.0f;
        for (int64_t j = 0; j < visible; ++j) total += weights[j];
        st[0] = best;
        st[1] = st[1] * correction + total;
        float *acc = st + 2;
        for (int64_t v = 0; v < vecs; ++v) {
          Vec a = Load(acc + v * kLanes) * correction;
          for (int64_t j = 0; j < visible; ++j) a = Fma(Splat(weights[j]), Load(rows[j] + v * kLanes), a);
          std::memcpy(acc + v * kLanes, &a, sizeof(a));
        }
      }
    }
    for (int64_t i = 0; i < queries; ++i) {
      const int64_t token = first + i % count, head = group * rep + i / count;
      const float *st = &state[i * stride];
      float *context = out + (token * heads + head) * dim;
      for (int64_t d = 0; d < dim; ++d) context[d] = st[1] > 0.0f ? st[2 + d] / st[1] : 0.0f;
    }
  }

  // One query head of one token, one key at a time: for head sizes that are not a multiple of the vector width.
  void Single(int64_t token, int64_t head, std::vector<float> &scores) const {
    const float *query = q + (token * heads + head) * dim;
    const float *keys = key_cache + head / (heads / kv_heads) * rows_per_head * dim;
    const float *values = value_cache + (keys - key_cache);
    const int64_t length = valid[token];
    scores.resize(length);
    float top = -INFINITY;
    for (int64_t p = 0; p < length; ++p) {
      scores[p] = Dot(query, keys + Slot(tables[token], p) * dim, dim) * scale;
      top = std::max(top, scores[p]);
    }
    float total = 0.0f;
    for (int64_t p = 0; p < length; ++p) total += scores[p] = std::exp(scores[p] - top);
    float *context = out + (token * heads + head) * dim;
    std::fill(context, context + dim, 0.0f);
    for (int64_t p = 0; p < length; ++p) {
      const float weight = scores[p] / total, *value = values + Slot(tables[token], p) * dim;
      for (int64_t d = 0; d < dim; ++d) context[d] += weight * value[d];
    }
  }

  void Part(int part, int parts) const override {
    std::vector<float> state, keys_t;
    if (dim % kLanes != 0) {
      for (int64_t task = part; task < tokens * heads; task += parts) Single(task / heads, task % heads, state);
      return;
    }
    const int64_t tasks = static_cast<int64_t>(runs.size()) * kv_heads;
    for (int64_t task = part; task < tasks; task += parts) {
      const auto &[first, count] = runs[task / kv_heads];
      Run(first, count, task % kv_heads, state, keys_t);
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

// One decoder layer's weights and KV cache (knowlm's kernels.py passes them in this order), with the widths they imply.
struct Layer {
  enum { kNorm1, kWq, kWk, kWv, kWo, kNorm2, kW1, kW2, kW3, kKeys, kValues, kCount };
  const float *norm1, *norm2;
  Matrix wq, wk, wv, wo, w1, w2, w3;
  float *keys, *values;             // (kv_heads * rows_per_head, dim), written in place
  int64_t hidden, heads, dim, q_width, kv_heads, kv_width, inter, rows_per_head;

  // From the kCount params at `first`; false if their dtypes or shapes do not make a layer of `heads` heads.
  bool Read(void **params, int *ndims, int64_t **shapes, const char **dtypes, int first, int64_t heads_) {
    auto matrix = [&](int i, Matrix &m) { return m.Set(params[first + i], dtypes[first + i], ndims[first + i],
                                                       shapes[first + i]); };
    if (!matrix(kWq, wq) || !matrix(kWk, wk) || !matrix(kWv, wv) || !matrix(kWo, wo) || !matrix(kW1, w1) ||
        !matrix(kW2, w2) || !matrix(kW3, w3) || !AllOf(dtypes, first + kNorm1, first + kNorm1 + 1, "float32") ||
        !AllOf(dtypes, first + kNorm2, first + kNorm2 + 1, "float32") ||
        !AllOf(dtypes, first + kKeys, first + kCount, "float32")) {
      return false;
    }
    norm1 = static_cast<const float *>(params[first + kNorm1]);
    norm2 = static_cast<const float *>(params[first + kNorm2]);
    keys = static_cast<float *>(params[first + kKeys]);
    values = static_cast<float *>(params[first + kValues]);
    heads = heads_;
    hidden = wq.cols, q_width = wq.rows, dim = heads > 0 ? q_width / heads : 0, kv_width = wk.rows;
    inter = w1.rows;
    if (dim == 0 || kv_width % dim != 0 || wk.cols != hidden || wv.rows != kv_width || wv.cols != hidden ||
        wo.rows != hidden || wo.cols != q_width || w1.cols != hidden || w3.rows != inter || w3.cols != hidden ||
        w2.rows != hidden || w2.cols != inter || ndims[first + kKeys] != 2 || shapes[first + kKeys][1] != dim) {
      return false;
    }
    kv_heads = kv_width / dim;
    if (kv_heads == 0 || heads % kv_heads != 0) return false;
    rows_per_head = shapes[first + kKeys][0] / kv_heads;
    return true;
  }
};

// The new tokens a layer computes (n of them, from one or more sequences) and what each attends to.
struct Tokens {
  int64_t n;
  const float *cos, *sin;           // (n, dim) at each token's position
  const int32_t *valid;             // (n,) positions it attends to: its own position + 1
  const int32_t *const *tables;     // (n,) its sequence's block table
  const int32_t *slots;             // (n,) its cache slot (-1: padding, to each head's last row)
  int64_t block_size;
};

// Up to kStreamRows rows (one sequence's decode step), products stream each weight row by row; up to kGemvRows (a
// decode step of a batch) they read each weight once in panels; more rows (prompts) take the blocked product. All
// three sum every output in the same order.
constexpr int64_t kStreamRows = 2, kGemvRows = 16;

// y = x (rows, width) . w^T for each (w, y) pair sharing x.
void Linear(Pool &pool, const float *x, int64_t rows, Outputs outputs) {
  if (rows <= kStreamRows) {
    pool.Run(Stream(x, rows, outputs));
  } else if (rows <= kGemvRows) {
    pool.Run(Gemv(x, rows, outputs));
  } else {
    pool.Run(Gemm(x, rows, outputs));
  }
}

// out (n, hidden) = the layer applied to x (n, hidden); out may be x.
void LayerForward(const Layer &w, const Tokens &t, float eps, const float *x, float *out) {
  const int64_t n = t.n, hidden = w.hidden;
  thread_local std::vector<float> scratch;
  scratch.resize(n * (2 * hidden + 2 * w.q_width + 2 * w.kv_width + 2 * w.inter));
  float *normed = scratch.data(), *q = normed + n * hidden, *k = q + n * w.q_width;
  float *v = k + n * w.kv_width, *context = v + n * w.kv_width, *gate = context + n * w.q_width;
  float *up = gate + n * w.inter, *residual = up + n * w.inter;
  Pool &pool = Helpers();

  RmsNorm(x, w.norm1, eps, n, hidden, normed);
  Linear(pool, normed, n, {{w.wq, q}, {w.wk, k}, {w.wv, v}});
  RopeRows(q, t.cos, t.sin, n * w.heads, w.dim, w.heads, n, false, q);
  RopeRows(k, t.cos, t.sin, n * w.kv_heads, w.dim, w.kv_heads, n, false, k);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = t.slots[i] < 0 ? w.rows_per_head - 1 : t.slots[i];
    for (int64_t h = 0; h < w.kv_heads; ++h) {
      const int64_t row = h * w.rows_per_head + slot;
      std::memcpy(w.keys + row * w.dim, k + (i * w.kv_heads + h) * w.dim, w.dim * sizeof(float));
      std::memcpy(w.values + row * w.dim, v + (i * w.kv_heads + h) * w.dim, w.dim * sizeof(float));
    }
  }
  Attention attention;
  attention.q = q;
  attention.key_cache = w.keys;
  attention.value_cache = w.values;
  attention.tables = t.tables;
  attention.valid = t.valid;
  attention.out = context;
  attention.tokens = n;
  attention.heads = w.heads;
  attention.kv_heads = w.kv_heads;
  attention.dim = w.dim;
  attention.block_size = t.block_size;
  attention.rows_per_head = w.rows_per_head;
  attention.scale = 1.0f / std::sqrt(static_cast<float>(w.dim));
  attention.FindRuns();
  pool.Run(attention);
  Linear(pool, context, n, {{w.wo, residual}});
  for (int64_t i = 0; i < n * hidden; ++i) residual[i] += x[i];
  RmsNorm(residual, w.norm2, eps, n, hidden, normed);
  Linear(pool, normed, n, {{w.w1, gate}, {w.w3, up}});
  int64_t i = 0;
  for (; i + kLanes <= n * w.inter; i += kLanes) {       // SiLU(gate) * up
    const Vec g = Load(gate + i), silu = g / (Exp(-g) + 1.0f) * Load(up + i);
    std::memcpy(gate + i, &silu, sizeof(silu));
  }
  for (; i < n * w.inter; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  Linear(pool, gate, n, {{w.w2, out}});
  for (int64_t j = 0; j < n * hidden; ++j) out[j] += residual[j];
}

// Reads `layers` Layers at params[first]; false if one is not a layer.
bool ReadLayers(std::vector<Layer> &weights, int layers, void **params, int *ndims, int64_t **shapes,
                const char **dtypes, int first, int64_t heads) {
  weights.resize(layers);
  for (int l = 0; l < layers; ++l) {
    if (!weights[l].Read(params, ndims, shapes, dtypes, first + l * Layer::kCount, heads)) return false;
  }
  return true;
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
  Matrix w;
  if (nparam != 3 || ndims[0] != 2 || !w.Set(params[1], dtypes[1], ndims[1], shapes[1]) || shapes[0][1] != w.cols) {
    return 1;
  }
  if (!AllOf(dtypes, 0, 1, "float32") || !AllOf(dtypes, 2, 3, "float32")) return 2;
  Linear(Helpers(), static_cast<const float *>(params[0]), shapes[0][0], {{w, static_cast<float *>(params[2])}});
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
// (kv_heads*D, H); wo (H, heads*D); ffn_norm (H); w1 (I, H); w2 (H, I); w3 (I, H) -- each float32, bfloat16 or Q8_0;
// key_cache, value_cache (kv_heads * rows_per_head, D), written in place); cos, sin (B, D) at each sequence's new
// position; batch_valid_length (B,) int32 (length with the new token); block_tables (B, max_blocks) int32;
// slot_mapping (B,) int32 (-1: padding); meta float32 [heads, eps, block_size]. Output: the layer's output (B, H).
extern "C" int KnowLMDecodeLayer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  (void)stream;
  (void)extra;
  enum { kX, kLayer, kCos = kLayer + Layer::kCount, kSin, kValid, kBlocks, kSlots, kMeta, kOut, kCount };
  if (nparam != kCount) return 1;
  if (!AllOf(dtypes, kX, kLayer, "float32") || !AllOf(dtypes, kCos, kValid, "float32") ||
      !AllOf(dtypes, kValid, kMeta, "int32") || !AllOf(dtypes, kMeta, kCount, "float32")) {
    return 2;
  }
  const float *meta = static_cast<const float *>(params[kMeta]);
  Layer layer;
  if (!layer.Read(params, ndims, shapes, dtypes, kLayer, static_cast<int64_t>(meta[0])) || ndims[kX] != 2 ||
      shapes[kX][1] != layer.hidden || shapes[kCos][1] != layer.dim) {
    return 3;
  }
  const int64_t batch = shapes[kX][0], max_blocks = shapes[kBlocks][1];
  std::vector<const int32_t *> tables(batch);
  for (int64_t b = 0; b < batch; ++b) tables[b] = static_cast<const int32_t *>(params[kBlocks]) + b * max_blocks;
  const Tokens tokens{batch, static_cast<const float *>(params[kCos]), static_cast<const float *>(params[kSin]),
                      static_cast<const int32_t *>(params[kValid]), tables.data(),
                      static_cast<const int32_t *>(params[kSlots]), static_cast<int64_t>(meta[2])};
  LayerForward(layer, tokens, meta[1], static_cast<const float *>(params[kX]), static_cast<float *>(params[kOut]));
  return 0;
}

namespace {

// A whole model's inputs to KnowLMForward and KnowLMDecodeSteps, after their own first `first` inputs: embedding (V, H);
// cos, sin (P, D), the RoPE tables of all positions; final_norm (H); lm_head (V, H); meta float32 [heads, eps,
// block_size, final norm eps]; then Layer::kCount inputs per layer. The embedding and lm_head may be float32,
// bfloat16 or Q8_0 like the layers' projections.
struct Model {
  enum { kEmbedding, kCos, kSin, kNorm, kHead, kMeta, kLayers };
  Matrix embedding, head;
  const float *cos, *sin, *norm, *meta;
  std::vector<Layer> layers;
  int64_t positions, hidden, dim, vocab, block_size;

  // 0, or the error code to return.
  int Read(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, int first) {
    const int count = (nparam - first - kLayers - 1) / Layer::kCount;
    if (count < 1 || first + kLayers + count * Layer::kCount + 1 != nparam) return 1;
    if (!embedding.Set(params[first + kEmbedding], dtypes[first + kEmbedding], ndims[first + kEmbedding],
                       shapes[first + kEmbedding]) ||
        !head.Set(params[first + kHead], dtypes[first + kHead], ndims[first + kHead], shapes[first + kHead]) ||
        !AllOf(dtypes, first + kCos, first + kHead, "float32") ||
        !AllOf(dtypes, first + kMeta, first + kLayers, "float32")) {
      return 2;
    }
    auto floats = [&](int i) { return static_cast<const float *>(params[first + i]); };
    cos = floats(kCos), sin = floats(kSin), norm = floats(kNorm), meta = floats(kMeta);
    if (!ReadLayers(layers, count, params, ndims, shapes, dtypes, first + kLayers, static_cast<int64_t>(meta[0]))) {
      return 3;
    }
    positions = shapes[first + kCos][0], hidden = layers[0].hidden, dim = layers[0].dim, vocab = head.rows;
    block_size = static_cast<int64_t>(meta[2]);
    if (embedding.cols != hidden || head.cols != hidden || embedding.rows < vocab ||
        shapes[first + kCos][1] != dim || shapes[first + kNorm][0] != hidden || block_size < 1) {
      return 3;
    }
    return 0;
  }

  // Runs n new tokens (ids, positions, block tables) through every layer; x (n, hidden) ends as the last layer's
  // output. False if an id, a position or its cache block is out of range.
  bool Layers(int64_t n, const int32_t *ids, const int64_t *position, const int32_t *const *tables,
              int64_t max_blocks, std::vector<float> &x) const {
    std::vector<float> cos_rows(n * dim), sin_rows(n * dim);
    std::vector<int32_t> valid(n), slots(n);
    x.resize(n * hidden);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = position[i];
      if (ids[i] < 0 || ids[i] >= embedding.rows || p < 0 || p >= positions || p / block_size >= max_blocks ||
          tables[i][p / block_size] < 0) {
        return false;
      }
      embedding.Widen(ids[i], &x[i * hidden]);
      std::memcpy(&cos_rows[i * dim], cos + p * dim, dim * sizeof(float));
      std::memcpy(&sin_rows[i * dim], sin + p * dim, dim * sizeof(float));
      valid[i] = static_cast<int32_t>(p + 1);
      slots[i] = static_cast<int32_t>(int64_t{tables[i][p / block_size]} * block_size + p % block_size);
    }
    const Tokens tokens{n, cos_rows.data(), sin_rows.data(), valid.data(), tables, slots.data(), block_size};
    for (const Layer &layer : layers) LayerForward(layer, tokens, meta[1], x.data(), x.data());
    return true;
  }

  // logits (rows, vocab) of the final norm and lm_head applied to x (rows, hidden).
  void Logits(const float *x, int64_t rows, float *logits) const {
    std::vector<float> normed(rows * hidden);
    RmsNorm(x, norm, meta[3], rows, hidden, normed.data());
    Linear(Helpers(), normed.data(), rows, {{head, logits}});
  }
};

}  // namespace

// A model for up to T new tokens of each of B sequences, their keys and values written into the cache: a prompt (or a
// chunk of one after the chunks before it), or a decode step. Inputs: tokens (B, T) int32; starts (B,) int32, the
// position of each sequence's first new token (= the tokens already in its cache); counts (B,) int32, its new tokens
// (0 to T; 0: the sequence is left alone); block_tables (B, max_blocks) int32, covering every position written; then
// Model's inputs. Output: logits (B, V) float32 of each sequence's last new token (zeros where counts is 0).
extern "C" int KnowLMForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  (void)stream;
  (void)extra;
  enum { kTokens, kStarts, kCounts, kBlocks, kModel };
  if (nparam <= kModel || !AllOf(dtypes, kTokens, kModel, "int32") || !AllOf(dtypes, nparam - 1, nparam, "float32") ||
      ndims[kTokens] != 2 || ndims[kBlocks] != 2) {
    return 2;
  }
  Model model;
  if (const int error = model.Read(nparam, params, ndims, shapes, dtypes, kModel)) return error;
  auto ints = [&](int i) { return static_cast<const int32_t *>(params[i]); };
  const int64_t batch = shapes[kTokens][0], width = shapes[kTokens][1], max_blocks = shapes[kBlocks][1];
  if (shapes[nparam - 1][0] != batch || shapes[nparam - 1][1] != model.vocab) return 3;
  std::vector<int32_t> ids;
  std::vector<int64_t> position, last;            // last: each sequence's last new token among the n, or -1
  std::vector<const int32_t *> tables;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t count = ints(kCounts)[b], start = ints(kStarts)[b];
    if (count < 0 || count > width || start < 0) return 4;
    for (int64_t t = 0; t < count; ++t) {
      ids.push_back(ints(kTokens)[b * width + t]);
      position.push_back(start + t);
      tables.push_back(ints(kBlocks) + b * max_blocks);
    }
    last.push_back(count > 0 ? static_cast<int64_t>(ids.size()) - 1 : -1);
  }
  float *out = static_cast<float *>(params[nparam - 1]);
  std::fill(out, out + batch * model.vocab, 0.0f);
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n == 0) return 0;
  std::vector<float> x;
  if (!model.Layers(n, ids.data(), position.data(), tables.data(), max_blocks, x)) return 4;
  std::vector<float> rows;
  std::vector<int64_t> which;
  for (int64_t b = 0; b < batch; ++b) {
    if (last[b] < 0) continue;
    rows.insert(rows.end(), &x[last[b] * model.hidden], &x[(last[b] + 1) * model.hidden]);
    which.push_back(b);
  }
  std::vector<float> logits(which.size() * model.vocab);
  model.Logits(rows.data(), static_cast<int64_t>(which.size()), logits.data());
  for (size_t i = 0; i < which.size(); ++i) {
    std::memcpy(out + which[i] * model.vocab, &logits[i * model.vocab], model.vocab * sizeof(float));
  }
  return 0;
}

// Greedy decoding of up to N tokens per sequence in one call: a decode step as one graph call adds MindSpore's graph
// entry and exit and Python on top of its kernels (a sizeable part of a small model's step). Each step computes what
// KnowLMForward computes for one new token per sequence, with the same functions, and takes the argmax.
// Inputs: tokens (B,) int32, each sequence's last token; valid (B,) int32, its length with that token; steps (B,)
// int32, at most this many new tokens for it (0: none); block_tables (B, max_blocks) int32, covering every position
// written; eos (E,) int32: a sequence stops after one of these; then Model's inputs. Output: (B, N) int32, each
// sequence's new tokens, then -1.
extern "C" int KnowLMDecodeSteps(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  (void)stream;
  (void)extra;
  enum { kTokens, kValid, kSteps, kBlocks, kEos, kModel };
  const int out_index = nparam - 1;
  if (nparam <= kModel || !AllOf(dtypes, kTokens, kModel, "int32") || !AllOf(dtypes, out_index, nparam, "int32")) {
    return 2;
  }
  Model model;
  if (const int error = model.Read(nparam, params, ndims, shapes, dtypes, kModel)) return error;
  auto ints = [&](int i) { return static_cast<const int32_t *>(params[i]); };
  const int64_t batch = shapes[kTokens][0], width = shapes[out_index][1], max_blocks = shapes[kBlocks][1];
  const int32_t *eos = ints(kEos), *eos_end = eos + shapes[kEos][0];
  int32_t *out = static_cast<int32_t *>(params[out_index]);
  std::fill(out, out + batch * width, -1);

  std::vector<int32_t> last(ints(kTokens), ints(kTokens) + batch), ids;
  std::vector<int64_t> rows, position;  // the sequences still decoding at this step
  std::vector<const int32_t *> tables;
  std::vector<float> x, logits;
  std::vector<bool> stopped(batch, false);
  for (int64_t step = 0; step < width; ++step) {
    rows.clear(), ids.clear(), position.clear(), tables.clear();
    for (int64_t r = 0; r < batch; ++r) {
      if (stopped[r] || step >= ints(kSteps)[r]) continue;
      rows.push_back(r);
      ids.push_back(last[r]);
      position.push_back(ints(kValid)[r] - 1 + step);
      tables.push_back(ints(kBlocks) + r * max_blocks);
    }
    if (rows.empty()) break;
    const int64_t n = static_cast<int64_t>(rows.size());
    if (!model.Layers(n, ids.data(), position.data(), tables.data(), max_blocks, x)) return 4;
    logits.resize(n * model.vocab);
    model.Logits(x.data(), n, logits.data());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = rows[i];
      last[r] = static_cast<int32_t>(Argmax(&logits[i * model.vocab], model.vocab));
      out[r * width + step] = last[r];
      stopped[r] = std::find(eos, eos_end, last[r]) != eos_end;
    }
  }
  return 0;
}
