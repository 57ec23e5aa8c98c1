// Decode attention over a paged KV pool, on the CPU: one new query token per sequence attends to
// the keys and values its block table points at.
//
// Why a kernel: the pure-torch way (paged_ops.paged_decode_attention_reference) first gathers every
// row's keys and values into a padded contiguous copy, then runs SDPA on it, so each decode step
// writes and rereads the whole context once more than it needs to. Here each key/value row is read
// once, where it lies in the pool, for all the query heads that share it (GQA), and softmax is
// done online (one pass, rescaling the running sum per tile of positions).
//
// Layout (the pool's owner, kv_cache.py, writes it this way):
//   key_pool, value_pool  (num_slots, kv_heads, head_dim), contiguous; slot = block * block_size + t
//   q                     (batch, heads, head_dim); heads = kv_heads * group
//   block_tables          (batch, max_blocks) int32: logical block i of row b -> physical block
//   lengths               (batch,) int32: row b attends to positions [0, lengths[b])
//   window                0, or only the last `window` positions are visible (Hugging Face's rule)
// Numerics: everything in fp32 (bf16 values are widened exactly), max-subtracted softmax. A row
// with nothing to attend to (length 0) gets zeros. The output has q's dtype. With AVX-512 BF16, a
// bf16 q on a bf16 pool has its scores summed by vdpbf16ps from the same exact products and then
// scaled (attend_all): 32 rows x 560 positions of SmolLM2, 17.6 -> 14.0 ms a step (30 layers).
//
// Two paths, chosen when the library is built (-march=native): where the CPU has AVX-512 and the
// shapes allow (block_size 16, head_dim a multiple of 32, at most 8 query heads per kv head),
// attend_blocks works a block of 16 positions at a time in 512-bit registers; everywhere else
// attend_group, portable C++ that the compiler vectorises, works a position at a time. (The first is
// ~2.5x faster at SmolLM2's shapes; see its own comment for why.)
//
// Only ATen and the op registry are used, so the library is loaded with torch.ops.load_library and
// the op is callable from Python and from TorchScript alike.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// Widen one row of head_dim values to fp32 (a bf16 is the top half of an fp32's bits).
inline void widen(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

inline void widen(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t wide = static_cast<uint32_t>(bits[i]) << 16;
    float f;
    std::memcpy(&f, &wide, sizeof(f));
    dst[i] = f;
  }
}

// Partial sums in LANES independent lanes, folded in a tree at the end. 8 lanes (one 256-bit
// register, the width GCC prefers for -march=native on recent Xeons) measured ~1.7x faster than 16
// and ~2.3x faster than 4 on SmolLM2's shapes. (`omp simd reduction` also vectorises, but GCC folds
// its lanes one scalar add at a time through the stack, the largest share of the kernel's time.)
constexpr int LANES = 8;

// lanes[0] = the sum of all LANES, each step a fixed-size (so vectorised) half fold
inline void fold(float* lanes) {
  for (int j = 0; j < 4; ++j) lanes[j] += lanes[j + 4];
  for (int j = 0; j < 2; ++j) lanes[j] += lanes[j + 2];
  lanes[0] += lanes[1];
}

inline float dot(const float* a, const float* b, int64_t n) {
  float lanes[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int j = 0; j < LANES; ++j) lanes[j] += a[i + j] * b[i + j];
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  fold(lanes);
  return lanes[0] + tail;
}

inline float sum(const float* a, int64_t n) {
  float lanes[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int j = 0; j < LANES; ++j) lanes[j] += a[i + j];
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i];
  fold(lanes);
  return lanes[0] + tail;
}

// exp(x) for x <= 0 (a score minus the running max), inlined so the loop over a tile vectorises
// (libm's expf is a call per element): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor
// series to r^6 (relative error ~1e-7, float rounding), times 2^n built from the exponent bits.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // below, exp underflows fp32's normal range: treat as ~0 (and -inf too)
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two: exact n * hi
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

inline void scale_row(float alpha, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] *= alpha;
}

struct Shape {
  int64_t kv_heads, group, head_dim, block_size, max_blocks, num_blocks, window;
};

