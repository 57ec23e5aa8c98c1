// RMSNorm of fp32 rows, alone or after the residual add that precedes it in every decoder layer.
//
// Why an op: in a decode step a norm is a few hundred values, and torch runs it as several ops
// (pow, mean, add, rsqrt, two muls; or the one-row layer_norm trick in llama_decode.rms_norm), each
// costing more in dispatch than its arithmetic, 61 times a step, plus the residual add before it.
// llama.RMSNorm runs this op too whenever it runs (fp32 rows on the CPU with the library loaded),
// so forward() and the scripted decode step compute the same norms bit for bit.
//
//   rms_norm(x, weight, eps) -> y            x (..., n) fp32; weight (n,) fp32
//   add_rms_norm(x, delta, weight, eps) -> (x + delta, rms_norm(x + delta))   x, delta (rows, n) fp32
//
// Numerics, per row, Hugging Face's LlamaRMSNorm in fp32: the mean of squares summed in 16 fp32
// lanes (lane j takes elements j, j + 16, ...) folded in a fixed tree, then the tail; r = 1 /
// sqrt(mean + eps); y = (x * r) * weight, each product rounded. The order depends on n alone, not
// on the build target, the batch or the threads. add_rms_norm's sum is one fp32 add per element,
// what torch's `x + delta` gives.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

constexpr int LANES = 16;

inline float mean_square(const float* x, int64_t n) {
  float lanes[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int j = 0; j < LANES; ++j) lanes[j] += x[i + j] * x[i + j];
  for (int width = LANES / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  float total = lanes[0];
  for (; i < n; ++i) total += x[i] * x[i];
  return total / static_cast<float>(n);
}

inline void normalize(const float* x, const float* weight, float* y, int64_t n, float eps) {
  const float r = 1.f / std::sqrt(mean_square(x, n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] * r) * weight[i];
}

void check(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "rms_norm: x and weight must be float32");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight must be (n,) for x (..., n)");
}

// rows of n apart: enough per task that a task is worth starting
constexpr int64_t GRAIN = 16;

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check(x, weight);
  at::Tensor xc = x.contiguous(), w = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t n = xc.size(-1), rows = n > 0 ? xc.numel() / n : 0;
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, GRAIN, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) normalize(xp + r * n, wp, yp + r * n, n, e);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight,
                                                double eps) {
  check(x, weight);
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.scalar_type() == at::kFloat,
              "add_rms_norm: delta must be float32 and shaped as x");
  at::Tensor xc = x.contiguous(), dc = delta.contiguous(), w = weight.contiguous();
  at::Tensor sum = at::empty_like(xc), y = at::empty_like(xc);
  const int64_t n = xc.size(-1), rows = n > 0 ? xc.numel() / n : 0;
  const float* xp = xc.data_ptr<float>();
  const float* dp = dc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, GRAIN, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      float* s = sp + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) s[i] = xp[r * n + i] + dp[r * n + i];
      normalize(s, wp, yp + r * n, n, e);
    }
  });
  return {sum, y};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amber, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(amber, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
}
