// CPU twin of csrc/cuda/masked_avg_pool.cu: one task per (image, split, block of kChannels channels) accumulates the
// weighted features of each class in its own K x kChannels bins, in pixel order (deterministic), with the label test
// of segkd_math.h (the CUDA kernel: one thread per channel, K bins); the backward gathers each pixel's class
// gradient. Tasks run in parallel (at::parallel_for).
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

// Channels per task: a pixel adds its features to kChannels bins of its class at once (one SIMD add; contiguous
// loads for channels-last features, kChannels row streams for NCHW).
constexpr int64_t kChannels = 16;

template <typename scalar_t, typename label_t>
void sums_typed(const at::Tensor& f, const label_t* y, int64_t K, int64_t ignore_index, const float* a,
                const float* e, float* sums, float* counts, int64_t S) {
  const int64_t B = f.size(0), C = f.size(1), HW = f.size(2) * f.size(3), chunk = (HW + S - 1) / S;
  const int64_t CB = (C + kChannels - 1) / kChannels;
  const Bchw fs = bchw_strides(f);
  const scalar_t* fp = f.data_ptr<scalar_t>();
  at::parallel_for(0, B * S * CB, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> bins(K * kChannels), cbins(K);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t cb = job % CB, s = (job / CB) % S, b = job / (CB * S);
      const int64_t c0 = cb * kChannels, nc = std::min(kChannels, C - c0);
      const int64_t p0 = s * chunk, p1 = std::min(p0 + chunk, HW);
      std::fill(bins.begin(), bins.end(), 0.0f);
      std::fill(cbins.begin(), cbins.end(), 0.0f);
      const scalar_t* fb = fp + b * fs.b + c0 * fs.c;
      const label_t* yr = y + b * HW;
      for (int64_t p = p0; p < p1; ++p) {  // pixel order: deterministic
        const int64_t k = static_cast<int64_t>(yr[p]);
        if (!counted_label(k, K, ignore_index)) continue;
        const float w = a != nullptr ? a[b * HW + p] : 1.0f;
        const scalar_t* fpix = fb + p * fs.p;
        float* bin = bins.data() + k * kChannels;
#pragma omp simd
        for (int64_t cc = 0; cc < nc; ++cc) bin[cc] += w * to_float(fpix[cc * fs.c]);
        if (cb == 0) cbins[k] += e != nullptr ? e[b * HW + p] : 1.0f;
      }
      float* out = sums + (b * S + s) * K * C + c0;  // sums[b, s, :, c0:c0 + nc]
      for (int64_t k = 0; k < K; ++k) {
        std::copy(bins.data() + k * kChannels, bins.data() + k * kChannels + nc, out + k * C);
      }
      if (cb == 0) std::copy(cbins.begin(), cbins.end(), counts + (b * S + s) * K);
    }
  });
}

template <typename scalar_t, typename label_t>
void gather_typed(const label_t* y, const float* gp, int64_t K, int64_t ignore_index, at::Tensor& g) {
  const int64_t B = g.size(0), C = g.size(1), HW = g.size(2) * g.size(3);
  const Bchw gs = bchw_strides(g);
  scalar_t* out = g.data_ptr<scalar_t>();
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / C, c = row % C;
      const label_t* yr = y + b * HW;
      const float* gpb = gp + b * K * C + c;  // gp[b, :, c]
      scalar_t* gr = out + b * gs.b + c * gs.c;
#pragma omp simd
      for (int64_t p = 0; p < HW; ++p) {  // branch-free (a masked gather), so that it vectorises
        const int64_t k = static_cast<int64_t>(yr[p]);
        const bool counted = counted_label(k, K, ignore_index);
        const float v = gpb[(counted ? k : 0) * C];
        gr[p * gs.p] = from_float<scalar_t>(counted ? v : 0.0f);
      }
    }
  });
}

}  // namespace

void class_sums_cpu(const at::Tensor& f, const at::Tensor& y, int64_t K, int64_t ignore_index,
                    const c10::optional<at::Tensor>& a, const c10::optional<at::Tensor>& e, at::Tensor& sums,
                    at::Tensor& counts) {
  TORCH_CHECK(f.dim() == 4 && y.is_contiguous() && y.numel() == f.size(0) * f.size(2) * f.size(3),
              "segkd_cpp::class_sums: f must be [B, C, H, W] and y a dense [B, H, W]");
  TORCH_CHECK(sums.is_contiguous() && counts.is_contiguous() && sums.dim() == 4 && sums.size(2) == K &&
                  sums.size(3) == f.size(1),
              "segkd_cpp::class_sums: sums must be dense fp32 [B, S, K, C] and counts [B, S, K]");
  const float* ap = a.has_value() ? a->data_ptr<float>() : nullptr;
  const float* ep = e.has_value() ? e->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "segkd_class_sums_cpu", [&] {
    using feat_t = scalar_t;
    SEGKD_DISPATCH_LABELS(y.scalar_type(), "segkd_class_sums_cpu_labels", [&] {
      sums_typed<feat_t, scalar_t>(f, y.data_ptr<scalar_t>(), K, ignore_index, ap, ep, sums.data_ptr<float>(),
                                   counts.data_ptr<float>(), sums.size(1));
    });
  });
}

void class_gather_cpu(const at::Tensor& y, const at::Tensor& gp, int64_t ignore_index, at::Tensor& g) {
  TORCH_CHECK(g.dim() == 4 && y.is_contiguous() && y.numel() == g.size(0) * g.size(2) * g.size(3),
              "segkd_cpp::class_gather: g must be [B, C, H, W] and y a dense [B, H, W]");
  TORCH_CHECK(gp.is_contiguous() && gp.scalar_type() == at::kFloat && gp.dim() == 3 && gp.size(2) == g.size(1),
              "segkd_cpp::class_gather: gp must be dense fp32 [B, K, C]");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "segkd_class_gather_cpu", [&] {
    using grad_t = scalar_t;
    SEGKD_DISPATCH_LABELS(y.scalar_type(), "segkd_class_gather_cpu_labels", [&] {
      gather_typed<grad_t, scalar_t>(y.data_ptr<scalar_t>(), gp.data_ptr<float>(), gp.size(1), ignore_index, g);
    });
  });
}

}  // namespace segkd
