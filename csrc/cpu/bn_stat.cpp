// CPU twin of csrc/cuda/bn_stat.cu: per row (b, c) and split of `chunk` pixels, the shifted sums of segkd_math.h;
// the backward's g = a (x - mu) + c0 row by row. Rows and splits run in parallel (at::parallel_for), the pixels in
// SIMD lanes (contiguous for NCHW: a specialised unit-stride loop; channels-last is read in place with stride C).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>

#include "../ops.h"
#include "../segkd_math.h"
#include "convert.h"

namespace segkd {
namespace {

template <typename scalar_t, bool kUnit>
void sums(const at::Tensor& x, int64_t chunk, float* out) {
  const int64_t C = x.size(1), N = x.size(2) * x.size(3), R = x.size(0) * C, S = (N + chunk - 1) / chunk;
  const Bchw xs = bchw_strides(x);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  at::parallel_for(0, R * S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / S, split = job % S, p0 = split * chunk, n = std::min(chunk, N - p0);
      const scalar_t* row = xp + (r / C) * xs.b + (r % C) * xs.c;
      const float k = to_float(row[0]);
      float s1 = 0.0f, s2 = 0.0f;
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t i = 0; i < n; ++i) {
        ShiftedSums e{0.0f, 0.0f};
        shifted_add(e, load<scalar_t, kUnit>(row + p0 * xs.p, i, xs.p), k);
        s1 += e.s1;
        s2 += e.s2;
      }
      out[r * S + split] = s1;
      out[(R + r) * S + split] = s2;
    }
  });
}

template <typename scalar_t, bool kUnit>
void apply(const at::Tensor& x, const float* k, at::Tensor& g) {
  const int64_t C = x.size(1), N = x.size(2) * x.size(3), R = x.size(0) * C;
  const Bchw xs = bchw_strides(x), gs = bchw_strides(g);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* gp = g.data_ptr<scalar_t>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = xp + (r / C) * xs.b + (r % C) * xs.c;
      scalar_t* gr = gp + (r / C) * gs.b + (r % C) * gs.c;
      const float a = k[r], mu = k[R + r], c0 = k[2 * R + r];
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) {
        gr[kUnit ? i : i * gs.p] = from_float<scalar_t>(bn_stat_grad(a, mu, c0, load<scalar_t, kUnit>(xr, i, xs.p)));
      }
    }
  });
}

}  // namespace

void bn_stat_cpu(const at::Tensor& x, int64_t chunk, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 4 && chunk > 0, "segkd_cpp::bn_stat: x must be [B, C, H, W], chunk > 0");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat, "segkd_cpp::bn_stat: out must be dense fp32");
  if (x.numel() == 0) return;
  const bool unit = bchw_strides(x).p == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segkd_bn_stat_cpu", [&] {
    if (unit) {
      sums<scalar_t, true>(x, chunk, out.data_ptr<float>());
    } else {
      sums<scalar_t, false>(x, chunk, out.data_ptr<float>());
    }
  });
}

void bn_stat_apply_cpu(const at::Tensor& x, const at::Tensor& k, at::Tensor& g) {
  TORCH_CHECK(x.dim() == 4 && g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(),
              "segkd_cpp::bn_stat_apply: g must have x's shape and dtype");
  TORCH_CHECK(k.is_contiguous() && k.scalar_type() == at::kFloat, "segkd_cpp::bn_stat_apply: k must be dense fp32");
  const bool unit = bchw_strides(x).p == 1 && bchw_strides(g).p == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segkd_bn_stat_apply_cpu", [&] {
    if (unit) {
      apply<scalar_t, true>(x, k.data_ptr<float>(), g);
    } else {
      apply<scalar_t, false>(x, k.data_ptr<float>(), g);
    }
  });
}

}  // namespace segkd
