// 4-bit weight matmul on the CPU: y = x W^T with W in groups of `group` input columns (32 for
// Q4_0/Q4_1; any multiple of 4), w = (q - 8) * scale + zero, q in [0, 15] (Int4Linear's grid).
//
// Why a kernel: a decode step reads every weight once, so its speed is the bytes per second its
// matmuls stream. torch's CPU int4 kernel streamed ~8-9 GB/s over SmolLM2's layers on a 2-core
// Xeon whose cores read ~18 GB/s; this one keeps the weights packed all the way into registers,
// widens 16 nibbles at a time by a table lookup, and multiplies them by up to R rows at once (each
// weight read once per R rows): 3.1 ms against torch's 4.9 for one row through the 120 layers.
//
// Layout (paged_ops.int4_pack makes it from Int4Linear's q, scales and zeros):
//   packed  (out / 16, in / 2, 16) uint8: tile t, pair p, byte j = q[16t + j][2p] | q[16t + j][2p + 1] << 4
//   sz      (out / 16, in / group, 2, 16) bf16: per tile and group, 16 scales then 16 zeros
//   x       (rows, in) bf16, or fp32, which is rounded to bf16 first  ->  y (rows, out) bf16, or with
//           `wide` the same bf16 values widened to fp32 (for a caller that adds them to fp32 at once:
//           a decode step's residual stream and RoPE, where a cast per projection cost ~0.3 ms a step)
// Numerics, per row and output: per group, S1 = sum_k x_k q_k in four fp32 chains of fused
// multiply-adds (chain (p % 2, low or high nibble) of pair p, each in ascending k), S1 = (c0 + c1) +
// (c2 + c3), and S0 = sum_k x_k in ascending k; then acc = fma(S1, scale, acc) and acc = fma(S0,
// zero - 8 scale, acc), group after group; y = bf16(acc), rounded to nearest even. The order
// depends on nothing but the row, so a row's result is the same at any batch size and thread
// count, and AVX-512, AVX2 and the plain loops compute the same sums in the same order.
// Where the CPU has AVX-512 BF16 (Zen 4, Sapphire Rapids and later), S1 is summed by vdpbf16ps
// instead, a pair (2p, 2p + 1) at a time, in two chains (p % 2) of ascending p, S1 = c0 + c1:
// every product x_k q_k is exact in fp32 either way (8 + 4 significant bits), only the order of
// the fp32 additions differs, so results agree with the other paths to fp32 rounding of the sums
// (within the tests' bound), not bit for bit; the rest (S0, the scale and zero, bf16 rounding) is
// as above. Still a row's result depends on the row alone. Twice the multiply-adds per
// instruction: numResults 8 on a 2-core Zen 4 went from 2.85x to 2.47x the cost of 1.
// Where it also has AVX-512 VBMI (Zen 4, Ice Lake and later; not Cooper Lake), a nibble is widened
// to the bf16 of 16 + q (three cheap ops a pair, against five with the lookup), so S1 sums
// x_k (16 + q_k) and the zero takes 16 S0 back: acc = fma(S0, zero - 24 scale, acc). The products
// stay exact; the fp32 sums' terms are ~3x larger, so their rounding is too (measured on SmolLM2's
// shapes: 0.019% of outputs one bf16 step off the correctly rounded product, against 0.009% with
// the lookup). An int4 step of SmolLM2's 120 matmuls: 6.7 -> 6.3 ms at 8 rows, 2.9 -> 2.5 at 1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "dense.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <algorithm>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using amber::bf16_to_float;
using amber::TILE;  // outputs per tile

// Four partial sums per row and output within a group (a chain of dependent fused multiply-adds
// waits ~4 cycles a link: one chain would leave the core idle): chain (p % 2, low or high nibble)
// of pair p; at the group's end S1 = (c0 + c1) + (c2 + c3). Every path keeps this order.
// The - 8 is folded into the zero: acc += S1' scale + S0 (zero - 8 scale), S1' over q itself.
inline float offset(float scale, float zero) { return std::fmaf(-8.0f, scale, zero); }

