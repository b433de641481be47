// bn_stat_distance on CUDA, with the per-element math of segkd_math.h, which the CPU twin (csrc/cpu/bn_stat.cpp)
// shares: one CUDA block per (row, split) striding over the split's pixels, the two shifted sums fixed-order block
// reductions (deterministic); the backward one thread per element in g's logical NCHW order, x read through its
// strides.
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

template <typename scalar_t>
__global__ void bn_stat_kernel(const scalar_t* __restrict__ x, float* __restrict__ out, int64_t C, int64_t N,
                               int64_t chunk, Bchw xs) {
  __shared__ float shared[32];
  const int64_t r = blockIdx.x, split = blockIdx.y, R = gridDim.x, S = gridDim.y;
  const scalar_t* row = x + (r / C) * xs.b + (r % C) * xs.c;
  const float k = static_cast<float>(row[0]);
  const int64_t p1 = min((split + 1) * chunk, N);
  ShiftedSums acc{0.0f, 0.0f};
  for (int64_t p = split * chunk + threadIdx.x; p < p1; p += blockDim.x) {
    shifted_add(acc, static_cast<float>(row[p * xs.p]), k);
  }
  const float s1 = block_reduce<false>(acc.s1, shared);
  const float s2 = block_reduce<false>(acc.s2, shared);
  if (threadIdx.x == 0) {
    out[r * S + split] = s1;
    out[(R + r) * S + split] = s2;
  }
}

template <typename scalar_t>
__global__ void bn_stat_apply_kernel(const scalar_t* __restrict__ x, const float* __restrict__ k,
                                     scalar_t* __restrict__ g, int64_t R, int64_t C, int64_t N, Bchw xs, Bchw gs) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < R * N;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / N, p = e % N, b = r / C, c = r % C;
    g[b * gs.b + c * gs.c + p * gs.p] = static_cast<scalar_t>(
        bn_stat_grad(k[r], k[R + r], k[2 * R + r], static_cast<float>(x[b * xs.b + c * xs.c + p * xs.p])));
  }
}

}  // namespace

void bn_stat_cuda(const at::Tensor& x, int64_t chunk, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 4 && chunk > 0, "segkd_cpp::bn_stat: x must be [B, C, H, W], chunk > 0");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = x.size(1), N = x.size(2) * x.size(3), R = x.size(0) * C, S = (N + chunk - 1) / chunk;
  if (R * N == 0) return;
  TORCH_CHECK(out.numel() == 2 * R * S, "segkd_cpp::bn_stat: out must be [2, B*C, ceil(HW / chunk)]");
  const dim3 grid(static_cast<unsigned>(R), static_cast<unsigned>(S));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segkd_bn_stat_cuda", [&] {
    bn_stat_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), out.data_ptr<float>(), C, N, chunk, bchw_strides(x));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void bn_stat_apply_cuda(const at::Tensor& x, const at::Tensor& k, at::Tensor& g) {
  TORCH_CHECK(x.dim() == 4 && g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(),
              "segkd_cpp::bn_stat_apply: g must have x's shape and dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = x.size(1), N = x.size(2) * x.size(3), R = x.size(0) * C;
  if (R * N == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segkd_bn_stat_apply_cuda", [&] {
    bn_stat_apply_kernel<scalar_t><<<grid_stride_blocks(R * N, kThreads), kThreads, 0,
                                     c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), k.data_ptr<float>(), g.data_ptr<scalar_t>(), R, C, N, bchw_strides(x),
        bchw_strides(g));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace segkd
