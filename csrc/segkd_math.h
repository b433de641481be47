// The per-element math of segkd's C++ kernels, shared by the CUDA kernels (csrc/cuda/) and their CPU twins
// (csrc/cpu/): each function is __host__ __device__ under nvcc and a plain inline function in the CPU build, so
// the arithmetic CI checks on the CPU is the arithmetic the GPU runs. Everything here is fp32, whatever the
// tensors' dtype (loads are converted to float before they reach these functions).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SEGKD_HD __host__ __device__ __forceinline__
#else
#define SEGKD_HD inline
#endif

namespace segkd {

// Start of a running max: the lowest finite float rather than -inf, so that the CPU build may use
// -ffast-math (finite-math-only) and exp(start - max) is exactly 0 for any finite max.
constexpr float kLowest = -FLT_MAX;

// ---- a softmax over one axis, in three passes: the max m of x = z / T, the log of sum exp(x - m), then
// log p = x - m - log sum.
SEGKD_HD float max2(float a, float b) { return a > b ? a : b; }
SEGKD_HD float exp_shifted(float x, float m) { return expf(x - m); }
SEGKD_HD float log_prob(float x, float m, float log_sum) { return (x - m) - log_sum; }

// ---- the KD term of one element of two softmaxes. A softmax over an axis, after its first two passes:
struct Softmax {
  float m;        // max of x = z / T over the axis
  float log_sum;  // log of sum exp(x - m)
  float inv_sum;  // 1 / sum exp(x - m)
};

SEGKD_HD Softmax softmax_stats(float m, float sum) { return {m, logf(sum), 1.0f / sum}; }

// From x and e = exp_shifted(x, m) of the student (s) and the teacher (t): p = e / sum, log p = x - m - log sum,
// kl = p_t (log p_t - log p_s) and its derivative in x_s times `grad_scale`, grad_scale (p_s - p_t). The CPU
// twins keep e from the second pass; the CUDA kernels recompute it (the same expf of the same operands).
struct KdTerm {
  float kl;
  float grad;
};

SEGKD_HD KdTerm kd_term(float xs, float es, const Softmax& S, float xt, float et, const Softmax& T,
                        float grad_scale) {
  const float ps = es * S.inv_sum, pt = et * T.inv_sum;
  const float lps = log_prob(xs, S.m, S.log_sum), lpt = log_prob(xt, T.m, T.log_sum);
  return {pt * (lpt - lps), grad_scale * (ps - pt)};
}

// ---- angular distillation (kernels/angular.py): the three sums of a group of student / teacher elements, and
// the gradient dL/ds = k1 s - k2 t of one element, with k1, k2 the group's factors computed from those sums.
struct AngularSums {
  float ss, tt, st;
};

SEGKD_HD void angular_add(AngularSums& a, float s, float t) {
  a.ss += s * s;
  a.tt += t * t;
  a.st += s * t;
}

SEGKD_HD float angular_grad(float k1, float k2, float s, float t) { return k1 * s - k2 * t; }

// ---- BatchNorm statistic distance (kernels/bn_stat.py): sums of d = x - k and d^2 around a row's first value k
// (the shift keeps E[x^2] - E[x]^2 from cancelling), and the backward's dd/dx = a (x - mu) + c0.
struct ShiftedSums {
  float s1, s2;
};

SEGKD_HD void shifted_add(ShiftedSums& a, float x, float k) {
  const float d = x - k;
  a.s1 += d;
  a.s2 += d * d;
}

SEGKD_HD float bn_stat_grad(float a, float mu, float c0, float x) { return a * (x - mu) + c0; }

// ---- masked average pooling (kernels/masked_avg_pool.py): whether a label counts (inside [0, K), not ignored),
// and the gradient of a pixel: its class's prototype gradient, 0 where it does not count.
SEGKD_HD bool counted_label(int64_t y, int64_t K, int64_t ignore_index) {
  return y >= 0 && y < K && y != ignore_index;
}

// ---- bilinear upsampling by PyTorch's align_corners=False rule (kernels/upsampled_ce.py): output index dst of an
// axis with scale = in/out reads src = max((dst + 0.5) * scale - 0.5, 0) between i0 = floor(src) and
// i1 = min(i0 + 1, in - 1), the upper one with weight src - i0.
struct Source {
  int64_t i0, i1;
  float w1;
};

SEGKD_HD Source bilinear_source(int64_t dst, float scale, int64_t n_in) {
  const float src = max2((static_cast<float>(dst) + 0.5f) * scale - 0.5f, 0.0f);
  const int64_t f = static_cast<int64_t>(src);  // src >= 0: truncation is floor
  const int64_t i0 = f < n_in - 1 ? f : n_in - 1;
  return {i0, i0 + 1 < n_in ? i0 + 1 : n_in - 1, src - static_cast<float>(i0)};
}

SEGKD_HD float bilinear(float x00, float x01, float x10, float x11, float wx, float wy) {
  return (1.0f - wy) * ((1.0f - wx) * x00 + wx * x01) + wy * ((1.0f - wx) * x10 + wx * x11);
}

// The output indices [first, last) whose stencil can reach the low-res indices [lo, lo + n) of an axis (inv =
// out/in): those whose lower neighbour lies in [lo - 1, lo + n - 1], from src = (dst + 0.5) * in/out - 0.5, widened
// by one on each side against rounding (an index of the range that reaches nothing gets zero weight).
SEGKD_HD void reaching(int64_t lo, int64_t n, float inv, int64_t n_out, int64_t& first, int64_t& last) {
  const int64_t a = static_cast<int64_t>(floorf((static_cast<float>(lo) - 0.5f) * inv - 0.5f)) - 1;
  const int64_t z = static_cast<int64_t>(ceilf((static_cast<float>(lo + n) + 0.5f) * inv - 0.5f)) + 1;
  first = lo >= 2 && a > 0 ? a : 0;
  last = z < n_out ? z : n_out;
}

// ---- cross-entropy of one pixel from its log-sum-exp lse = m + log(sum exp(z - m)): the loss lse - z_y, and
// dL/dz_k = (softmax_k - [k == y]) * g (g: grad_output / |V| on valid pixels, 0 elsewhere).
SEGKD_HD float log_sum_exp(float m, float sum) { return m + logf(sum); }

SEGKD_HD float ce_grad(float z, float lse, bool target, float g) {
  return (expf(z - lse) - (target ? 1.0f : 0.0f)) * g;
}

// ---- pair-wise similarity (kernels/pairwise.py): a feature normalised as it is loaded, f = x r with
// r = 1 / max(||x||, eps) per pixel; the Gram products accumulate a * b over the pixels (or channels) in order; and
// the backward through the normalisation, dL/dx = scale * (dF - f <f, dF>_C) r.
SEGKD_HD float normalised(float x, float r) { return x * r; }

SEGKD_HD float unnormalised_grad(float df, float f, float proj, float r, float scale) {
  return (df - f * proj) * r * scale;
}

// ---- the in-place gradient scaling of backward (kernels/_grad_scale.py): g * grad_output
SEGKD_HD float scaled_grad(float g, float grad_output) { return g * grad_output; }

}  // namespace segkd