// Rows [0, rows) of one tile: x (rows, in) fp32, sums (rows, groups) fp32 (S0 per group), out (rows, 16).
// The plain loops: the reference order every vector path keeps.
void tile_plain(const uint8_t* w, const uint16_t* sz, const float* x, const float* sums, int64_t rows, int64_t in,
                int64_t group, float* out) {
  const int64_t groups = in / group;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < TILE; ++j) {
      float acc = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int64_t p = g * group / 2; p < (g + 1) * group / 2; ++p) {
          const uint8_t b = w[p * TILE + j];
          float* chain = c + 2 * (p % 2);
          chain[0] = std::fmaf(static_cast<float>(b & 15), x[r * in + 2 * p], chain[0]);
          chain[1] = std::fmaf(static_cast<float>(b >> 4), x[r * in + 2 * p + 1], chain[1]);
        }
        const float scale = bf16_to_float(sz[g * 2 * TILE + j]), zero = bf16_to_float(sz[g * 2 * TILE + TILE + j]);
        acc = std::fmaf((c[0] + c[1]) + (c[2] + c[3]), scale, acc);
        acc = std::fmaf(sums[r * groups + g], offset(scale, zero), acc);
      }
      out[r * TILE + j] = acc;
    }
  }
}

// How far ahead the weights are asked for: each tile's bytes are one contiguous stretch, fresh from
// memory, and the hardware prefetcher stops at every 4 KB page.
constexpr int64_t AHEAD = 2048;
inline void prefetch_group(const uint8_t* w, int64_t bytes) {
#if defined(__AVX2__) || defined(__AVX512F__)
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(w) + AHEAD + b, _MM_HINT_T0);
#endif
}

#if defined(__AVX512F__)
inline __m512 widen16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(p))), 16));
}
#endif

#if defined(__AVX512BF16__)
// AVX-512 BF16: vdpbf16ps multiplies 16 pairs of bf16 and adds both products to 16 fp32 sums, twice
// the multiply-adds of an fp32 FMA per instruction, which is what bounds a step of several rows
// (numResults, a batch). A pair is one byte of the layout: a weight's two nibbles, widened to the
// bf16 of the integers 0-15 (exact) and multiplied by x's two bf16 values (exact products).
#define AMBER_INT4_R 8
constexpr int64_t R = AMBER_INT4_R;  // rows per pass over a tile: 3R accumulators + temporaries in 32 registers

template <int N>
void tile_rows(const uint8_t* w, const uint16_t* sz, const uint32_t* x, const float* sums, int64_t in, int64_t group,
               float* out) {
  const int64_t groups = in / group, pairs = in / 2;
  // bf16 of the integer a nibble stands for: in a lane's low half (the low nibble), in its high half
  const __m512i low = _mm512_setr_epi32(0, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0x4100, 0x4110,
                                        0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170);
  const __m512i high = _mm512_slli_epi32(low, 16);
  const uint32_t* xr[N];
  for (int r = 0; r < N; ++r) xr[r] = x + r * pairs;
  __m512 acc[N];
  for (int r = 0; r < N; ++r) acc[r] = _mm512_setzero_ps();
#if defined(__AVX512VBMI__)
  // Each byte (a pair's two nibbles) is copied by vpermb into the high bytes of both 16-bit halves
  // of its output's lane, each half is shifted right so that its nibble lands in mantissa bits 3-6,
  // and one ternary-logic op keeps those bits and sets bf16 16.0's: the halves are the bf16 of
  // 16 + q, exactly (three ops a pair, none of them a cross-lane permute of 32-bit values; the
  // lookup below takes five, three of them permutes). S1 is then sum_k x_k (16 + q_k) and the
  // 16 S0 it adds is taken back with the zero: acc += S1 scale + S0 (zero - 24 scale).
  __m512i spread[4];  // pair e of four loaded together (64 bytes) -> bytes 1 and 3 of each lane
  for (int e = 0; e < 4; ++e) {
    alignas(64) uint8_t idx[64];
    for (int j = 0; j < 16; ++j) idx[4 * j] = idx[4 * j + 1] = idx[4 * j + 2] = idx[4 * j + 3] = e * 16 + j;
    spread[e] = _mm512_load_si512(idx);
  }
  const __m512i counts = _mm512_set1_epi32(5 | 9 << 16), nibbles = _mm512_set1_epi32(0x00780078),
                sixteen = _mm512_set1_epi32(0x41804180);
  const float per_scale = -24.0f;  // shift = zero + per_scale * scale: the grid's 8, and the 16 S0
  auto decode = [&](__m512i bytes, int e) {
    return _mm512_ternarylogic_epi32(_mm512_srlv_epi16(_mm512_permutexvar_epi8(spread[e], bytes), counts), nibbles,
                                     sixteen, 0xEA);  // (a & b) | c
  };
#else
  const float per_scale = -8.0f;   // shift = zero + per_scale * scale, as offset() computes it
#endif
  for (int64_t g = 0; g < groups; ++g) {
    prefetch_group(w + g * group / 2 * TILE, group / 2 * TILE);
    __m512 c[N][2];
    for (int r = 0; r < N; ++r) c[r][0] = c[r][1] = _mm512_setzero_ps();
    int64_t p = g * group / 2;
    const int64_t stop = (g + 1) * group / 2;
#if defined(__AVX512VBMI__)
    for (; p + 4 <= stop; p += 4) {
      const __m512i bytes = _mm512_loadu_si512(w + p * TILE);
#pragma GCC unroll 4
      for (int e = 0; e < 4; ++e) {
        const __m512i q = decode(bytes, e);
#pragma GCC unroll 8
        for (int r = 0; r < N; ++r)
          c[r][e % 2] = _mm512_dpbf16_ps(c[r][e % 2], reinterpret_cast<__m512bh>(q),
                                         reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xr[r][p + e]))));
      }
    }
    if (p < stop) {  // two pairs left (a group of 4 mod 8 columns)
      const __m512i bytes = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p * TILE)));