// A block's rows of one kv head are row_stride apart and blocks lie anywhere in the pool, a pattern
// the hardware prefetchers cannot guess at a block boundary. So while one block is computed on, the
// next block's key and value rows are requested.
template <typename scalar_t>
inline void prefetch_block(const scalar_t* keys, const scalar_t* values, int64_t block, int64_t kv_head,
                           int64_t count, const Shape& s) {
  if (block < 0 || block >= s.num_blocks) return;  // reported when it is reached
  const int64_t row_stride = s.kv_heads * s.head_dim, row_bytes = s.head_dim * sizeof(scalar_t);
  const int64_t base = block * s.block_size * row_stride + kv_head * s.head_dim;
  for (int64_t t = 0; t < count; ++t) {
    const char* k = reinterpret_cast<const char*>(keys + base + t * row_stride);
    const char* v = reinterpret_cast<const char*>(values + base + t * row_stride);
    for (int64_t line = 0; line < row_bytes; line += 64) {
      __builtin_prefetch(k + line);
      __builtin_prefetch(v + line);
    }
  }
}

// One (row, kv head): the `group` query heads q (group, head_dim), already multiplied by the
// softmax scale, attend to positions [begin, end) of the row; out (group, head_dim) in fp32.
// DIM > 0: head_dim known at compile time, so every loop over it is fully unrolled (the loops are
// only a few vectors long, and their set-up and remainder code would otherwise cost as much as the
// arithmetic); DIM == 0: any head_dim.
template <typename scalar_t, int DIM>
void attend_group(const scalar_t* keys, const scalar_t* values, const int32_t* table, const float* q,
                  float* out, int64_t kv_head, int64_t begin, int64_t end, const Shape& s) {
  const int64_t D = DIM > 0 ? DIM : s.head_dim, G = s.group, bs = s.block_size;
  const int64_t row_stride = s.kv_heads * D;  // between consecutive slots of the pool
  std::vector<float> acc(G * D, 0.f), row(D), scores(G * bs);
  std::vector<float> running_max(G, -std::numeric_limits<float>::infinity()), running_sum(G, 0.f);

  // one tile = the positions of one block that fall in [begin, end): consecutive slots
  for (int64_t tile = begin; tile < end;) {
    const int64_t logical = tile / bs, first = tile % bs;
    const int64_t count = std::min(bs - first, end - tile);
    const int64_t block = table[logical];
    TORCH_CHECK(block >= 0 && block < s.num_blocks, "paged_decode_attention: block table entry ", block,
                " out of range [0, ", s.num_blocks, ")");
    const int64_t base = (block * bs + first) * row_stride + kv_head * D;
    if (tile + count < end)
      prefetch_block(keys, values, table[logical + 1], kv_head, std::min(bs, end - tile - count), s);

    for (int64_t t = 0; t < count; ++t) {  // scores (group, count): each key row read once
      widen(keys + base + t * row_stride, row.data(), D);
      for (int64_t h = 0; h < G; ++h) scores[h * bs + t] = dot(q + h * D, row.data(), D);
    }
    for (int64_t h = 0; h < G; ++h) {  // online softmax: rescale what came before by exp(old - new max)
      float* sc = scores.data() + h * bs;
      float tile_max = *std::max_element(sc, sc + count);
      float new_max = std::max(running_max[h], tile_max);
      float correction = exp_nonpositive(running_max[h] - new_max);  // ~0 on the first tile (-inf)
#pragma omp simd
      for (int64_t t = 0; t < count; ++t) sc[t] = exp_nonpositive(sc[t] - new_max);
      running_sum[h] = running_sum[h] * correction + sum(sc, count);
      running_max[h] = new_max;
      if (correction != 1.f) scale_row(correction, acc.data() + h * D, D);
    }
    for (int64_t t = 0; t < count; ++t) {  // acc += p * v: each value row read once
      widen(values + base + t * row_stride, row.data(), D);
      for (int64_t h = 0; h < G; ++h) axpy(scores[h * bs + t], row.data(), acc.data() + h * D, D);
    }
    tile += count;
  }
  for (int64_t h = 0; h < G; ++h) {
    const float inv = running_sum[h] > 0.f ? 1.f / running_sum[h] : 0.f;  // length 0: zeros
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = acc[h * D + d] * inv;
  }
}


