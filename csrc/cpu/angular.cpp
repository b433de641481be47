// CPU twin of csrc/cuda/angular.cu: the three sums of each group (a sample, a (b, c) row or a (b, p) pixel) and the
// gradient g = k1 s - k2 t, with the per-element math of segkd_math.h. Rows run in parallel (at::parallel_for), the
// pixels of a run of one channel in SIMD lanes (contiguous for NCHW: a specialised unit-stride loop).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>

#include "../ops.h"
#include "../segkd_math.h"
#include "convert.h"

namespace segkd {
namespace {

constexpr int64_t kTile = 64;  // pixels per task of the point mode

// Sums of a run of n pixels of one channel, in SIMD lanes (an OpenMP reduction: a fixed order for a given build).
template <typename scalar_t, bool kUnit>
AngularSums run_sums(const scalar_t* s, const scalar_t* t, int64_t n, int64_t s_p, int64_t t_p) {
  float a = 0.0f, b = 0.0f, c = 0.0f;
#pragma omp simd reduction(+ : a, b, c)
  for (int64_t i = 0; i < n; ++i) {
    AngularSums e{0.0f, 0.0f, 0.0f};
    angular_add(e, load<scalar_t, kUnit>(s, i, s_p), load<scalar_t, kUnit>(t, i, t_p));
    a += e.ss;
    b += e.tt;
    c += e.st;
  }
  return {a, b, c};
}

template <typename scalar_t, bool kUnit>
void stats(const at::Tensor& s, const at::Tensor& t, int64_t mode, int64_t chunk, float* out) {
  const int64_t B = s.size(0), C = s.size(1), HW = s.size(2) * s.size(3);
  const Bchw ss = bchw_strides(s), ts = bchw_strides(t);
  const scalar_t* sp = s.data_ptr<scalar_t>();
  const scalar_t* tp = t.data_ptr<scalar_t>();
  if (mode == 2) {  // point: one group per pixel, its elements along the channels
    const int64_t G = B * HW, tiles = (HW + kTile - 1) / kTile;
    at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
      float a[kTile], b[kTile], c[kTile];
      for (int64_t job = begin; job < end; ++job) {
        const int64_t bi = job / tiles, p0 = (job % tiles) * kTile, n = std::min(kTile, HW - p0);
        std::fill(a, a + n, 0.0f);
        std::fill(b, b + n, 0.0f);
        std::fill(c, c + n, 0.0f);
        for (int64_t ci = 0; ci < C; ++ci) {
          const scalar_t* sr = sp + bi * ss.b + ci * ss.c + p0 * ss.p;
          const scalar_t* tr = tp + bi * ts.b + ci * ts.c + p0 * ts.p;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            AngularSums e{a[i], b[i], c[i]};
            angular_add(e, load<scalar_t, kUnit>(sr, i, ss.p), load<scalar_t, kUnit>(tr, i, ts.p));
            a[i] = e.ss;
            b[i] = e.tt;
            c[i] = e.st;
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          const int64_t gi = bi * HW + p0 + i;
          out[gi] = a[i];
          out[G + gi] = b[i];
          out[2 * G + gi] = c[i];
        }
      }
    });
    return;
  }
  // layer (a group per sample, elements (c, p)) or channel (a group per (b, c) row, elements p), in splits
  const int64_t rows = mode == 0 ? B : B * C, L = mode == 0 ? C * HW : HW, S = (L + chunk - 1) / chunk;
  at::parallel_for(0, rows * S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / S, split = job % S, e1 = std::min((split + 1) * chunk, L);
      const int64_t bi = mode == 0 ? r : r / C;
      AngularSums acc{0.0f, 0.0f, 0.0f};
      for (int64_t e = split * chunk; e < e1;) {  // runs of consecutive pixels of one channel
        const int64_t ci = mode == 0 ? e / HW : r % C, p0 = mode == 0 ? e % HW : e;
        const int64_t n = std::min(HW - p0, e1 - e);
        const AngularSums run = run_sums<scalar_t, kUnit>(sp + bi * ss.b + ci * ss.c + p0 * ss.p,
                                                          tp + bi * ts.b + ci * ts.c + p0 * ts.p, n, ss.p, ts.p);
        acc.ss += run.ss;
        acc.tt += run.tt;
        acc.st += run.st;
        e += n;
      }
      out[r * S + split] = acc.ss;
      out[(rows + r) * S + split] = acc.tt;
      out[(2 * rows + r) * S + split] = acc.st;
    }
  });
}