#pragma GCC unroll 2
      for (int e = 0; e < 2; ++e) {
        const __m512i q = decode(bytes, e);
        for (int r = 0; r < N; ++r)
          c[r][e] = _mm512_dpbf16_ps(c[r][e], reinterpret_cast<__m512bh>(q),
                                     reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xr[r][p + e]))));
      }
    }
#else
    for (; p < stop; p += 2) {
#pragma GCC unroll 2
      for (int e = 0; e < 2; ++e) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (p + e) * TILE)));
        const __m512i q = _mm512_or_si512(_mm512_permutexvar_epi32(b, low),
                                          _mm512_permutexvar_epi32(_mm512_srli_epi32(b, 4), high));
#pragma GCC unroll 8
        for (int r = 0; r < N; ++r)
          c[r][e] = _mm512_dpbf16_ps(c[r][e], reinterpret_cast<__m512bh>(q),
                                     reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xr[r][p + e]))));
      }
    }
#endif
    const __m512 scale = widen16(sz + g * 2 * TILE);
    const __m512 shift = _mm512_fmadd_ps(_mm512_set1_ps(per_scale), scale, widen16(sz + g * 2 * TILE + TILE));
#pragma GCC unroll 8
    for (int r = 0; r < N; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_add_ps(c[r][0], c[r][1]), scale, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(sums[r * groups + g]), shift, acc[r]);
    }
  }
  for (int r = 0; r < N; ++r) _mm512_storeu_ps(out + r * TILE, acc[r]);
}
#define AMBER_INT4_SIMD 1
#define AMBER_INT4_PAIRS 1
#elif defined(__AVX512F__)
#define AMBER_INT4_R 4
constexpr int64_t R = AMBER_INT4_R;  // rows per pass over a tile: 5R accumulators + temporaries in 32 registers

template <int N>
void tile_rows(const uint8_t* w, const uint16_t* sz, const float* x, const float* sums, int64_t in, int64_t group,
               float* out) {
  const int64_t groups = in / group;
  // the 16 values a nibble stands for, looked up by the low 4 bits of each lane
  const __m512 values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const float* xr[N];
  for (int r = 0; r < N; ++r) xr[r] = x + r * in;
  __m512 acc[N];
  for (int r = 0; r < N; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    prefetch_group(w + g * group / 2 * TILE, group / 2 * TILE);
    __m512 c[N][4];
    for (int r = 0; r < N; ++r) c[r][0] = c[r][1] = c[r][2] = c[r][3] = _mm512_setzero_ps();
    for (int64_t p = g * group / 2; p < (g + 1) * group / 2; p += 2) {
#pragma GCC unroll 2
      for (int e = 0; e < 2; ++e) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (p + e) * TILE)));
        const __m512 lo = _mm512_permutexvar_ps(b, values);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), values);