#if defined(__AVX512F__)
// ---- The AVX-512 path: block_size 16, head_dim a multiple of 32 (SmolLM2: 64) -------------------
// The portable path computes one score at a time (a dot product and its horizontal sum per
// position) and runs softmax on scalars; at SmolLM2's shapes that arithmetic, not memory, was the
// cost (~3x contiguous SDPA). Here one block of 16 positions is one 512-bit register of fp32 scores:
//   scores  per query head, 16 vectors of partial products q * k (one per position, head_dim / 16
//           FMAs each), reduced to one vector of 16 sums by a shuffle tree (reduce16: 45 shuffles and
//           adds for 16 sums, against ~5 per sum when each is folded on its own);
//   softmax max, exp (exp16: exp_nonpositive's polynomial on vectors) and the running sum all
//           lane-wise; the running sum stays a vector until the end;
//   values  acc[h] += p[h][t] * v[t], acc in registers while a block is added, p broadcast.
// Each of the three runs over all the group's query heads before the next starts: the heads' chains
// of dependent steps (scores -> max -> exp -> value sums) then overlap, where one head after
// another left the core waiting on latencies (~25% of the time).
// A bf16 block is widened into a local fp32 tile once, so the group's query heads reuse it from L1;
// an fp32 pool is read in place. Positions of the block outside [begin, end) are still computed on
// (their slots are in the pool) and then masked: scores to -inf, probabilities to 0, and their value
// rows never used (unused slots may hold anything, NaN included).
#include <immintrin.h>

constexpr int VEC = 16;  // fp32 lanes per register, and the block size this path takes
constexpr int MAX_GROUP = 8;  // query heads per kv head this path takes (state on the stack)
constexpr int MAX_KV = 4;     // kv heads one task takes at once (more: one task per kv head)

// out[t] = the sum of v[t]'s 16 lanes, for t < 16: pairs of vectors are interleaved and added, so
// each step halves the vectors and doubles the positions per vector.
inline __m512 reduce16(__m512* v) {
  __m512 w[8], u[4], z[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: one partial sum for each of 4 positions
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)  // 128-bit lanes added in pairs
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// exp_nonpositive on 16 lanes; 2^n applied by scalef
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// Rows of one block for one kv head: in place for fp32, widened into `tile` for bf16.
inline const float* block_rows(const float* src, int64_t row_stride, float* /*tile*/, int64_t* stride) {
  *stride = row_stride;
  return src;
}

// bf16 rows widened by halves of 32-bit lanes: a 512-bit load holds 32 values, the even ones in the
// low halves (shifted up: exact fp32) and the odd ones in the high halves (the low halves cleared).
// Two integer ops per 32 values, against two per 16 with a zero-extending shuffle that competes with
// the score reduction for the shuffle port (fewer instructions; no gain above this machine's noise
// on its own). The tile's rows come out in the
// order `widened_order` gives; q is permuted to match before the dot products (which do not care
// about order) and the output is permuted back after the value sums.
template <int DIM>
inline const float* block_rows(const at::BFloat16* src, int64_t row_stride, float* tile, int64_t* stride) {
  static_assert(DIM % 32 == 0, "bf16 rows are widened 32 values at a time");
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int t = 0; t < VEC; ++t)
    for (int c = 0; c < DIM; c += 32) {
      const __m512i pairs = _mm512_loadu_si512(src + t * row_stride + c);
      _mm512_store_si512(tile + t * DIM + c, _mm512_slli_epi32(pairs, 16));
      _mm512_store_si512(tile + t * DIM + c + VEC, _mm512_and_si512(pairs, high));
    }
  *stride = DIM;
  return tile;
}

// where the tile keeps value d of a row: block_rows' even/odd split for bf16, as is for fp32
template <typename scalar_t>
inline int64_t widened_order(int64_t d) {
  if constexpr (std::is_same_v<scalar_t, float>) return d;
  const int64_t c = d / 32 * 32, i = d % 32;
  return c + (i % 2) * VEC + i / 2;
}

template <typename scalar_t, int DIM>
inline const float* rows_of(const scalar_t* src, int64_t row_stride, float* tile, int64_t* stride) {
  if constexpr (std::is_same_v<scalar_t, float>)
    return block_rows(src, row_stride, tile, stride);
  else
    return block_rows<DIM>(src, row_stride, tile, stride);
}

// What one kv head carries from block to block, for its `group` query heads
template <int DIM>
struct HeadState {
  alignas(64) float q[MAX_GROUP * DIM];    // scaled q, in the tile's order
  alignas(64) uint16_t qb[MAX_GROUP * DIM];  // or (QB) q's bf16 values, unscaled, in their own order
  alignas(64) float acc[MAX_GROUP * DIM];  // sum of p * v so far, in the tile's order
  float scale;                             // QB: applied to each score
  __m512 running_max[MAX_GROUP];           // in every lane
  __m512 running_sum[MAX_GROUP];           // per lane, added up at the end
};

