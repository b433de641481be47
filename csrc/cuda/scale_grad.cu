// scale_grad_ on CUDA: g *= grad_output in place; grad_output is read on the device and a block leaves g untouched
// when it equals 1 (no host sync, no traffic then), as kernels/_grad_scale.py's Triton kernel does.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../ops.h"
#include "block_reduce.cuh"

namespace segkd {
namespace {

template <typename scalar_t, typename go_t>
__global__ void scale_grad_kernel(scalar_t* __restrict__ g, const go_t* __restrict__ grad_output, int64_t n) {
  const float go = static_cast<float>(*grad_output);
  if (go == 1.0f) return;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    g[i] = static_cast<scalar_t>(scaled_grad(static_cast<float>(g[i]), go));
  }
}

}  // namespace

void scale_grad_cuda(at::Tensor& g, const at::Tensor& grad_output) {
  TORCH_CHECK(g.is_non_overlapping_and_dense(), "segkd_cpp::scale_grad_: g must be dense (any layout)");
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t n = g.numel();
  if (n == 0) return;
  const at::Tensor go = grad_output.to(at::kFloat).reshape({});
  const int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "segkd_scale_grad_cuda", [&] {
    scale_grad_kernel<scalar_t, float><<<grid_stride_blocks(n, threads), threads, 0,
                                         c10::cuda::getCurrentCUDAStream()>>>(g.data_ptr<scalar_t>(),
                                                                             go.data_ptr<float>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace segkd
