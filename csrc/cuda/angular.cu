// angular_loss on CUDA, with the per-element math of segkd_math.h, which the CPU twin (csrc/cpu/angular.cpp)
// shares. Stats: layer and channel groups are cut into splits of `chunk` elements, one CUDA block per (group,
// split) striding over it, the three sums fixed-order block reductions (deterministic); the point mode has one
// thread per pixel looping over the channels (coalesced for NCHW). Apply: one thread per element in logical NCHW
// order, every tensor read and written through its own strides.
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
__global__ void angular_rows_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                                    float* __restrict__ out, int64_t C, int64_t HW, int64_t L, int64_t chunk,
                                    bool layer, Bchw ss, Bchw ts) {
  __shared__ float shared[32];
  const int64_t r = blockIdx.x, split = blockIdx.y, rows = gridDim.x, S = gridDim.y;
  const int64_t b = layer ? r : r / C;
  const int64_t e0 = split * chunk, e1 = min(e0 + chunk, L);
  AngularSums acc{0.0f, 0.0f, 0.0f};
  for (int64_t e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
    const int64_t c = layer ? e / HW : r % C, p = layer ? e % HW : e;
    angular_add(acc, static_cast<float>(s[b * ss.b + c * ss.c + p * ss.p]),
                static_cast<float>(t[b * ts.b + c * ts.c + p * ts.p]));
  }
  const float a = block_reduce<false>(acc.ss, shared);
  const float bb = block_reduce<false>(acc.tt, shared);
  const float c = block_reduce<false>(acc.st, shared);
  if (threadIdx.x == 0) {
    out[r * S + split] = a;
    out[(rows + r) * S + split] = bb;
    out[(2 * rows + r) * S + split] = c;
  }
}

template <typename scalar_t>
__global__ void angular_point_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                                     float* __restrict__ out, int64_t C, int64_t HW, Bchw ss, Bchw ts) {
  const int64_t b = blockIdx.y, p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= HW) return;
  AngularSums acc{0.0f, 0.0f, 0.0f};
  for (int64_t c = 0; c < C; ++c) {
    angular_add(acc, static_cast<float>(s[b * ss.b + c * ss.c + p * ss.p]),
                static_cast<float>(t[b * ts.b + c * ts.c + p * ts.p]));
  }
  const int64_t G = gridDim.y * HW, gi = b * HW + p;
  out[gi] = acc.ss;
  out[G + gi] = acc.tt;
  out[2 * G + gi] = acc.st;
}

template <typename scalar_t>
__global__ void angular_apply_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                                     const float* __restrict__ k, scalar_t* __restrict__ g, int64_t B, int64_t C,
                                     int64_t HW, int64_t mode, Bchw ss, Bchw ts, Bchw gs) {
  const int64_t n = B * C * HW, G = mode == 0 ? B : (mode == 1 ? B * C : B * HW);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / (C * HW), c = (e / HW) % C, p = e % HW;
    const int64_t gi = mode == 0 ? b : (mode == 1 ? b * C + c : b * HW + p);
    g[b * gs.b + c * gs.c + p * gs.p] = static_cast<scalar_t>(
        angular_grad(k[gi], k[G + gi], static_cast<float>(s[b * ss.b + c * ss.c + p * ss.p]),
                     static_cast<float>(t[b * ts.b + c * ts.c + p * ts.p])));
  }
}

void check(const at::Tensor& s, const at::Tensor& t, int64_t mode) {
  TORCH_CHECK(s.dim() == 4 && s.sizes() == t.sizes() && s.scalar_type() == t.scalar_type(),
              "segkd_cpp::angular: student and teacher must be [B, C, H, W] of one dtype");
  TORCH_CHECK(mode >= 0 && mode <= 2, "segkd_cpp::angular: mode must be 0 (layer), 1 (channel) or 2 (point)");
}

}  // namespace

void angular_stats_cuda(const at::Tensor& s, const at::Tensor& t, int64_t mode, int64_t chunk, at::Tensor& out) {
  check(s, t, mode);
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t B = s.size(0), C = s.size(1), HW = s.size(2) * s.size(3);
  if (B * C * HW == 0) return;
  const Bchw ss = bchw_strides(s), ts = bchw_strides(t);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "segkd_angular_stats_cuda", [&] {
    if (mode == 2) {
      const dim3 grid(static_cast<unsigned>((HW + kThreads - 1) / kThreads), static_cast<unsigned>(B));
      angular_point_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(),
                                                                    out.data_ptr<float>(), C, HW, ss, ts);
    } else {
      const int64_t rows = mode == 0 ? B : B * C, L = mode == 0 ? C * HW : HW, S = (L + chunk - 1) / chunk;
      TORCH_CHECK(out.numel() == 3 * rows * S, "segkd_cpp::angular_stats: out must be [3, G, ceil(L / chunk)]");
      const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(S));
      angular_rows_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(),
                                                                   out.data_ptr<float>(), C, HW, L, chunk, mode == 0,
                                                                   ss, ts);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void angular_apply_cuda(const at::Tensor& s, const at::Tensor& t, const at::Tensor& k, int64_t mode, at::Tensor& g) {
  check(s, t, mode);
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t B = s.size(0), C = s.size(1), HW = s.size(2) * s.size(3), n = B * C * HW;
  if (n == 0) return;
  const Bchw ss = bchw_strides(s), ts = bchw_strides(t), gs = bchw_strides(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "segkd_angular_apply_cuda", [&] {
    angular_apply_kernel<scalar_t><<<grid_stride_blocks(n, kThreads), kThreads, 0,
                                     c10::cuda::getCurrentCUDAStream()>>>(
        s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), k.data_ptr<float>(), g.data_ptr<scalar_t>(), B, C, HW, mode,
        ss, ts, gs);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace segkd