// One block (16 consecutive slots from `base`) for one kv head; `visible` marks the positions in
// [begin, end).
template <typename scalar_t, int DIM, bool QB>
inline void attend_block(const scalar_t* keys, const scalar_t* values, int64_t base, __mmask16 visible,
                         int64_t lo, int64_t hi, HeadState<DIM>& st, int64_t G, int64_t row_stride) {
  constexpr int C = DIM / VEC;  // registers per row
  alignas(64) float vtile[VEC * DIM], probs[MAX_GROUP][VEC];
  __m512 scores[MAX_GROUP], correction[MAX_GROUP];
  int64_t vstride;
  const float* v = rows_of<scalar_t, DIM>(values + base, row_stride, vtile, &vstride);
  // The three steps each run over all the group's heads, so that the heads' chains of dependent
  // operations (scores -> max -> exp -> value sums) overlap instead of running one after another.
#if defined(__AVX512BF16__)
  if constexpr (QB) {  // scores: bf16 pairs of q and of each key row, summed by vdpbf16ps, then scaled
    static_assert(std::is_same_v<scalar_t, at::BFloat16>, "QB reads bf16 keys");
    constexpr int P = DIM / 32;  // registers of bf16 pairs per row
    const scalar_t* k = keys + base;
    for (int64_t h = 0; h < G; ++h) {
      __m512i qh[P];
      __m512 partial[VEC];
      for (int c = 0; c < P; ++c) qh[c] = _mm512_load_si512(st.qb + h * DIM + c * 32);
      for (int t = 0; t < VEC; ++t) {
        __m512 sum = _mm512_setzero_ps();
        for (int c = 0; c < P; ++c)
          sum = _mm512_dpbf16_ps(sum, reinterpret_cast<__m512bh>(_mm512_loadu_si512(k + t * row_stride + c * 32)),
                                 reinterpret_cast<__m512bh>(qh[c]));
        partial[t] = sum;
      }
      scores[h] = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), visible,
                                     _mm512_mul_ps(reduce16(partial), _mm512_set1_ps(st.scale)));
    }
  } else
#endif
  {
    alignas(64) float ktile[VEC * DIM];
    int64_t kstride;
    const float* k = rows_of<scalar_t, DIM>(keys + base, row_stride, ktile, &kstride);
    for (int64_t h = 0; h < G; ++h) {  // scores: 16 vectors of partial products, reduced at once
      __m512 qh[C], partial[VEC];
      for (int c = 0; c < C; ++c) qh[c] = _mm512_load_ps(st.q + h * DIM + c * VEC);
      for (int t = 0; t < VEC; ++t) {
        __m512 sum = _mm512_mul_ps(qh[0], _mm512_loadu_ps(k + t * kstride));
        for (int c = 1; c < C; ++c) sum = _mm512_fmadd_ps(qh[c], _mm512_loadu_ps(k + t * kstride + c * VEC), sum);
        partial[t] = sum;
      }
      scores[h] = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), visible,
                                     reduce16(partial));
    }
  }
  for (int64_t h = 0; h < G; ++h) {  // online softmax: what came before is rescaled by exp(old - new max)
    const __m512 new_max = _mm512_max_ps(st.running_max[h], _mm512_set1_ps(_mm512_reduce_max_ps(scores[h])));
    correction[h] = exp16(_mm512_sub_ps(st.running_max[h], new_max));  // ~0 on the first block (-inf)
    st.running_max[h] = new_max;
    const __m512 p = _mm512_maskz_mov_ps(visible, exp16(_mm512_sub_ps(scores[h], new_max)));
    st.running_sum[h] = _mm512_fmadd_ps(st.running_sum[h], correction[h], p);
    _mm512_store_ps(probs[h], p);
  }
  for (int64_t h = 0; h < G; ++h) {  // acc[h] = acc[h] * correction + sum over visible t of p[t] * v[t]
    // (two sets of sums, even and odd positions, so that chains of 8 dependent FMAs run two at a
    // time rather than chains of 16 one at a time)
    float* acc = st.acc + h * DIM;
    __m512 a[C], b[C];
    for (int c = 0; c < C; ++c) {
      a[c] = _mm512_mul_ps(_mm512_load_ps(acc + c * VEC), correction[h]);
      b[c] = _mm512_setzero_ps();
    }
    int64_t t = lo;
    for (; t + 1 < hi; t += 2) {
      const __m512 pa = _mm512_set1_ps(probs[h][t]), pb = _mm512_set1_ps(probs[h][t + 1]);
      for (int c = 0; c < C; ++c) {
        a[c] = _mm512_fmadd_ps(pa, _mm512_loadu_ps(v + t * vstride + c * VEC), a[c]);
        b[c] = _mm512_fmadd_ps(pb, _mm512_loadu_ps(v + (t + 1) * vstride + c * VEC), b[c]);
      }
    }
    if (t < hi) {
      const __m512 pa = _mm512_set1_ps(probs[h][t]);
      for (int c = 0; c < C; ++c) a[c] = _mm512_fmadd_ps(pa, _mm512_loadu_ps(v + t * vstride + c * VEC), a[c]);
    }
    for (int c = 0; c < C; ++c) _mm512_store_ps(acc + c * VEC, _mm512_add_ps(a[c], b[c]));
  }
}

