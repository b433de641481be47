// upsampled_cross_entropy on CUDA. Forward: one thread per output pixel, a block of `block` pixels of one image per
// CUDA block (grid [nblk, B]): its stencil, the interpolated logits in two passes over the classes (max, sum of exp;
// the gathers hit L1/L2: the low-res logits are 1/64 of the output pixels at 8x), the target's logit; the block's
// loss sum and valid count are fixed-order block reductions (deterministic). Backward: csrc/upsampled_ce.h's tile
// algorithm, one CUDA block of kThreads per tile (grid [tiles, class groups, B]), its working memory (44.2 KB)
// in shared memory; the CPU twin (csrc/cpu/upsampled_ce.cpp) runs the same function. No host sync: the gradient's
// scale is read on the device.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../ops.h"
#include "../upsampled_ce.h"
#include "block_reduce.cuh"

namespace segkd {
namespace {

constexpr int kThreads = 256;

// A CUDA block's threads sharing a tile's elements (csrc/upsampled_ce.h's Block).
struct ThreadBlock {
  template <class F>
  __device__ void for_each(int64_t n, F f) const {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) f(i);
  }
  template <class F>
  __device__ void for_each2(int64_t n0, int64_t n1, F f) const {
    for (int64_t e = threadIdx.x; e < n0 * n1; e += blockDim.x) f(e / n1, e % n1);
  }
  __device__ void sync() const { __syncthreads(); }
};

template <typename scalar_t, typename label_t>
__global__ void upsampled_ce_kernel(const scalar_t* __restrict__ x, const label_t* __restrict__ y,
                                    float* __restrict__ loss, float* __restrict__ count, CeGeometry G) {
  __shared__ float shared[32];
  const int64_t b = blockIdx.y, HW = G.H * G.W;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float l = 0.0f, v = 0.0f;
  if (p < HW) {
    const int64_t label = static_cast<int64_t>(y[b * HW + p]);
    if (counted_label(label, G.K, G.ignore_index)) {
      const Source r = bilinear_source(p / G.W, G.scale_h, G.h), c = bilinear_source(p % G.W, G.scale_w, G.w);
      l = pixel_lse(x, G, b, r, c) - interpolated(x, G, b, label, r, c);
      v = 1.0f;
    }
  }
  const float total = block_reduce<false>(l, shared);
  const float valid = block_reduce<false>(v, shared);
  if (threadIdx.x == 0) {
    loss[b * gridDim.x + blockIdx.x] = total;
    count[b * gridDim.x + blockIdx.x] = valid;
  }
}

template <typename scalar_t, typename label_t>
__global__ void __launch_bounds__(kThreads, 2) upsampled_ce_backward_kernel(const scalar_t* __restrict__ x,
                                                                         const label_t* __restrict__ y,
                                                                         const float* __restrict__ scale,
                                                                         scalar_t* __restrict__ g, CeGeometry G) {
  __shared__ CeTile tile;
  const int64_t ntw = (G.w + kCeTW - 1) / kCeTW;
  ce_backward_tile(x, y, *scale, g, G, static_cast<int64_t>(blockIdx.z), (blockIdx.x / ntw) * kCeTH,
                   (blockIdx.x % ntw) * kCeTW, static_cast<int64_t>(blockIdx.y) * kCeKG, tile, ThreadBlock{});
}

void check_grid(const at::Tensor& x, const char* name) {  // images on grid.y / grid.z
  TORCH_CHECK(x.size(0) <= 65535, name, ": at most 65535 images");
}

}  // namespace

void upsampled_ce_cuda(const at::Tensor& x, const at::Tensor& y, int64_t ignore_index, at::Tensor& loss,
                       at::Tensor& count, int64_t block) {
  ce_check_forward(x, y, loss, count, block);
  check_grid(x, "segkd_cpp::upsampled_ce");
  TORCH_CHECK(block == kThreads, "segkd_cpp::upsampled_ce: block must be ", kThreads, " on CUDA");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), nblk = (y.size(1) * y.size(2) + block - 1) / block;
  if (B == 0 || nblk == 0) return;
  const CeGeometry G = ce_geometry(x, y, ignore_index, bchw_strides(x));
  const dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(B));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segkd_upsampled_ce_cuda", [&] {
    using logit_t = scalar_t;
    SEGKD_DISPATCH_LABELS(y.scalar_type(), "segkd_upsampled_ce_cuda_labels", [&] {
      upsampled_ce_kernel<logit_t, scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<logit_t>(), y.data_ptr<scalar_t>(), loss.data_ptr<float>(), count.data_ptr<float>(), G);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void upsampled_ce_backward_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                                int64_t ignore_index, at::Tensor& g) {
  ce_check_backward(x, y, scale, g);
  check_grid(x, "segkd_cpp::upsampled_ce_backward");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), nk = (x.size(1) + kCeKG - 1) / kCeKG;
  const int64_t ntiles = ((x.size(2) + kCeTH - 1) / kCeTH) * ((x.size(3) + kCeTW - 1) / kCeTW);
  if (g.numel() == 0) return;
  const CeGeometry G = ce_geometry(x, y, ignore_index, bchw_strides(g));
  const dim3 grid(static_cast<unsigned>(ntiles), static_cast<unsigned>(nk), static_cast<unsigned>(B));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segkd_upsampled_ce_backward_cuda", [&] {
    using logit_t = scalar_t;
    SEGKD_DISPATCH_LABELS(y.scalar_type(), "segkd_upsampled_ce_backward_cuda_labels", [&] {
      upsampled_ce_backward_kernel<logit_t, scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<logit_t>(), y.data_ptr<scalar_t>(), scale.data_ptr<float>(), g.data_ptr<logit_t>(), G);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace segkd
