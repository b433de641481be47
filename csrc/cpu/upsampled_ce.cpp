// CPU twin of csrc/cuda/upsampled_ce.cu. Forward: the same blocks of `block` output pixels (one partial loss sum and
// one valid count each), each pixel's stencil and interpolation (segkd_math.h), a two-pass log-sum-exp; worked in
// tiles of kTile pixels whose interpolated logits stay in a per-thread buffer between the passes (the CUDA kernel
// recomputes them), the pixels of a tile in SIMD lanes. Backward: the tile algorithm of csrc/upsampled_ce.h itself,
// one task per tile (at::parallel_for), the phases' elements walked in order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../ops.h"
#include "../upsampled_ce.h"
#include "convert.h"

namespace segkd {
namespace {

constexpr int64_t kTile = 64;

template <typename scalar_t, typename label_t>
void forward_blocks(const at::Tensor& x, const at::Tensor& y, const CeGeometry& G, float* loss, float* count,
                    int64_t block) {
  const int64_t HW = G.H * G.W, nblk = (HW + block - 1) / block, K = G.K;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const label_t* yp = y.data_ptr<label_t>();
  at::parallel_for(0, x.size(0) * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(K * kTile);
    int64_t q00[kTile], q01[kTile], q10[kTile], q11[kTile];
    float wx[kTile], wy[kTile], m[kTile], sum[kTile];
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / nblk, b0 = (job % nblk) * block, b1 = std::min(b0 + block, HW);
      const scalar_t* xb = xp + b * G.xb;
      float total = 0.0f, valid = 0.0f;
      for (int64_t p0 = b0; p0 < b1; p0 += kTile) {
        const int64_t n = std::min(kTile, b1 - p0);
        for (int64_t i = 0; i < n; ++i) {  // each pixel's stencil: four neighbour offsets and two weights
          const Source r = bilinear_source((p0 + i) / G.W, G.scale_h, G.h);
          const Source c = bilinear_source((p0 + i) % G.W, G.scale_w, G.w);
          q00[i] = (r.i0 * G.w + c.i0) * G.xp;
          q01[i] = (r.i0 * G.w + c.i1) * G.xp;
          q10[i] = (r.i1 * G.w + c.i0) * G.xp;
          q11[i] = (r.i1 * G.w + c.i1) * G.xp;
          wx[i] = c.w1;
          wy[i] = r.w1;
        }
        std::fill(m, m + n, kLowest);
        std::fill(sum, sum + n, 0.0f);
        for (int64_t k = 0; k < K; ++k) {  // pass 1: interpolate, keep, and the max per pixel
          const scalar_t* xk = xb + k * G.xc;
          float* zk = z.data() + k * kTile;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            zk[i] = bilinear(to_float(xk[q00[i]]), to_float(xk[q01[i]]), to_float(xk[q10[i]]), to_float(xk[q11[i]]),
                             wx[i], wy[i]);
            m[i] = max2(m[i], zk[i]);
          }
        }
        for (int64_t k = 0; k < K; ++k) {  // pass 2: the sum of exp
          const float* zk = z.data() + k * kTile;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) sum[i] += exp_shifted(zk[i], m[i]);
        }
        for (int64_t i = 0; i < n; ++i) {  // in pixel order: deterministic
          const int64_t label = static_cast<int64_t>(yp[b * HW + p0 + i]);
          if (!counted_label(label, K, G.ignore_index)) continue;
          total += log_sum_exp(m[i], sum[i]) - z[label * kTile + i];
          valid += 1.0f;
        }
      }
      loss[job] = total;
      count[job] = valid;
    }
  });
}

template <typename scalar_t, typename label_t>
void backward_tiles(const at::Tensor& x, const at::Tensor& y, float g_scale, at::Tensor& g, const CeGeometry& G) {
  const int64_t nth = (G.h + kCeTH - 1) / kCeTH, ntw = (G.w + kCeTW - 1) / kCeTW, nk = (G.K + kCeKG - 1) / kCeKG;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const label_t* yp = y.data_ptr<label_t>();
  scalar_t* gp = g.data_ptr<scalar_t>();
  at::parallel_for(0, x.size(0) * nk * nth * ntw, 1, [&](int64_t begin, int64_t end) {
    auto tile = std::make_unique<CeTile>();
    for (int64_t job = begin; job < end; ++job) {  // the CUDA kernel's grid (tile, class chunk, image)
      const int64_t t = job % (nth * ntw), kc = (job / (nth * ntw)) % nk, b = job / (nth * ntw * nk);
      ce_backward_tile(xp, yp, g_scale, gp, G, b, (t / ntw) * kCeTH, (t % ntw) * kCeTW, kc * kCeKG, *tile,
                       SerialBlock{});
    }
  });
}

}  // namespace

void upsampled_ce_cpu(const at::Tensor& x, const at::Tensor& y, int64_t ignore_index, at::Tensor& loss,
                      at::Tensor& count, int64_t block) {
  ce_check_forward(x, y, loss, count, block);
  const CeGeometry G = ce_geometry(x, y, ignore_index, bchw_strides(x));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segkd_upsampled_ce_cpu", [&] {
    using logit_t = scalar_t;
    SEGKD_DISPATCH_LABELS(y.scalar_type(), "segkd_upsampled_ce_cpu_labels", [&] {
      forward_blocks<logit_t, scalar_t>(x, y, G, loss.data_ptr<float>(), count.data_ptr<float>(), block);
    });
  });
}

void upsampled_ce_backward_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                               int64_t ignore_index, at::Tensor& g) {
  ce_check_backward(x, y, scale, g);
  const CeGeometry G = ce_geometry(x, y, ignore_index, bchw_strides(g));
  const float g_scale = scale.item<float>();  // CPU memory: no device sync
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segkd_upsampled_ce_backward_cpu", [&] {
    using logit_t = scalar_t;
    SEGKD_DISPATCH_LABELS(y.scalar_type(), "segkd_upsampled_ce_backward_cpu_labels", [&] {
      backward_tiles<logit_t, scalar_t>(x, y, g_scale, g, G);
    });
  });
}

}  // namespace segkd
