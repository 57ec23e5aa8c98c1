// 8-bit weight matmul on the CPU with one fp32 scale per `block` input columns of a row: GGUF's
// Q8_0 grid (block 32), in which SmolLM2's token embeddings, and so its tied LM head, are stored.
// y = x W^T, w = q * scale, q in [-127, 127].
//
// Why a kernel: the LM head is the largest matrix of a small model (49,152 x 576 for SmolLM2-135M)
// and a decode step reads all of it. torch's int8 kernel takes one scale per row, which is not the
// checkpoint's grid (a per-row requantization moves logprobs), and streamed ~9 GB/s; this one
// multiplies by exactly the checkpoint's values, from the same int8 table the embedding lookup
// reads (one copy for both), and returns fp32 logits.
//
// Layout (paged_ops.int8_pack): q (out / 16, in, 16) int8: tile t, column k, byte j = q[16t + j][k];
// scales (out / 16, in / block, 16) fp32; x (rows, in) fp32 or bf16, rounded to bf16 (to nearest
// even) either way; y (rows, out) fp32. block is a multiple of 4.
// Numerics, per row and output: per block, s = sum of x_k q_k in four fp32 chains of fused
// multiply-adds (chain k % 4, ascending k), s = (c0 + c1) + (c2 + c3); acc = fma(s, scale, acc),
// block after block. The order depends on the row alone: a row's result is the same at any batch
// size and thread count, and the AVX-512 and plain paths compute the same sums in the same order.
// With AVX-512 BF16, s is summed by vdpbf16ps a pair of columns (k, k + 1) at a time, in two
// chains ((k / 2) % 2, ascending k), s = c0 + c1: the products are exact in fp32 on every path
// (bf16 x times an int8), only the order of the additions differs (fp32 rounding, not bit for bit
// across CPUs; still the row's alone). x is rounded to bf16 on every path so that they compute
// the same products: logits move by ~2^-9 of a term, less than the Q8_0 grid itself (and llama.cpp
// rounds its activations to 8 bits for this product).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dense.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using amber::TILE;  // outputs per tile

// Rows [0, rows) of one tile: x (rows, in) fp32, out (rows, 16). The reference order.
void tile_plain(const int8_t* q, const float* scales, const float* x, int64_t rows, int64_t in, int64_t block,
                float* out) {
  const int64_t blocks = in / block;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < TILE; ++j) {
      float acc = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) {
        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int64_t k = b * block; k < (b + 1) * block; ++k)
          c[k % 4] = std::fmaf(static_cast<float>(q[k * TILE + j]), x[r * in + k], c[k % 4]);
        acc = std::fmaf((c[0] + c[1]) + (c[2] + c[3]), scales[b * TILE + j], acc);
      }
      out[r * TILE + j] = acc;
    }
}

#if defined(__AVX512BF16__)
// AVX-512 BF16: vdpbf16ps, two multiply-adds per lane and instruction (an FMA does one), which is
// what bounds the head at several rows. Columns k and k + 1 of a tile make one vector of pairs:
// their int8 values are bf16 exactly, and so are their products by x's bf16 values.
#define AMBER_INT8_R 8
#define AMBER_INT8_PAIRS 1
constexpr int64_t R = AMBER_INT8_R;  // rows per pass over a tile: 3R accumulators + temporaries

inline __m512i widen8(const int8_t* q) {  // 16 int8 as fp32 bits
  return _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)))));
}

template <int N>
void tile_rows(const int8_t* q, const float* scales, const uint32_t* x, int64_t in, int64_t block, float* out) {
  const int64_t blocks = in / block, pairs = in / 2;
  const uint32_t* xr[N];
  for (int r = 0; r < N; ++r) xr[r] = x + r * pairs;
  __m512 acc[N];
  for (int r = 0; r < N; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    _mm_prefetch(reinterpret_cast<const char*>(q + (b + 1) * block * TILE) + 2048, _MM_HINT_T0);
    __m512 c[N][2];
    for (int r = 0; r < N; ++r) c[r][0] = c[r][1] = _mm512_setzero_ps();
    for (int64_t k = b * block; k < (b + 1) * block; k += 4) {
#pragma GCC unroll 2
      for (int e = 0; e < 2; ++e) {
        const int64_t col = k + 2 * e;
        // lane j: column col's bf16 in the low half, column col + 1's in the high half
        const __m512i w = _mm512_mask_blend_epi16(0xAAAAAAAAu, _mm512_srli_epi32(widen8(q + col * TILE), 16),
                                                  widen8(q + (col + 1) * TILE));
#pragma GCC unroll 8
        for (int r = 0; r < N; ++r)
          c[r][e] = _mm512_dpbf16_ps(c[r][e], reinterpret_cast<__m512bh>(w),
                                     reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xr[r][col / 2]))));
      }
    }
    const __m512 scale = _mm512_loadu_ps(scales + b * TILE);
