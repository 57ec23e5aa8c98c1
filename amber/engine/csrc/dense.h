// A big batch's product with packed weights, without a resident dense copy of them: the weights
// are widened (bf16 or fp32) a slice of outputs at a time into a scratch buffer kept by the thread,
// and each slice is multiplied by one GEMM (oneDNN's: AMX or AVX-512 BF16 where the CPU has them).
// The slices are as wide as fit SCRATCH_BYTES: a layer of SmolLM2 is one slice, its LM head 16.
// Shared by int4_mm.cpp and int8_mm.cpp; each supplies `fill`, which widens its own layout.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace amber {

constexpr int64_t TILE = 16;                       // outputs per tile, in both layouts
constexpr int64_t SCRATCH_BYTES = 8 * 1024 * 1024;  // widened weights per GEMM, at most

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float v) {  // round to nearest even (weights: no NaNs)
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

inline void put(float* dst, float v) { *dst = v; }
inline void put(uint16_t* dst, float v) { *dst = float_to_bf16(v); }

#if defined(__AVX512F__)
inline void put16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }
inline void put16(uint16_t* dst, __m512 v) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#else
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)),
      _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(rounded));
#endif
}
#endif

// y (rows, 16 tiles) = x W^T, W^T widened by fill(first_tile, last_tile, out, width) into out
// (in, width) row-major, width = 16 (last - first), of T (float or uint16_t: bf16). The GEMM runs
// in T and y comes out in T, but in bf16 for bf16 x: what quantize.dense_product gives with a
// resident copy of that dtype.
template <typename T, typename Fill>
at::Tensor slices(const at::Tensor& x, int64_t tiles, Fill fill) {
  const int64_t in = x.size(1), width = tiles * TILE;
  const auto dtype = sizeof(T) == 4 ? at::kFloat : at::kBFloat16;
  const at::Tensor xs = x.to(dtype).contiguous();
  at::Tensor y = at::empty({x.size(0), width}, xs.options());
  const int64_t step = std::max<int64_t>(1, std::min(tiles, SCRATCH_BYTES / (in * TILE * static_cast<int64_t>(sizeof(T)))));
  // kept for the thread: a fresh buffer of this size would fault in every page of it, each call
  thread_local std::vector<T> scratch;
  if (static_cast<int64_t>(scratch.size()) < in * step * TILE) scratch.resize(in * step * TILE);
  for (int64_t t = 0; t < tiles; t += step) {
    const int64_t n = std::min(step, tiles - t);
    fill(t, t + n, scratch.data(), n * TILE);
    at::Tensor wt = at::from_blob(scratch.data(), {in, n * TILE}, xs.options());
    if (n == tiles) {
      at::mm_out(y, xs, wt);
    } else {
      at::Tensor part = y.narrow(1, t * TILE, n * TILE);
      at::mm_out(part, xs, wt);
    }
  }
  return dtype == at::kFloat && x.scalar_type() == at::kBFloat16 ? y.to(at::kBFloat16) : y;
}

}  // namespace amber