// attend_group's contract for kv heads [kv_first, kv_first + kv_count) of one row at once (q and out
// hold their query heads one after another), for block_size 16 and DIM % 32 == 0. Going block by
// block across all of a row's kv heads reads each block as one span of the pool (16 slots of all
// kv heads, consecutive) rather than kv_heads strided pieces: ~15% faster at batch 64, where the
// pools are far larger than the caches.
template <typename scalar_t, int DIM, bool QB>
void attend_blocks(const scalar_t* keys, const scalar_t* values, const int32_t* table, const float* q,
                   const uint16_t* qb, float scale, float* out, int64_t kv_first, int64_t kv_count, int64_t begin,
                   int64_t end, const Shape& s) {
  const int64_t G = s.group, row_stride = s.kv_heads * DIM;
  HeadState<DIM> states[MAX_KV];
  for (int64_t j = 0; j < kv_count; ++j) {
    HeadState<DIM>& st = states[j];
    st.scale = scale;
    for (int64_t h = 0; h < G; ++h) {
      st.running_max[h] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      st.running_sum[h] = _mm512_setzero_ps();
      for (int64_t d = 0; d < DIM; ++d) {
        if constexpr (QB)
          st.qb[h * DIM + d] = qb[(j * G + h) * DIM + d];
        else
          st.q[h * DIM + widened_order<scalar_t>(d)] = q[(j * G + h) * DIM + d];
        st.acc[h * DIM + d] = 0.f;
      }
    }
  }
  // the part of a block these kv heads occupy: from the first slot's first head to the last's last
  const int64_t span_bytes = ((VEC - 1) * row_stride + kv_count * DIM) * sizeof(scalar_t);
  const int64_t last_block = end > begin ? (end - 1) / VEC : -1;
  for (int64_t logical = begin / VEC; logical <= last_block; ++logical) {
    const int64_t block = table[logical];
    TORCH_CHECK(block >= 0 && block < s.num_blocks, "paged_decode_attention: block table entry ", block,
                " out of range [0, ", s.num_blocks, ")");
    if (logical < last_block) {  // the next block lies anywhere in the pool: request it now
      const int64_t next = table[logical + 1];
      if (next >= 0 && next < s.num_blocks) {  // (a bad entry is reported when it is reached)
        const int64_t first = next * VEC * row_stride + kv_first * DIM;
        const char* k = reinterpret_cast<const char*>(keys + first);
        const char* v = reinterpret_cast<const char*>(values + first);
        for (int64_t line = 0; line < span_bytes; line += 64) {
          __builtin_prefetch(k + line);
          __builtin_prefetch(v + line);
        }
      }
    }
    const int64_t lo = std::max<int64_t>(begin - logical * VEC, 0), hi = std::min<int64_t>(end - logical * VEC, VEC);
    const __mmask16 visible = static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
    for (int64_t j = 0; j < kv_count; ++j)
      attend_block<scalar_t, DIM, QB>(keys, values, block * VEC * row_stride + (kv_first + j) * DIM, visible, lo,
                                      hi, states[j], G, row_stride);
  }
  for (int64_t j = 0; j < kv_count; ++j)
    for (int64_t h = 0; h < G; ++h) {
      const float total = _mm512_reduce_add_ps(states[j].running_sum[h]);
      const float inv = total > 0.f ? 1.f / total : 0.f;  // length 0: zeros
      for (int64_t d = 0; d < DIM; ++d)
        out[(j * G + h) * DIM + d] = states[j].acc[h * DIM + widened_order<scalar_t>(d)] * inv;
    }
}
#endif  // __AVX512F__