#pragma GCC unroll 8
    for (int r = 0; r < N; ++r) acc[r] = _mm512_fmadd_ps(_mm512_add_ps(c[r][0], c[r][1]), scale, acc[r]);
  }
  for (int r = 0; r < N; ++r) _mm512_storeu_ps(out + r * TILE, acc[r]);
}
#elif defined(__AVX512F__)
#define AMBER_INT8_R 4
constexpr int64_t R = AMBER_INT8_R;  // rows per pass over a tile: 5R accumulators + temporaries

template <int N>
void tile_rows(const int8_t* q, const float* scales, const float* x, int64_t in, int64_t block, float* out) {
  const int64_t blocks = in / block;
  const float* xr[N];
  for (int r = 0; r < N; ++r) xr[r] = x + r * in;
  __m512 acc[N];
  for (int r = 0; r < N; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    _mm_prefetch(reinterpret_cast<const char*>(q + (b + 1) * block * TILE) + 2048, _MM_HINT_T0);
    __m512 c[N][4];
    for (int r = 0; r < N; ++r) c[r][0] = c[r][1] = c[r][2] = c[r][3] = _mm512_setzero_ps();
    for (int64_t k = b * block; k < (b + 1) * block; k += 4) {
#pragma GCC unroll 4
      for (int e = 0; e < 4; ++e) {
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (k + e) * TILE))));
#pragma GCC unroll 8
        for (int r = 0; r < N; ++r) c[r][e] = _mm512_fmadd_ps(w, _mm512_set1_ps(xr[r][k + e]), c[r][e]);
      }
    }
    const __m512 scale = _mm512_loadu_ps(scales + b * TILE);
#pragma GCC unroll 8
    for (int r = 0; r < N; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(c[r][0], c[r][1]), _mm512_add_ps(c[r][2], c[r][3])),
                               scale, acc[r]);
  }
  for (int r = 0; r < N; ++r) _mm512_storeu_ps(out + r * TILE, acc[r]);
}
#endif

#if defined(AMBER_INT8_PAIRS)
using XValue = uint32_t;  // x as bf16 pairs: x[2p] in the low half of pair p, x[2p + 1] in the high
constexpr int64_t X_PER_VALUE = 2;
#else
using XValue = float;
constexpr int64_t X_PER_VALUE = 1;
#endif

