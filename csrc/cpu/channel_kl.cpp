// CPU twin of csrc/cuda/channel_kl.cu: one row (b, c) of H*W logits per task, three passes along it (max, sum of
// exp, KD terms) with the per-element math of segkd_math.h; rows run in parallel (at::parallel_for). A row of at
// most kCached elements keeps x = z / T and exp(x - max) in a per-thread buffer between the passes (two expf per
// element pair); a longer one recomputes them (four), as the CUDA kernel does. An NCHW row is contiguous (a
// specialised unit-stride loop, vectorised); a channels-last row is read in place with stride C.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "../segkd_math.h"
#include "convert.h"

namespace segkd {
namespace {

// Independent partial max / sum accumulators along a row (vector lanes), combined in a fixed order at the end of
// each pass: deterministic.
constexpr int64_t kLanes = 16;
constexpr int64_t kCached = 32768;  // 4 rows of floats: 512 KiB per thread at most

template <typename scalar_t, bool kUnit, bool kCache>
void channel_kl_row(const scalar_t* sr, const scalar_t* tr, scalar_t* gr, int64_t L, const Bchw& ss, const Bchw& ts,
                    const Bchw& gs, float inv_t, float grad_scale, float* xs, float* xt, float* es, float* et,
                    float* kl) {
  float ms[kLanes], mt[kLanes], zs[kLanes], zt[kLanes], acc[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) {
    ms[j] = mt[j] = kLowest;
    zs[j] = zt[j] = acc[j] = 0.0f;
  }
  for (int64_t i0 = 0; i0 < L; i0 += kLanes) {  // pass 1: max of x = z / T
    const int64_t n = std::min(kLanes, L - i0);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float a = load<scalar_t, kUnit>(sr, i0 + j, ss.p) * inv_t;
      const float b = load<scalar_t, kUnit>(tr, i0 + j, ts.p) * inv_t;
      if (kCache) {
        xs[i0 + j] = a;
        xt[i0 + j] = b;
      }
      ms[j] = max2(ms[j], a);
      mt[j] = max2(mt[j], b);
    }
  }
  float m_s = kLowest, m_t = kLowest;
  for (int64_t j = 0; j < kLanes; ++j) {
    m_s = max2(m_s, ms[j]);
    m_t = max2(m_t, mt[j]);
  }
  for (int64_t i0 = 0; i0 < L; i0 += kLanes) {  // pass 2: e = exp(x - max) and its sum
    const int64_t n = std::min(kLanes, L - i0);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = i0 + j;
      const float a = exp_shifted(kCache ? xs[i] : load<scalar_t, kUnit>(sr, i, ss.p) * inv_t, m_s);
      const float b = exp_shifted(kCache ? xt[i] : load<scalar_t, kUnit>(tr, i, ts.p) * inv_t, m_t);
      if (kCache) {
        es[i] = a;
        et[i] = b;
      }
      zs[j] += a;
      zt[j] += b;
    }
  }
  float sum_s = 0.0f, sum_t = 0.0f;
  for (int64_t j = 0; j < kLanes; ++j) {
    sum_s += zs[j];
    sum_t += zt[j];
  }
  const Softmax S = softmax_stats(m_s, sum_s), T = softmax_stats(m_t, sum_t);
  for (int64_t i0 = 0; i0 < L; i0 += kLanes) {  // pass 3: the KL along the row and, if asked, its gradient
    const int64_t n = std::min(kLanes, L - i0);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = i0 + j;
      const float a = kCache ? xs[i] : load<scalar_t, kUnit>(sr, i, ss.p) * inv_t;
      const float b = kCache ? xt[i] : load<scalar_t, kUnit>(tr, i, ts.p) * inv_t;
      const KdTerm k = kd_term(a, kCache ? es[i] : exp_shifted(a, m_s), S, b, kCache ? et[i] : exp_shifted(b, m_t),
                               T, grad_scale);
      acc[j] += k.kl;
      if (gr != nullptr) gr[kUnit ? i : i * gs.p] = from_float<scalar_t>(k.grad);
    }
  }
  float total = 0.0f;
  for (int64_t j = 0; j < kLanes; ++j) total += acc[j];
  *kl = total;
}

template <typename scalar_t, bool kUnit>
void channel_kl_rows(const at::Tensor& s, const at::Tensor& t, float* kl, at::Tensor& g, float temperature,
                     float scale, bool write_grad) {
  const int64_t C = s.size(1), L = s.size(2) * s.size(3), rows = s.size(0) * C;
  const Bchw ss = bchw_strides(s), ts = bchw_strides(t);
  const Bchw gs = write_grad ? bchw_strides(g) : ss;
  const scalar_t* sp = s.data_ptr<scalar_t>();
  const scalar_t* tp = t.data_ptr<scalar_t>();
  scalar_t* gp = write_grad ? g.data_ptr<scalar_t>() : nullptr;
  const float inv_t = 1.0f / temperature, grad_scale = temperature * scale / static_cast<float>(rows);
  const bool cache = L <= kCached;

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(cache ? 4 * L : 0);
    float *xs = buf.data(), *xt = xs + (cache ? L : 0), *es = xt + (cache ? L : 0), *et = es + (cache ? L : 0);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / C, c = row % C;
      const scalar_t* sr = sp + b * ss.b + c * ss.c;
      const scalar_t* tr = tp + b * ts.b + c * ts.c;
      scalar_t* gr = write_grad ? gp + b * gs.b + c * gs.c : nullptr;
      if (cache) {
        channel_kl_row<scalar_t, kUnit, true>(sr, tr, gr, L, ss, ts, gs, inv_t, grad_scale, xs, xt, es, et, kl + row);
      } else {
        channel_kl_row<scalar_t, kUnit, false>(sr, tr, gr, L, ss, ts, gs, inv_t, grad_scale, xs, xt, es, et,
                                               kl + row);
      }
    }
  });
}

}  // namespace

void channel_kl_cpu(const at::Tensor& s, const at::Tensor& t, at::Tensor& kl, at::Tensor& g, double temperature,
                    double scale, bool write_grad) {
  TORCH_CHECK(s.dim() == 4 && s.sizes() == t.sizes() && s.scalar_type() == t.scalar_type(),
              "segkd_cpp::channel_kl: student and teacher must be [B, C, H, W] of one dtype");
  TORCH_CHECK(kl.is_contiguous() && kl.scalar_type() == at::kFloat && kl.numel() == s.size(0) * s.size(1),
              "segkd_cpp::channel_kl: kl must be dense fp32 [B * C]");
  const bool unit = bchw_strides(s).p == 1 && bchw_strides(t).p == 1 && (!write_grad || bchw_strides(g).p == 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "segkd_channel_kl_cpu", [&] {
    const float temp = static_cast<float>(temperature), sc = static_cast<float>(scale);
    if (unit) {
      channel_kl_rows<scalar_t, true>(s, t, kl.data_ptr<float>(), g, temp, sc, write_grad);
    } else {
      channel_kl_rows<scalar_t, false>(s, t, kl.data_ptr<float>(), g, temp, sc, write_grad);
    }
  });
}

}  // namespace segkd