template <typename scalar_t, int DIM>
void run(const at::Tensor& q, const uint16_t* qb, float scale, const at::Tensor& key_pool,
         const at::Tensor& value_pool, const at::Tensor& tables, const at::Tensor& lengths, at::Tensor& out,
         const Shape& s) {
  const int64_t batch = q.size(0), D = s.head_dim, G = s.group;
  const scalar_t* keys = key_pool.data_ptr<scalar_t>();
  const scalar_t* values = value_pool.data_ptr<scalar_t>();
  const float* qp = q.data_ptr<float>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lp = lengths.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
#if defined(__AVX512F__)
  constexpr bool wide = DIM > 0 && DIM % 32 == 0;
  const bool blocks = wide && s.block_size == VEC && G <= MAX_GROUP;
  // The block path takes all of a row's kv heads in one task when there are rows enough to keep
  // every thread busy (4 per thread); else one task per (row, kv head), as the portable path.
  // Either way each kv head's arithmetic is the same, so the results do not depend on the threads.
  const int64_t per_task =
      blocks && s.kv_heads <= MAX_KV && batch >= 4 * at::get_num_threads() ? s.kv_heads : 1;
#else
  const int64_t per_task = 1;
#endif
  // one task per (row, kv head) or per row: its query heads are consecutive in q and out
  at::parallel_for(0, batch * s.kv_heads / per_task, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task * per_task / s.kv_heads, kv_head = task * per_task % s.kv_heads;
      const int64_t end = lp[b];
      const int64_t begin = s.window > 0 ? std::max<int64_t>(0, end - s.window) : 0;
      const int64_t offset = (b * s.kv_heads + kv_head) * G * D;
#if defined(__AVX512F__)
      if constexpr (wide) {
        if (blocks) {
#if defined(__AVX512BF16__)
          if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
            if (qb != nullptr) {
              attend_blocks<scalar_t, DIM, true>(keys, values, tp + b * s.max_blocks, nullptr, qb + offset, scale,
                                                 op + offset, kv_head, per_task, begin, end, s);
              continue;
            }
          }
#endif
          attend_blocks<scalar_t, DIM, false>(keys, values, tp + b * s.max_blocks, qp + offset, nullptr, scale,
                                              op + offset, kv_head, per_task, begin, end, s);
          continue;
        }
      }
#endif
      attend_group<scalar_t, DIM>(keys, values, tp + b * s.max_blocks, qp + offset, op + offset, kv_head, begin,
                                  end, s);
    }
  });
}

template <typename scalar_t>
void dispatch_dim(const at::Tensor& q, const uint16_t* qb, float scale, const at::Tensor& key_pool,
                  const at::Tensor& value_pool, const at::Tensor& tables, const at::Tensor& lengths, at::Tensor& out,
                  const Shape& s) {
  switch (s.head_dim) {
    case 64: return run<scalar_t, 64>(q, qb, scale, key_pool, value_pool, tables, lengths, out, s);
    case 128: return run<scalar_t, 128>(q, qb, scale, key_pool, value_pool, tables, lengths, out, s);
    default: return run<scalar_t, 0>(q, qb, scale, key_pool, value_pool, tables, lengths, out, s);
  }
}