template <typename scalar_t, bool kUnit>
void apply(const at::Tensor& s, const at::Tensor& t, const float* k, int64_t mode, at::Tensor& g) {
  const int64_t B = s.size(0), C = s.size(1), HW = s.size(2) * s.size(3);
  const int64_t G = mode == 0 ? B : (mode == 1 ? B * C : B * HW);
  const Bchw ss = bchw_strides(s), ts = bchw_strides(t), gs = bchw_strides(g);
  const scalar_t* sp = s.data_ptr<scalar_t>();
  const scalar_t* tp = t.data_ptr<scalar_t>();
  scalar_t* gp = g.data_ptr<scalar_t>();
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bi = row / C, ci = row % C;
      const scalar_t* sr = sp + bi * ss.b + ci * ss.c;
      const scalar_t* tr = tp + bi * ts.b + ci * ts.c;
      scalar_t* gr = gp + bi * gs.b + ci * gs.c;
      if (mode == 2) {  // one (k1, k2) per pixel
        const float *k1 = k + bi * HW, *k2 = k + G + bi * HW;
#pragma omp simd
        for (int64_t p = 0; p < HW; ++p) {
          gr[kUnit ? p : p * gs.p] = from_float<scalar_t>(
              angular_grad(k1[p], k2[p], load<scalar_t, kUnit>(sr, p, ss.p), load<scalar_t, kUnit>(tr, p, ts.p)));
        }
      } else {  // one (k1, k2) per sample or per row
        const int64_t gi = mode == 0 ? bi : row;
        const float k1 = k[gi], k2 = k[G + gi];
#pragma omp simd
        for (int64_t p = 0; p < HW; ++p) {
          gr[kUnit ? p : p * gs.p] = from_float<scalar_t>(
              angular_grad(k1, k2, load<scalar_t, kUnit>(sr, p, ss.p), load<scalar_t, kUnit>(tr, p, ts.p)));
        }
      }
    }
  });
}

void check(const at::Tensor& s, const at::Tensor& t, int64_t mode) {
  TORCH_CHECK(s.dim() == 4 && s.sizes() == t.sizes() && s.scalar_type() == t.scalar_type(),
              "segkd_cpp::angular: student and teacher must be [B, C, H, W] of one dtype");
  TORCH_CHECK(mode >= 0 && mode <= 2, "segkd_cpp::angular: mode must be 0 (layer), 1 (channel) or 2 (point)");
}

}  // namespace

void angular_stats_cpu(const at::Tensor& s, const at::Tensor& t, int64_t mode, int64_t chunk, at::Tensor& out) {
  check(s, t, mode);
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat && chunk > 0,
              "segkd_cpp::angular_stats: out must be dense fp32 [3, G, S], chunk > 0");
  const bool unit = bchw_strides(s).p == 1 && bchw_strides(t).p == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "segkd_angular_stats_cpu", [&] {
    if (unit) {
      stats<scalar_t, true>(s, t, mode, chunk, out.data_ptr<float>());
    } else {
      stats<scalar_t, false>(s, t, mode, chunk, out.data_ptr<float>());
    }
  });
}

void angular_apply_cpu(const at::Tensor& s, const at::Tensor& t, const at::Tensor& k, int64_t mode, at::Tensor& g) {
  check(s, t, mode);
  TORCH_CHECK(k.is_contiguous() && k.scalar_type() == at::kFloat, "segkd_cpp::angular_apply: k must be dense fp32");
  const bool unit = bchw_strides(s).p == 1 && bchw_strides(t).p == 1 && bchw_strides(g).p == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "segkd_angular_apply_cpu", [&] {
    if (unit) {
      apply<scalar_t, true>(s, t, k.data_ptr<float>(), mode, g);
    } else {
      apply<scalar_t, false>(s, t, k.data_ptr<float>(), mode, g);
    }
  });
}

}  // namespace segkd
