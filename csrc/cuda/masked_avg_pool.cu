// masked_avg_pool on CUDA, with the label test of segkd_math.h, which the CPU twin (csrc/cpu/masked_avg_pool.cpp)
// shares. Class sums: one thread per (image, split, channel) accumulates its pixels' weighted features in its own K
// bins (local memory, K <= kMaxClasses), in pixel order: deterministic, no atomics; consecutive threads are
// consecutive channels, so channels-last features are read coalesced. Counts: one thread per (image, split). The
// backward: one thread per element, its class's gradient gathered from the small [B, K, C] table.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../ops.h"
#include "block_reduce.cuh"

namespace segkd {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxClasses = 256;

template <typename scalar_t, typename label_t>
__global__ void class_sums_kernel(const scalar_t* __restrict__ f, const label_t* __restrict__ y,
                                  const float* __restrict__ a, float* __restrict__ sums, int64_t B, int64_t S,
                                  int64_t C, int64_t HW, int64_t K, int64_t ignore_index, Bchw fs) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * S * C) return;
  const int64_t c = idx % C, s = (idx / C) % S, b = idx / (C * S), chunk = (HW + S - 1) / S;
  const int64_t p0 = s * chunk, p1 = min(p0 + chunk, HW);
  float bins[kMaxClasses];
  for (int64_t k = 0; k < K; ++k) bins[k] = 0.0f;
  const scalar_t* row = f + b * fs.b + c * fs.c;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t k = static_cast<int64_t>(y[b * HW + p]);
    if (!counted_label(k, K, ignore_index)) continue;
    const float x = static_cast<float>(row[p * fs.p]);
    bins[k] += a != nullptr ? a[b * HW + p] * x : x;
  }
  float* out = sums + (b * S + s) * K * C + c;
  for (int64_t k = 0; k < K; ++k) out[k * C] = bins[k];
}

template <typename label_t>
__global__ void class_counts_kernel(const label_t* __restrict__ y, const float* __restrict__ e,
                                    float* __restrict__ counts, int64_t B, int64_t S, int64_t HW, int64_t K,
                                    int64_t ignore_index) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * S) return;
  const int64_t s = idx % S, b = idx / S, chunk = (HW + S - 1) / S;
  const int64_t p0 = s * chunk, p1 = min(p0 + chunk, HW);
  float bins[kMaxClasses];
  for (int64_t k = 0; k < K; ++k) bins[k] = 0.0f;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t k = static_cast<int64_t>(y[b * HW + p]);
    if (counted_label(k, K, ignore_index)) bins[k] += e != nullptr ? e[b * HW + p] : 1.0f;
  }
  for (int64_t k = 0; k < K; ++k) counts[idx * K + k] = bins[k];
}

template <typename scalar_t, typename label_t>
__global__ void class_gather_kernel(const label_t* __restrict__ y, const float* __restrict__ gp,
                                    scalar_t* __restrict__ g, int64_t B, int64_t C, int64_t HW, int64_t K,
                                    int64_t ignore_index, Bchw gs) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < B * C * HW;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / (C * HW), c = (e / HW) % C, p = e % HW;
    const int64_t k = static_cast<int64_t>(y[b * HW + p]);
    g[b * gs.b + c * gs.c + p * gs.p] =
        static_cast<scalar_t>(counted_label(k, K, ignore_index) ? gp[(b * K + k) * C + c] : 0.0f);
  }
}

}  // namespace

void class_sums_cuda(const at::Tensor& f, const at::Tensor& y, int64_t K, int64_t ignore_index,
                     const c10::optional<at::Tensor>& a, const c10::optional<at::Tensor>& e, at::Tensor& sums,
                     at::Tensor& counts) {
  TORCH_CHECK(f.dim() == 4 && y.is_contiguous() && y.numel() == f.size(0) * f.size(2) * f.size(3),
              "segkd_cpp::class_sums: f must be [B, C, H, W] and y a dense [B, H, W]");
  TORCH_CHECK(K <= kMaxClasses, "segkd_cpp::class_sums: at most 256 classes on CUDA");
  const c10::cuda::CUDAGuard guard(f.device());
  const int64_t B = f.size(0), C = f.size(1), HW = f.size(2) * f.size(3), S = sums.size(1);
  if (B * C * S == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float* ap = a.has_value() ? a->data_ptr<float>() : nullptr;
  const float* ep = e.has_value() ? e->data_ptr<float>() : nullptr;
  const int64_t n_sums = B * S * C, n_counts = B * S;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "segkd_class_sums_cuda", [&] {
    using feat_t = scalar_t;
    SEGKD_DISPATCH_LABELS(y.scalar_type(), "segkd_class_sums_cuda_labels", [&] {
      class_sums_kernel<feat_t, scalar_t><<<static_cast<unsigned>((n_sums + kThreads - 1) / kThreads), kThreads, 0,
                                            stream>>>(f.data_ptr<feat_t>(), y.data_ptr<scalar_t>(), ap,
                                                      sums.data_ptr<float>(), B, S, C, HW, K, ignore_index,
                                                      bchw_strides(f));
      class_counts_kernel<scalar_t><<<static_cast<unsigned>((n_counts + kThreads - 1) / kThreads), kThreads, 0,
                                      stream>>>(y.data_ptr<scalar_t>(), ep, counts.data_ptr<float>(), B, S, HW, K,
                                                ignore_index);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void class_gather_cuda(const at::Tensor& y, const at::Tensor& gp, int64_t ignore_index, at::Tensor& g) {
  TORCH_CHECK(g.dim() == 4 && y.is_contiguous() && y.numel() == g.size(0) * g.size(2) * g.size(3),
              "segkd_cpp::class_gather: g must be [B, C, H, W] and y a dense [B, H, W]");
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t B = g.size(0), C = g.size(1), HW = g.size(2) * g.size(3), K = gp.size(1);
  if (B * C * HW == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "segkd_class_gather_cuda", [&] {
    using grad_t = scalar_t;
    SEGKD_DISPATCH_LABELS(y.scalar_type(), "segkd_class_gather_cuda_labels", [&] {
      class_gather_kernel<grad_t, scalar_t><<<grid_stride_blocks(B * C * HW, kThreads), kThreads, 0,
                                              c10::cuda::getCurrentCUDAStream()>>>(
          y.data_ptr<scalar_t>(), gp.data_ptr<float>(), g.data_ptr<grad_t>(), B, C, HW, K, ignore_index,
          bchw_strides(g));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace segkd