// The checks both ops make of the pools, block tables and lengths; the Shape they describe.
Shape check_pools(const at::Tensor& key_pool, const at::Tensor& value_pool, const at::Tensor& tables,
                  const at::Tensor& lens, int64_t batch, int64_t heads, int64_t head_dim, int64_t block_size,
                  int64_t window) {
  TORCH_CHECK(key_pool.dim() == 3 && key_pool.sizes() == value_pool.sizes(),
              "key_pool and value_pool must both be (num_slots, kv_heads, head_dim)");
  TORCH_CHECK(key_pool.scalar_type() == value_pool.scalar_type(), "key_pool and value_pool dtypes differ");
  TORCH_CHECK(key_pool.scalar_type() == at::kFloat || key_pool.scalar_type() == at::kBFloat16,
              "the pools must be float32 or bfloat16");
  TORCH_CHECK(key_pool.is_contiguous() && value_pool.is_contiguous(), "the pools must be contiguous");
  TORCH_CHECK(tables.dim() == 2 && tables.scalar_type() == at::kInt,
              "block_tables must be (batch, max_blocks) int32");
  TORCH_CHECK(lens.dim() == 1 && lens.scalar_type() == at::kInt, "lengths must be (batch,) int32");
  TORCH_CHECK(block_size > 0 && window >= 0, "block_size must be > 0 and window >= 0");
  const int64_t kv_heads = key_pool.size(1);
  TORCH_CHECK(key_pool.size(2) == head_dim, "q and the pools disagree on head_dim");
  TORCH_CHECK(heads % kv_heads == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(tables.size(0) == batch && lens.size(0) == batch, "block_tables and lengths need one row per q row");
  TORCH_CHECK(key_pool.size(0) % block_size == 0, "num_slots must be a multiple of block_size");
  const int64_t max_blocks = tables.size(1);
  const int32_t* lp = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(lp[b] >= 0 && lp[b] <= max_blocks * block_size, "lengths[", b, "] = ", lp[b],
                " does not fit the block table");
  return Shape{kv_heads, heads / kv_heads, head_dim, block_size, max_blocks, key_pool.size(0) / block_size, window};
}

// qf (batch, heads, head_dim) fp32, already scaled, attends; the output (batch, heads, head_dim) fp32.
// qb: the same q before scaling, as bf16 bits (a bf16 pool's q is rounded to bf16 first), or null;
// where the CPU has AVX-512 BF16 the block path takes it, and its scores are q . k summed by
// vdpbf16ps (exact products, fp32 sums) and then multiplied by `scale`: ~2x fewer instructions for
// the scores than widening the keys to fp32, and the same values to fp32 rounding of the sums.
at::Tensor attend_all(const at::Tensor& qf, const uint16_t* qb, double scale, const at::Tensor& key_pool,
                      const at::Tensor& value_pool, const at::Tensor& tables, const at::Tensor& lens, const Shape& s) {
  at::Tensor out = at::empty(qf.sizes(), qf.options());
  const float sc = static_cast<float>(scale);
  if (key_pool.scalar_type() == at::kFloat)
    dispatch_dim<float>(qf, nullptr, sc, key_pool, value_pool, tables, lens, out, s);
  else
    dispatch_dim<at::BFloat16>(qf, qb, sc, key_pool, value_pool, tables, lens, out, s);
  return out;
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& key_pool, const at::Tensor& value_pool,
                                  const at::Tensor& block_tables, const at::Tensor& lengths, int64_t block_size,
                                  double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3, "q must be (batch, heads, head_dim)");
  at::Tensor tables = block_tables.contiguous(), lens = lengths.contiguous();
  const Shape s = check_pools(key_pool, value_pool, tables, lens, q.size(0), q.size(1), q.size(2), block_size,
                              window);
  // scale folded into q once, so the inner loop is a plain dot product
  at::Tensor qf = (q.to(at::kFloat) * scale).contiguous();
  // a bf16 q on a bf16 pool: its bits for the vdpbf16ps scores
  at::Tensor qc = q.scalar_type() == at::kBFloat16 ? q.contiguous() : at::Tensor();
  const uint16_t* qb = qc.defined() ? reinterpret_cast<const uint16_t*>(qc.data_ptr<at::BFloat16>()) : nullptr;
  at::Tensor out = attend_all(qf, qb, scale, key_pool, value_pool, tables, lens, s);
  return out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type());
}

// ---- RoPE, the KV write and attention of a decode step, as one op ----------------------------------
// What llama_decode.py's decode step did in ~20 small ops per layer, at ~2-3 us of dispatch each
// (more than their arithmetic, for a few hundred values): rotate q and k (rotate-half RoPE), round
// q, k and v to the pool's dtype, write k and v at the rows' slots, attend. Each step is the same
// arithmetic as the torch ops it replaces (paged_ops.paged_rope_attention_reference), so the two
// agree bit for bit:
//   RoPE    x * cos + rotate_half(x) * sin, sin sign-folded (layers.apply_rope): x * cos rounded to
//           fp32, then rotated * sin added to it in one fused multiply-add, as torch.addcmul(x * cos,
//           rotated, sin) computes it on the CPU (its kernel fuses, on every path; measured);
//   round   to the pool's dtype, nearest even (c10::BFloat16's conversion, which Tensor.to uses);
//   q       widened back and multiplied by the scale (in fp32), as paged_decode_attention does.
template <typename scalar_t>
void rope_write(const float* qkv, const float* cos, const float* sin, scalar_t* keys, scalar_t* values,
                const int64_t* slots, float* qf, scalar_t* qr, int64_t batch, int64_t heads, int64_t kv_heads,
                int64_t D, int64_t num_slots, float scale) {
  const int64_t half = D / 2, width = (heads + 2 * kv_heads) * D;
  std::vector<float> rotated(D);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t slot = slots[b];
    TORCH_CHECK(slot >= 0 && slot < num_slots, "paged_rope_attention: write row ", slot, " out of range [0, ",
                num_slots, ")");
    const float* row = qkv + b * width;
    const float* c = cos + b * D;
    const float* sn = sin + b * D;
    for (int64_t h = 0; h < heads + kv_heads; ++h) {
      const float* x = row + h * D;
      for (int64_t d = 0; d < half; ++d) rotated[d] = std::fma(x[d + half], sn[d], x[d] * c[d]);
      for (int64_t d = half; d < D; ++d) rotated[d] = std::fma(x[d - half], sn[d], x[d] * c[d]);
      if (h < heads) {  // a query head: rounded as the pool's dtype (kept in qr, if given), widened, scaled
        float* q = qf + (b * heads + h) * D;
        scalar_t* kept = qr == nullptr ? nullptr : qr + (b * heads + h) * D;
        for (int64_t d = 0; d < D; ++d) {
          const scalar_t rounded = static_cast<scalar_t>(rotated[d]);
          q[d] = static_cast<float>(rounded) * scale;
          if (kept != nullptr) kept[d] = rounded;
        }
      } else {          // a key head, stored
        scalar_t* k = keys + (slot * kv_heads + h - heads) * D;
        for (int64_t d = 0; d < D; ++d) k[d] = static_cast<scalar_t>(rotated[d]);
      }
    }
    const float* v = row + (heads + kv_heads) * D;
    scalar_t* dst = values + slot * kv_heads * D;
    for (int64_t i = 0; i < kv_heads * D; ++i) dst[i] = static_cast<scalar_t>(v[i]);
  }
}

