// Per-row LoRA update on the CPU: each row of a batch adds its own adapter's (scaled) B A x.
//
// Why a kernel: the pure-torch way (layers.lora_add's masked path) multiplies every row by every
// lane's A in view, masks away all but the row's own share, and multiplies by every lane's B^T: the
// arithmetic is lanes times what is needed, and it runs in fp32 because torch's small bf16 matmuls
// were slower than the bytes they save. Here a row reads only its own lane, once, and lanes may be
// bf16 (half the bytes: a decode step's LoRA cost is reading the adapters), widened exactly to fp32,
// or int8 with a scale per row of A and of B^T (a quarter of fp32's bytes).
//
// Layout (lora.AdapterSlots keeps the lanes this way; lane index -1 is "no adapter"):
//   y      (rows, out) fp32 or bf16, contiguous: updated in place, columns of the parts side by side
//   x      (rows, in) fp32 or bf16
//   a      (parts, lanes, r, in) fp32 or bf16, contiguous: lane l's A of part p (r padded with zeros)
//   bts    per part (layers, lanes * r, out of the part), contiguous, a's dtype: B^T, scale folded in
//   int8 lanes (paged_ops.to_lanes): each row of A and of B^T is its n int8 values q and then the
//          4 bytes of an fp32 scale s (the row is s q): a is (parts, lanes, r, in + 4), each B^T
//          (layers, lanes * r, out + 4). Zero rows (past an adapter's rank) have s = 0.
//   layer  which layer of bts
//   lanes  (rows,) int32: the row's lane, or -1 for none (the row is left untouched, bit for bit)
// Numerics: h = A x and then y + h B^T, both accumulated in fp32 in a fixed order that depends on
// the row alone (one task per row and part), so a row's result never depends on the other rows, on
// the batch size or on the number of threads. int8 lanes: h_j = s_j (q_j . x), then
// y + sum_j (h_j s'_j) q'_j.
//
// Vectorised with AVX-512 where the library is built for it (-march=native), else AVX2 + FMA (e.g.
// -march=x86-64-v3), else plain loops. Which one is fixed when the library is built, so the order of
// the sums is too.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float widen(float v) { return v; }
inline float widen(int8_t v) { return static_cast<float>(v); }
inline float widen(at::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
inline void store(T* dst, float v) { *dst = static_cast<T>(v); }

#if defined(__AVX512F__)
// V floats per register; load widens V lanes of fp32 or bf16 (exactly: bf16 is fp32's top half)
constexpr int64_t V = 16;
using vec = __m512;
inline vec load(const float* p) { return _mm512_loadu_ps(p); }
inline vec load(const at::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline vec load(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vec zero() { return _mm512_setzero_ps(); }
inline vec splat(float v) { return _mm512_set1_ps(v); }
inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
inline void put(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline float total(vec v) {  // a fixed order: halves added pairwise
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
#define AMBER_LORA_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t V = 8;
using vec = __m256;
inline vec load(const float* p) { return _mm256_loadu_ps(p); }
inline vec load(const at::BFloat16* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline vec load(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vec zero() { return _mm256_setzero_ps(); }
inline vec splat(float v) { return _mm256_set1_ps(v); }
inline vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
inline void put(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline float total(vec v) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
#define AMBER_LORA_SIMD 1
#endif

// how far ahead the loops ask for the lanes' bytes: each row's lane is a few contiguous stretches of
// tens of KB, fresh from memory, and the hardware prefetcher stops at every 4 KB page
constexpr int64_t AHEAD = 2048;
// the lines AHEAD past the `count` values at p that a loop's iteration reads (one at least)
template <typename T>
inline void prefetch(const T* p, int64_t count) {
#if defined(AMBER_LORA_SIMD)
  const char* at = reinterpret_cast<const char*>(p) + AHEAD;
  int64_t b = 0;
  do {
    _mm_prefetch(at + b, _MM_HINT_T0);
    b += 64;
  } while (b < count * static_cast<int64_t>(sizeof(T)));
#endif
}

// the first AHEAD bytes of a stretch, which the loops' own prefetches (AHEAD on) never ask for
template <typename T>
inline void start(const T* p) {
#if defined(AMBER_LORA_SIMD)
  for (int64_t b = 0; b < AHEAD; b += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T0);
#endif
}

// sum_k a[k] * x[k] in fp32, in an order fixed by n alone
template <typename T>
inline float dot(const T* __restrict a, const float* __restrict x, int64_t n) {
  int64_t k = 0;
  float sum = 0.0f;
#if defined(AMBER_LORA_SIMD)
  vec s0 = zero(), s1 = zero(), s2 = zero(), s3 = zero();  // four FMA chains
  for (; k + 4 * V <= n; k += 4 * V) {
    prefetch(a + k, 4 * V);
    s0 = fma(load(a + k), load(x + k), s0);
    s1 = fma(load(a + k + V), load(x + k + V), s1);
    s2 = fma(load(a + k + 2 * V), load(x + k + 2 * V), s2);
    s3 = fma(load(a + k + 3 * V), load(x + k + 3 * V), s3);
  }
  for (; k + V <= n; k += V) s0 = fma(load(a + k), load(x + k), s0);
  sum = total(add(add(s0, s1), add(s2, s3)));
#endif
  for (; k < n; ++k) sum += widen(a[k]) * x[k];
  return sum;
}

// out[c] = sum_j h[j] * b[j * stride + c], for c < n, summed over j in order (from 0: the first term
// is h[0] b[c] rounded). Four rows of b at a time, each a stream the prefetcher follows, so that a
// partial sum goes through memory once per four rows rather than per row
template <typename T>
inline void update(const float* __restrict h, int64_t r, const T* __restrict b, int64_t stride, float* __restrict out,
                   int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = 0.0f;
  int64_t j = 0;
#if defined(AMBER_LORA_SIMD)
  for (; j + 4 <= r; j += 4) {
    const T *b0 = b + j * stride, *b1 = b0 + stride, *b2 = b1 + stride, *b3 = b2 + stride;
    const vec h0 = splat(h[j]), h1 = splat(h[j + 1]), h2 = splat(h[j + 2]), h3 = splat(h[j + 3]);
    int64_t c = 0;
    for (; c + V <= n; c += V) {
      prefetch(b0 + c, V);
      prefetch(b1 + c, V);
      prefetch(b2 + c, V);
      prefetch(b3 + c, V);
      const vec s = fma(h1, load(b1 + c), fma(h0, load(b0 + c), load(out + c)));
      put(out + c, fma(h3, load(b3 + c), fma(h2, load(b2 + c), s)));
    }
    for (; c < n; ++c) {
      float sum = out[c];
      sum += h[j] * widen(b0[c]);
      sum += h[j + 1] * widen(b1[c]);
      sum += h[j + 2] * widen(b2[c]);
      sum += h[j + 3] * widen(b3[c]);
      out[c] = sum;
    }
  }
#endif
  for (; j < r; ++j) {
    const T* row = b + j * stride;
    for (int64_t c = 0; c < n; ++c) out[c] += h[j] * widen(row[c]);
  }
}

// the bytes past a row's values: int8 rows end in their fp32 scale
template <typename L>
constexpr int64_t TAIL = std::is_same<L, int8_t>::value ? static_cast<int64_t>(sizeof(float)) : 0;

// the scale of the int8 row of n values at p (1 for other lanes)
template <typename L>
inline float row_scale(const L* p, int64_t n) {
  if constexpr (std::is_same<L, int8_t>::value) {
    float s;
    std::memcpy(&s, p + n, sizeof s);
    return s;
  } else {
    return 1.0f;
  }
}

template <typename L, typename X>
void run(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const std::vector<at::Tensor>& bts,
         int64_t layer, const int32_t* lanes) {
  const int64_t rows = x.size(0), in = x.size(1), parts = a.size(0), num_lanes = a.size(1), r = a.size(2);
  const int64_t width = y.size(1), stride_a = in + TAIL<L>;  // a row of A, in elements of L
  std::vector<int64_t> columns(parts + 1, 0);
  std::vector<const L*> bp(parts);
  for (int64_t p = 0; p < parts; ++p) {
    columns[p + 1] = columns[p] + bts[p].size(2) - TAIL<L>;
    bp[p] = bts[p].data_ptr<L>() + layer * bts[p].stride(0);
  }
  const L* ap = a.data_ptr<L>();
  const X* xp = x.data_ptr<X>();
  X* yp = y.data_ptr<X>();
  // one task per (row, part): its whole update, in one fixed order
  at::parallel_for(0, rows * parts, 1, [&](int64_t first, int64_t last) {
    std::vector<float> xf(in), acc, h(r);
    for (int64_t task = first; task < last; ++task) {
      const int64_t row = task / parts, p = task % parts, lane = lanes[row];
      if (lane < 0) continue;
      if (task + 1 < last && lanes[(task + 1) / parts] >= 0) {  // the next task's first bytes, while this one runs
        const int64_t np = (task + 1) % parts, nl = lanes[(task + 1) / parts];
        start(ap + ((np * num_lanes + nl) * r) * stride_a);
        start(bp[np] + nl * r * (columns[np + 1] - columns[np] + TAIL<L>));
      }
      for (int64_t k = 0; k < in; ++k) xf[k] = widen(xp[row * in + k]);
      const L* lane_a = ap + ((p * num_lanes + lane) * r) * stride_a;
      for (int64_t j = 0; j < r; ++j) {
        const L* row_a = lane_a + j * stride_a;
        h[j] = dot(row_a, xf.data(), in) * row_scale(row_a, in);
      }
      const int64_t out = columns[p + 1] - columns[p], stride_b = out + TAIL<L>;
      const L* lane_b = bp[p] + lane * r * stride_b;
      for (int64_t j = 0; j < r; ++j) h[j] *= row_scale(lane_b + j * stride_b, out);
      acc.resize(out);
      update(h.data(), r, lane_b, stride_b, acc.data(), out);
      X* dst = yp + row * width + columns[p];
      for (int64_t c = 0; c < out; ++c) store(dst + c, widen(dst[c]) + acc[c]);
    }
  });
}

template <typename L>
void dispatch_x(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const std::vector<at::Tensor>& bts,
                int64_t layer, const int32_t* lanes) {
  if (x.scalar_type() == at::kFloat) return run<L, float>(y, x, a, bts, layer, lanes);
  return run<L, at::BFloat16>(y, x, a, bts, layer, lanes);
}

void lora_rows(at::Tensor y, const at::Tensor& x, const at::Tensor& a, at::TensorList bts, int64_t layer,
               const at::Tensor& lanes) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "x, y must be (rows, in), (rows, out)");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "x and y must have one dtype");
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16, "x, y must be fp32 or bf16");
  TORCH_CHECK(y.is_contiguous(), "y must be contiguous");
  const auto lane_type = a.scalar_type();
  TORCH_CHECK(lane_type == at::kFloat || lane_type == at::kBFloat16 || lane_type == at::kChar,
              "a must be fp32, bf16 or int8");
  const int64_t tail = lane_type == at::kChar ? static_cast<int64_t>(sizeof(float)) : 0;
  TORCH_CHECK(a.dim() == 4 && a.is_contiguous() && a.size(3) == x.size(1) + tail,
              "a must be contiguous (parts, lanes, r, in", tail ? " + 4)" : ")");
  TORCH_CHECK(static_cast<int64_t>(bts.size()) == a.size(0), "one B^T per part");
  TORCH_CHECK(lanes.dim() == 1 && lanes.scalar_type() == at::kInt && lanes.size(0) == x.size(0),
              "lanes must be (rows,) int32");
  const int64_t num_lanes = a.size(1), r = a.size(2);
  int64_t width = 0;
  std::vector<at::Tensor> parts;
  for (const auto& bt : bts) {
    TORCH_CHECK(bt.dim() == 3 && bt.is_contiguous() && bt.scalar_type() == a.scalar_type(),
                "each B^T must be contiguous (layers, lanes * r, out) in a's dtype");
    TORCH_CHECK(bt.size(1) == num_lanes * r, "B^T and a disagree on lanes * r");
    TORCH_CHECK(layer >= 0 && layer < bt.size(0), "layer out of range");
    TORCH_CHECK(bt.size(2) > tail, "B^T has no columns");
    width += bt.size(2) - tail;
    parts.push_back(bt);
  }
  TORCH_CHECK(width == y.size(1), "the parts' widths must add up to y's");
  at::Tensor lane_of = lanes.contiguous();
  const int32_t* lp = lane_of.data_ptr<int32_t>();
  for (int64_t i = 0; i < lanes.size(0); ++i)
    TORCH_CHECK(lp[i] >= -1 && lp[i] < num_lanes, "lanes[", i, "] = ", lp[i], " is not a lane");
  at::Tensor xc = x.contiguous();
  if (lane_type == at::kFloat) return dispatch_x<float>(y, xc, a, parts, layer, lp);
  if (lane_type == at::kChar) return dispatch_x<int8_t>(y, xc, a, parts, layer, lp);
  return dispatch_x<at::BFloat16>(y, xc, a, parts, layer, lp);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amber, m) {
  m.def("lora_rows(Tensor(a!) y, Tensor x, Tensor a, Tensor[] bts, int layer, Tensor lanes) -> ()");
}

TORCH_LIBRARY_IMPL(amber, CPU, m) {
  m.impl("lora_rows", &lora_rows);
}