#pragma GCC unroll 8
        for (int r = 0; r < N; ++r) {
          c[r][2 * e] = _mm512_fmadd_ps(lo, _mm512_set1_ps(xr[r][2 * (p + e)]), c[r][2 * e]);
          c[r][2 * e + 1] = _mm512_fmadd_ps(hi, _mm512_set1_ps(xr[r][2 * (p + e) + 1]), c[r][2 * e + 1]);
        }
      }
    }
    const __m512 scale = widen16(sz + g * 2 * TILE);
    const __m512 shift = _mm512_fmadd_ps(_mm512_set1_ps(-8.0f), scale, widen16(sz + g * 2 * TILE + TILE));
#pragma GCC unroll 8
    for (int r = 0; r < N; ++r) {
      const __m512 s1 = _mm512_add_ps(_mm512_add_ps(c[r][0], c[r][1]), _mm512_add_ps(c[r][2], c[r][3]));
      acc[r] = _mm512_fmadd_ps(s1, scale, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(sums[r * groups + g]), shift, acc[r]);
    }
  }
  for (int r = 0; r < N; ++r) _mm512_storeu_ps(out + r * TILE, acc[r]);
}
#define AMBER_INT4_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__)
#define AMBER_INT4_R 2
constexpr int64_t R = AMBER_INT4_R;  // 16 ymm registers: 5R accumulators (a half tile) + temporaries

inline __m256 widen8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(
      reinterpret_cast<const __m128i*>(p))), 16));
}

template <int N>
void tile_rows(const uint8_t* w, const uint16_t* sz, const float* x, const float* sums, int64_t in, int64_t group,
               float* out) {
  const int64_t groups = in / group;
  const __m256i low = _mm256_set1_epi32(15);
  const float* xr[N];
  for (int r = 0; r < N; ++r) xr[r] = x + r * in;
  for (int h = 0; h < 2; ++h) {  // the tile's two halves of 8 outputs, one after the other
    __m256 acc[N];
    for (int r = 0; r < N; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      if (h == 0) prefetch_group(w + g * group / 2 * TILE, group / 2 * TILE);
      __m256 c[N][4];
      for (int r = 0; r < N; ++r) c[r][0] = c[r][1] = c[r][2] = c[r][3] = _mm256_setzero_ps();
      for (int64_t p = g * group / 2; p < (g + 1) * group / 2; p += 2) {
#pragma GCC unroll 2
        for (int e = 0; e < 2; ++e) {
          const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
              reinterpret_cast<const __m128i*>(w + (p + e) * TILE + 8 * h)));
          const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, low));
          const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
#pragma GCC unroll 8
          for (int r = 0; r < N; ++r) {
            c[r][2 * e] = _mm256_fmadd_ps(lo, _mm256_set1_ps(xr[r][2 * (p + e)]), c[r][2 * e]);
            c[r][2 * e + 1] = _mm256_fmadd_ps(hi, _mm256_set1_ps(xr[r][2 * (p + e) + 1]), c[r][2 * e + 1]);
          }
        }
      }
      const __m256 scale = widen8(sz + g * 2 * TILE + 8 * h);
      const __m256 shift = _mm256_fmadd_ps(_mm256_set1_ps(-8.0f), scale, widen8(sz + g * 2 * TILE + TILE + 8 * h));
#pragma GCC unroll 8
      for (int r = 0; r < N; ++r) {
        const __m256 s1 = _mm256_add_ps(_mm256_add_ps(c[r][0], c[r][1]), _mm256_add_ps(c[r][2], c[r][3]));
        acc[r] = _mm256_fmadd_ps(s1, scale, acc[r]);
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(sums[r * groups + g]), shift, acc[r]);
      }
    }
    for (int r = 0; r < N; ++r) _mm256_storeu_ps(out + r * TILE + 8 * h, acc[r]);
  }
}
#define AMBER_INT4_SIMD 1
#endif

#if defined(AMBER_INT4_PAIRS)
using XValue = uint32_t;  // x as bf16 pairs: x[2p] in the low half of pair p, x[2p + 1] in the high
constexpr int64_t X_PER_VALUE = 2;
#else
using XValue = float;
constexpr int64_t X_PER_VALUE = 1;
#endif