at::Tensor paged_rope_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                const at::Tensor& key_pool, const at::Tensor& value_pool,
                                const at::Tensor& write_rows, const at::Tensor& block_tables,
                                const at::Tensor& lengths, int64_t block_size, int64_t heads, double scale,
                                int64_t window) {
  at::Tensor tables = block_tables.contiguous(), lens = lengths.contiguous();
  TORCH_CHECK(lens.dim() == 1, "lengths must be (batch,) int32");
  const int64_t batch = lens.size(0);
  TORCH_CHECK(key_pool.dim() == 3, "key_pool must be (num_slots, kv_heads, head_dim)");
  const int64_t kv_heads = key_pool.size(1), D = key_pool.size(2);
  const Shape s = check_pools(key_pool, value_pool, tables, lens, batch, heads, D, block_size, window);
  TORCH_CHECK(D % 2 == 0, "rotate-half RoPE needs an even head_dim");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "qkv, cos and sin must be float32");
  TORCH_CHECK(qkv.numel() == batch * (heads + 2 * kv_heads) * D,
              "qkv must hold (batch, heads + 2 kv_heads, head_dim) values");
  TORCH_CHECK(cos.numel() == batch * D && sin.numel() == batch * D, "cos and sin must be (batch, head_dim)");
  TORCH_CHECK(write_rows.dim() == 1 && write_rows.size(0) == batch && write_rows.scalar_type() == at::kLong,
              "write_rows must be (batch,) int64");
  at::Tensor x = qkv.contiguous(), c = cos.contiguous(), sn = sin.contiguous(), slots = write_rows.contiguous();
  at::Tensor qf = at::empty({batch, heads, D}, qkv.options());
  at::Tensor qr;  // a bf16 pool's q rounded to bf16, for attend_all's vdpbf16ps scores
  const float sc = static_cast<float>(scale);
  const uint16_t* qb = nullptr;
  if (key_pool.scalar_type() == at::kFloat) {
    rope_write<float>(x.data_ptr<float>(), c.data_ptr<float>(), sn.data_ptr<float>(), key_pool.data_ptr<float>(),
                      value_pool.data_ptr<float>(), slots.data_ptr<int64_t>(), qf.data_ptr<float>(), nullptr, batch,
                      heads, kv_heads, D, key_pool.size(0), sc);
  } else {
    qr = at::empty({batch, heads, D}, qkv.options().dtype(at::kBFloat16));
    rope_write<at::BFloat16>(x.data_ptr<float>(), c.data_ptr<float>(), sn.data_ptr<float>(),
                             key_pool.data_ptr<at::BFloat16>(), value_pool.data_ptr<at::BFloat16>(),
                             slots.data_ptr<int64_t>(), qf.data_ptr<float>(), qr.data_ptr<at::BFloat16>(), batch,
                             heads, kv_heads, D, key_pool.size(0), sc);
    qb = reinterpret_cast<const uint16_t*>(qr.data_ptr<at::BFloat16>());
  }
  at::Tensor out = attend_all(qf, qb, scale, key_pool, value_pool, tables, lens, s).view({batch, heads * D});
  return key_pool.scalar_type() == at::kFloat ? out : out.to(key_pool.scalar_type());
}

}  // namespace

TORCH_LIBRARY(amber, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor key_pool, Tensor value_pool, Tensor block_tables, "
      "Tensor lengths, int block_size, float scale, int window) -> Tensor");
  m.def(
      "paged_rope_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) key_pool, Tensor(b!) value_pool, "
      "Tensor write_rows, Tensor block_tables, Tensor lengths, int block_size, int heads, float scale, "
      "int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(amber, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("paged_rope_attention", &paged_rope_attention);
}
