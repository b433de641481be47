// pixel_kl on CUDA: one thread per pixel, a block of `block` pixels of one image per CUDA block (grid [nblk, B]),
// three passes over the classes (max, log-sum-exp, KD terms) with the math of segkd_math.h, which the CPU twin
// (csrc/cpu/pixel_kl.cpp) shares. NCHW logits: consecutive threads read consecutive pixels (coalesced);
// channels-last logits are read in place through the pixel stride C. The block's KL sum is a fixed-order block
// reduction (deterministic); the gradient scale is read from device memory (no host sync).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../ops.h"
#include "block_reduce.cuh"

namespace segkd {
namespace {

template <typename scalar_t>
__global__ void pixel_kl_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                                const uint8_t* __restrict__ valid, const float* __restrict__ nvalid,
                                const float* __restrict__ wscale, float* __restrict__ kl, scalar_t* __restrict__ g,
                                int64_t C, int64_t HW, Bchw ss, Bchw ts, Bchw gs, float inv_t, float temperature,
                                bool write_grad) {
  __shared__ float shared[32];
  const int64_t b = blockIdx.y;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool in = p < HW;
  const bool pix = in && (valid == nullptr || valid[b * HW + p] != 0);
  float kl_sum = 0.0f;
  if (in) {
    const scalar_t* s0 = s + b * ss.b + p * ss.p;
    const scalar_t* t0 = t + b * ts.b + p * ts.p;
    float ms = kLowest, mt = kLowest, zs = 0.0f, zt = 0.0f;
    for (int64_t c = 0; c < C; ++c) {
      ms = max2(ms, static_cast<float>(s0[c * ss.c]) * inv_t);
      mt = max2(mt, static_cast<float>(t0[c * ts.c]) * inv_t);
    }
    for (int64_t c = 0; c < C; ++c) {
      zs += exp_shifted(static_cast<float>(s0[c * ss.c]) * inv_t, ms);
      zt += exp_shifted(static_cast<float>(t0[c * ts.c]) * inv_t, mt);
    }
    const Softmax S = softmax_stats(ms, zs), T = softmax_stats(mt, zt);
    const float scale = wscale != nullptr ? temperature * wscale[b] : temperature / max2(*nvalid, 1.0f);
    scalar_t* g0 = write_grad ? g + b * gs.b + p * gs.p : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const float xs = static_cast<float>(s0[c * ss.c]) * inv_t, xt = static_cast<float>(t0[c * ts.c]) * inv_t;
      const KdTerm k = kd_term(xs, exp_shifted(xs, ms), S, xt, exp_shifted(xt, mt), T, scale);
      kl_sum += k.kl;
      if (write_grad) g0[c * gs.c] = static_cast<scalar_t>(pix ? k.grad : 0.0f);
    }
  }
  const float total = block_reduce<false>(pix ? kl_sum : 0.0f, shared);
  if (threadIdx.x == 0) kl[b * gridDim.x + blockIdx.x] = total;
}

}  // namespace

void pixel_kl_cuda(const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& valid,
                   const at::Tensor& nvalid, const c10::optional<at::Tensor>& wscale, at::Tensor& kl, at::Tensor& g,
                   double temperature, bool write_grad, int64_t block) {
  TORCH_CHECK(s.dim() == 4 && s.sizes() == t.sizes() && s.scalar_type() == t.scalar_type(),
              "segkd_cpp::pixel_kl: student and teacher must be [B, C, H, W] of one dtype");
  TORCH_CHECK(block % 32 == 0 && block <= 1024, "segkd_cpp::pixel_kl: block must be a multiple of 32, at most 1024");
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t B = s.size(0), C = s.size(1), HW = s.size(2) * s.size(3);
  const int64_t nblk = (HW + block - 1) / block;
  TORCH_CHECK(kl.numel() == B * nblk, "segkd_cpp::pixel_kl: kl must hold B * ceil(HW / block) partial sums");
  if (B == 0 || nblk == 0) return;
  const dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(B));
  const Bchw ss = bchw_strides(s), ts = bchw_strides(t), gs = write_grad ? bchw_strides(g) : ss;
  const float temp = static_cast<float>(temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "segkd_pixel_kl_cuda", [&] {
    pixel_kl_kernel<scalar_t><<<grid, static_cast<unsigned>(block), 0, c10::cuda::getCurrentCUDAStream()>>>(
        s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(),
        valid.has_value() ? valid->data_ptr<uint8_t>() : nullptr, nvalid.data_ptr<float>(),
        wscale.has_value() ? wscale->data_ptr<float>() : nullptr, kl.data_ptr<float>(),
        write_grad ? g.data_ptr<scalar_t>() : nullptr, C, HW, ss, ts, gs, 1.0f / temp, temp, write_grad);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace segkd
