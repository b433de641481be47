// channel_kl on CUDA: one CUDA block per row (b, c) of H*W logits, its threads striding along the row in three
// passes (max, log-sum-exp, KD terms) with the math of segkd_math.h, which the CPU twin (csrc/cpu/channel_kl.cpp)
// shares; the row's max and sums are fixed-order block reductions (deterministic). An NCHW row is contiguous
// (coalesced); a channels-last row is read in place with stride C.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../ops.h"
#include "block_reduce.cuh"

namespace segkd {
namespace {

constexpr int kThreads = 512;

template <typename scalar_t>
__global__ void channel_kl_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                                  float* __restrict__ kl, scalar_t* __restrict__ g, int64_t C, int64_t L, Bchw ss,
                                  Bchw ts, Bchw gs, float inv_t, float grad_scale, bool write_grad) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x, b = row / C, c = row % C;
  const scalar_t* sr = s + b * ss.b + c * ss.c;
  const scalar_t* tr = t + b * ts.b + c * ts.c;
  float ms = kLowest, mt = kLowest;
  for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
    ms = max2(ms, static_cast<float>(sr[i * ss.p]) * inv_t);
    mt = max2(mt, static_cast<float>(tr[i * ts.p]) * inv_t);
  }
  ms = block_reduce<true>(ms, shared);
  mt = block_reduce<true>(mt, shared);
  float zs = 0.0f, zt = 0.0f;
  for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
    zs += exp_shifted(static_cast<float>(sr[i * ss.p]) * inv_t, ms);
    zt += exp_shifted(static_cast<float>(tr[i * ts.p]) * inv_t, mt);
  }
  const Softmax S = softmax_stats(ms, block_reduce<false>(zs, shared));
  const Softmax T = softmax_stats(mt, block_reduce<false>(zt, shared));
  scalar_t* gr = write_grad ? g + b * gs.b + c * gs.c : nullptr;
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
    const float xs = static_cast<float>(sr[i * ss.p]) * inv_t, xt = static_cast<float>(tr[i * ts.p]) * inv_t;
    const KdTerm k = kd_term(xs, exp_shifted(xs, ms), S, xt, exp_shifted(xt, mt), T, grad_scale);
    acc += k.kl;
    if (write_grad) gr[i * gs.p] = static_cast<scalar_t>(k.grad);
  }
  const float total = block_reduce<false>(acc, shared);
  if (threadIdx.x == 0) kl[row] = total;
}

}  // namespace

void channel_kl_cuda(const at::Tensor& s, const at::Tensor& t, at::Tensor& kl, at::Tensor& g, double temperature,
                     double scale, bool write_grad) {
  TORCH_CHECK(s.dim() == 4 && s.sizes() == t.sizes() && s.scalar_type() == t.scalar_type(),
              "segkd_cpp::channel_kl: student and teacher must be [B, C, H, W] of one dtype");
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t C = s.size(1), L = s.size(2) * s.size(3), rows = s.size(0) * C;
  TORCH_CHECK(kl.numel() == rows, "segkd_cpp::channel_kl: kl must hold B * C row sums");
  if (rows == 0) return;
  const Bchw ss = bchw_strides(s), ts = bchw_strides(t), gs = write_grad ? bchw_strides(g) : ss;
  const float temp = static_cast<float>(temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "segkd_channel_kl_cuda", [&] {
    channel_kl_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), kl.data_ptr<float>(),
        write_grad ? g.data_ptr<scalar_t>() : nullptr, C, L, ss, ts, gs, 1.0f / temp,
        temp * static_cast<float>(scale) / static_cast<float>(rows), write_grad);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace segkd