// rows [0, rows) of one tile, R at a time
void tile(const uint8_t* w, const uint16_t* sz, const XValue* x, const float* sums, int64_t rows, int64_t in,
          int64_t group, float* out) {
#if defined(AMBER_INT4_SIMD)
  const int64_t groups = in / group, stride = in / X_PER_VALUE;
  int64_t r = 0;
  for (; r + R <= rows; r += R) tile_rows<R>(w, sz, x + r * stride, sums + r * groups, in, group, out + r * TILE);
  switch (rows - r) {
#define AMBER_REST(n) case n: return tile_rows<n>(w, sz, x + r * stride, sums + r * groups, in, group, out + r * TILE);
    AMBER_REST(1)
#if AMBER_INT4_R > 2
    AMBER_REST(2) AMBER_REST(3)
#endif
#if AMBER_INT4_R > 4
    AMBER_REST(4) AMBER_REST(5) AMBER_REST(6) AMBER_REST(7)
#endif
#undef AMBER_REST
    default: return;
  }
#else
  tile_plain(w, sz, x, sums, rows, in, group, out);
#endif
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz, int64_t group, bool wide) {
  TORCH_CHECK(x.dim() == 2, "x must be (rows, in)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
              packed.size(2) == TILE, "packed must be contiguous (out / 16, in / 2, 16) uint8");
  const int64_t rows = x.size(0), in = x.size(1), tiles = packed.size(0);
  TORCH_CHECK(group > 0 && group % 4 == 0 && in % group == 0, "group must be a multiple of 4 and divide in");
  TORCH_CHECK(packed.size(1) * 2 == in, "packed holds ", packed.size(1) * 2, " input columns, x has ", in);
  TORCH_CHECK(sz.dim() == 4 && sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.size(0) == tiles &&
              sz.size(1) == in / group && sz.size(2) == 2 && sz.size(3) == TILE,
              "sz must be contiguous (out / 16, in / group, 2, 16) bf16");
  const int64_t groups = in / group;
  // x widened to fp32 and its per-group sums S0, in buffers kept for the thread (a decode step
  // makes ~120 of these calls: an allocation each would cost more than a small layer's work)
  thread_local std::vector<float> xbuf, sbuf;
  xbuf.resize(rows * in);
  sbuf.resize(rows * groups);
  float* xp = xbuf.data();
  float* sp = sbuf.data();
  if (x.scalar_type() == at::kFloat) {  // rounded to bf16 here, as torch's kernel takes it, not by a cast op before
    at::Tensor xc = x.contiguous();
    const float* src = xc.data_ptr<float>();
    for (int64_t i = 0; i < rows * in; ++i) xp[i] = bf16_to_float(c10::BFloat16(src[i]).x);
  } else {
    at::Tensor xc = x.contiguous();
    const uint16_t* src = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
    for (int64_t i = 0; i < rows * in; ++i) xp[i] = bf16_to_float(src[i]);
  }
  for (int64_t r = 0; r < rows; ++r)  // S0 of each row and group, in ascending k
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.0f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += xp[r * in + k];
      sp[r * groups + g] = s;
    }
#if defined(AMBER_INT4_PAIRS)
  thread_local std::vector<uint32_t> pbuf;  // x's bf16 values two by two, as vdpbf16ps takes them
  pbuf.resize(rows * in / 2);
  for (int64_t i = 0; i < rows * in / 2; ++i) {
    uint32_t a, b;
    std::memcpy(&a, xp + 2 * i, 4);
    std::memcpy(&b, xp + 2 * i + 1, 4);
    pbuf[i] = (a >> 16) | (b & 0xFFFF0000u);
  }
  const XValue* xin = pbuf.data();
#else
  const XValue* xin = xp;