void tile(const int8_t* q, const float* scales, const XValue* x, int64_t rows, int64_t in, int64_t block, float* out) {
#if defined(__AVX512F__)
  const int64_t stride = in / X_PER_VALUE;
  int64_t r = 0;
  for (; r + R <= rows; r += R) tile_rows<R>(q, scales, x + r * stride, in, block, out + r * TILE);
  switch (rows - r) {
#define AMBER_REST(n) case n: return tile_rows<n>(q, scales, x + r * stride, in, block, out + r * TILE);
    AMBER_REST(1) AMBER_REST(2) AMBER_REST(3)
#if AMBER_INT8_R > 4
    AMBER_REST(4) AMBER_REST(5) AMBER_REST(6) AMBER_REST(7)
#endif
#undef AMBER_REST
    default: return;
  }
#else
  tile_plain(q, scales, x, rows, in, block, out);
#endif
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, int64_t block) {
  TORCH_CHECK(x.dim() == 2, "x must be (rows, in)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kChar && q.is_contiguous() && q.size(2) == TILE,
              "q must be contiguous (out / 16, in, 16) int8");
  const int64_t rows = x.size(0), in = x.size(1), tiles = q.size(0);
  TORCH_CHECK(q.size(1) == in, "q has ", q.size(1), " input columns, x has ", in);
  TORCH_CHECK(block > 0 && block % 4 == 0 && in % block == 0, "block must be a multiple of 4 and divide in");
  TORCH_CHECK(scales.dim() == 3 && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
              scales.size(0) == tiles && scales.size(1) == in / block && scales.size(2) == TILE,
              "scales must be contiguous (out / 16, in / block, 16) fp32");
  // x rounded to bf16 (what a bf16 x is already), kept widened to fp32, or as bf16 pairs
  const at::Tensor xb = x.to(at::kBFloat16).contiguous();
  const int64_t width = tiles * TILE;
  at::Tensor y = at::empty({rows, width}, x.options().dtype(at::kFloat));
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
  thread_local std::vector<XValue> xbuf;
  xbuf.resize(rows * in / X_PER_VALUE);
#if defined(AMBER_INT8_PAIRS)
  for (int64_t i = 0; i < rows * in / 2; ++i) xbuf[i] = static_cast<uint32_t>(xs[2 * i]) | static_cast<uint32_t>(xs[2 * i + 1]) << 16;
#else
  for (int64_t i = 0; i < rows * in; ++i) xbuf[i] = amber::bf16_to_float(xs[i]);
#endif
  const XValue* xp = xbuf.data();
  const int64_t stride = in / X_PER_VALUE;
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = in / block;
  at::parallel_for(0, tiles, 16, [&](int64_t first, int64_t last) {
    constexpr int64_t CHUNK = 64;  // rows per call of `tile`: its output stays on the stack
    float out[CHUNK * TILE];
    for (int64_t t = first; t < last; ++t)
      for (int64_t r0 = 0; r0 < rows; r0 += CHUNK) {
        const int64_t n = std::min(CHUNK, rows - r0);
        tile(qp + t * in * TILE, sp + t * blocks * TILE, xp + r0 * stride, n, in, block, out);
        for (int64_t r = 0; r < n; ++r) std::memcpy(yp + (r0 + r) * width + t * TILE, out + r * TILE, TILE * sizeof(float));
      }
  });
  return y;
}

// W^T rows for the outputs of tiles [first, last) into out (in, width): each weight q scale in fp32,
// stored as T (fp32, or bf16 rounded to nearest even)
// Row after row of W^T (every tile of the slice), so that each row is written in one sweep
template <typename T>
void widen(const int8_t* qp, const float* sp, int64_t in, int64_t block, int64_t first, int64_t last, T* out,
           int64_t width) {
  const int64_t blocks = in / block;
  at::parallel_for(0, in, 16, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      T* row = out + k * width;
      for (int64_t t = first; t < last; ++t) {
        const int8_t* q = qp + (t * in + k) * TILE;
        const float* s = sp + (t * blocks + k / block) * TILE;
        const int64_t o = (t - first) * TILE;
#if defined(__AVX512F__)
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
        amber::put16(row + o, _mm512_mul_ps(w, _mm512_loadu_ps(s)));
#else
        for (int64_t j = 0; j < TILE; ++j) amber::put(row + o + j, static_cast<float>(q[j]) * s[j]);
#endif
      }
    }
  });
}

// x (rows, in) -> (rows, out) by GEMMs on the weights widened per call (dense.h), in fp32 or bf16
at::Tensor int8_mm_dense(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, int64_t block, bool fp32) {
  const int64_t tiles = q.size(0), in = q.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in, "q has ", in, " input columns, x has ", x.size(-1));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  TORCH_CHECK(block > 0 && block % 4 == 0 && in % block == 0, "block must be a multiple of 4 and divide in");
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  if (fp32)
    return amber::slices<float>(x, tiles, [&](int64_t a, int64_t b, float* out, int64_t width) {
      widen(qp, sp, in, block, a, b, out, width);
    });
  return amber::slices<uint16_t>(x, tiles, [&](int64_t a, int64_t b, uint16_t* out, int64_t width) {
    widen(qp, sp, in, block, a, b, out, width);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amber, m) {
  m.def("int8_mm(Tensor x, Tensor q, Tensor scales, int block) -> Tensor");
  m.def("int8_mm_dense(Tensor x, Tensor q, Tensor scales, int block, bool fp32) -> Tensor");
}

TORCH_LIBRARY_IMPL(amber, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int8_mm_dense", &int8_mm_dense);
}