#endif
  const int64_t stride = in / X_PER_VALUE;
  at::Tensor y = at::empty({rows, tiles * TILE}, x.options().dtype(wide ? at::kFloat : at::kBFloat16));
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  at::BFloat16* yp = wide ? nullptr : y.data_ptr<at::BFloat16>();
  float* wyp = wide ? y.data_ptr<float>() : nullptr;
  const int64_t width = tiles * TILE;
  at::parallel_for(0, tiles, 1, [&](int64_t first, int64_t last) {
    constexpr int64_t CHUNK = 64;  // rows per call of `tile`: its output stays on the stack
    float out[CHUNK * TILE];
    for (int64_t t = first; t < last; ++t) {
      for (int64_t r0 = 0; r0 < rows; r0 += CHUNK) {
        const int64_t n = std::min(CHUNK, rows - r0);
        tile(wp + t * (in / 2) * TILE, zp + t * groups * 2 * TILE, xin + r0 * stride, sp + r0 * groups, n, in, group, out);
        for (int64_t r = 0; r < n; ++r)
          for (int64_t j = 0; j < TILE; ++j) {
            const c10::BFloat16 v(out[r * TILE + j]);
            if (wide)
              wyp[(r0 + r) * width + t * TILE + j] = static_cast<float>(v);
            else
              yp[(r0 + r) * width + t * TILE + j] = v;
          }
      }
    }
  });
  return y;
}

// W^T rows for the outputs of tiles [first, last) into out (in, width): each weight q scale +
// (zero - 8 scale) in fp32 (a product, then a sum: two roundings, as Int4Linear's bf16 copy and
// this kernel's product by the identity), stored as T (fp32, or bf16 rounded to nearest even).
// Row after row of W^T (a pair of input columns at a time, every tile of the slice), so that each
// row is written in one sweep: tile after tile would write 32-byte strips a row apart.
template <typename T>
void widen(const uint8_t* wp, const uint16_t* zp, int64_t in, int64_t group, int64_t first, int64_t last, T* out,
           int64_t width) {
  const int64_t groups = in / group;
  at::parallel_for(0, in / 2, 8, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t g = 2 * p / group;
      T* lo = out + (2 * p) * width;
      T* hi = out + (2 * p + 1) * width;
      for (int64_t t = first; t < last; ++t) {
        const uint8_t* w = wp + (t * (in / 2) + p) * TILE;
        const uint16_t* s = zp + (t * groups + g) * 2 * TILE;
        const int64_t o = (t - first) * TILE;
#if defined(__AVX512F__)
        const __m512 values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 scale = widen16(s);
        const __m512 shift = _mm512_sub_ps(widen16(s + TILE), _mm512_mul_ps(_mm512_set1_ps(8.0f), scale));
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
        amber::put16(lo + o, _mm512_add_ps(_mm512_mul_ps(_mm512_permutexvar_ps(b, values), scale), shift));
        amber::put16(hi + o, _mm512_add_ps(_mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), values), scale),
                                           shift));
#else
        for (int64_t j = 0; j < TILE; ++j) {
          const float scale = bf16_to_float(s[j]);
          const float shift = bf16_to_float(s[TILE + j]) - 8.0f * scale;
          amber::put(lo + o + j, static_cast<float>(w[j] & 15) * scale + shift);
          amber::put(hi + o + j, static_cast<float>(w[j] >> 4) * scale + shift);
        }
#endif
      }
    }
  });
}

// x (rows, in) -> (rows, out) by GEMMs on the weights widened per call (dense.h), in fp32 or bf16
at::Tensor int4_mm_dense(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz, int64_t group,
                         bool fp32) {
  const int64_t tiles = packed.size(0), in = packed.size(1) * 2;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in, "packed holds ", in, " input columns, x has ", x.size(-1));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  TORCH_CHECK(group > 0 && group % 4 == 0 && in % group == 0, "group must be a multiple of 4 and divide in");
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  if (fp32)
    return amber::slices<float>(x, tiles, [&](int64_t a, int64_t b, float* out, int64_t width) {
      widen(wp, zp, in, group, a, b, out, width);
    });
  return amber::slices<uint16_t>(x, tiles, [&](int64_t a, int64_t b, uint16_t* out, int64_t width) {
    widen(wp, zp, in, group, a, b, out, width);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amber, m) {
  m.def("int4_mm(Tensor x, Tensor packed, Tensor sz, int group, bool wide=False) -> Tensor");
  m.def("int4_mm_dense(Tensor x, Tensor packed, Tensor sz, int group, bool fp32) -> Tensor");
}

TORCH_LIBRARY_IMPL(amber, CPU, m) {
  m.impl("int4_mm", &int4_mm);
  m.impl("int4_mm_dense", &int4_mm_dense);
}
