// pairwise_similarity_loss on CUDA: the Gram products with the features normalised as they are loaded (segkd_math.h's
// `normalised`, shared with the CPU twin csrc/cpu/pairwise.cpp), fp32 FMAs (no tensor cores, no TF32: the loss is a
// difference of three Gram norms, see kernels/pairwise.py), and every output accumulated over the reduction index in
// order, as the CPU twin accumulates it. A CUDA block of 16 x 16 threads owns a 64 x 64 output tile, each thread
// 4 x 4 outputs (rows ty + 16 i, columns tx + 16 j), staged through shared-memory panels of 16 reduction steps.
// gram_apply also writes its block's share of <F1, dF>_C, summed over the tile's rows in row order (as the CPU twin).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../ops.h"
#include "../pairwise.h"
#include "block_reduce.cuh"

namespace segkd {
namespace {

constexpr int kB = kPairTile;  // output tile
constexpr int kK = 16;  // reduction steps per shared panel
constexpr int kThreads = 256;

// Features f = x r of one image read as [C, N] through the (channel, pixel) strides.
template <typename scalar_t>
struct Features {
  const scalar_t* x;
  const float* r;
  int64_t sc, sp;
  __device__ float at(int64_t c, int64_t n) const { return normalised(static_cast<float>(x[c * sc + n * sp]), r[n]); }
};

// panel[k][i] = value(i0 + i, k0 + k), zero outside [0, ni) x [0, nk): a 64 x 16 panel, 4 elements per thread,
// consecutive threads along i when i_unit (i is the unit-stride index in memory: coalesced loads), else along the
// reduction index k. Either way a warp's shared stores fall in distinct banks (rows of 65 floats).
template <class F>
__device__ void load_panel(float (*panel)[kB + 1], int64_t i0, int64_t ni, int64_t k0, int64_t nk, bool i_unit,
                           F value) {
  for (int e = threadIdx.x; e < kB * kK; e += kThreads) {
    const int i = i_unit ? e % kB : e / kK, k = i_unit ? e / kB : e % kK;
    panel[k][i] = i0 + i < ni && k0 + k < nk ? value(i0 + i, k0 + k) : 0.0f;
  }
}

// acc[i][j] += sum over the panel's 16 steps of a[k][ty + 16 i] * b[k][tx + 16 j], steps in order
__device__ __forceinline__ void tile_update(float (&acc)[4][4], const float (*a)[kB + 1], const float (*b)[kB + 1]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int k = 0; k < kK; ++k) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += a[k][ty + 16 * i] * b[k][tx + 16 * j];
  }
}

template <typename xs_t, typename ys_t>
__global__ void __launch_bounds__(kThreads) gram_kernel(const xs_t* __restrict__ x, const float* __restrict__ rx,
                                                        const ys_t* __restrict__ y, const float* __restrict__ ry,
                                                        float* __restrict__ g, int64_t M, int64_t P, int64_t N,
                                                        Bchw xs, Bchw ys) {
  __shared__ float a[kK][kB + 1], b[kK][kB + 1];
  const int64_t bi = blockIdx.z, m0 = static_cast<int64_t>(blockIdx.y) * kB, p0 = static_cast<int64_t>(blockIdx.x) * kB;
  const Features<xs_t> fx{x + bi * xs.b, rx + bi * N, xs.c, xs.p};
  const Features<ys_t> fy{y + bi * ys.b, ry + bi * N, ys.c, ys.p};
  float acc[4][4] = {};
  for (int64_t n0 = 0; n0 < N; n0 += kK) {
    load_panel(a, m0, M, n0, N, xs.c == 1, [&](int64_t m, int64_t n) { return fx.at(m, n); });  // i: channels
    load_panel(b, p0, P, n0, N, ys.c == 1, [&](int64_t p, int64_t n) { return fy.at(p, n); });
    __syncthreads();
    tile_update(acc, a, b);
    __syncthreads();
  }
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ty + 16 * i, p = p0 + tx + 16 * j;
      if (m < M && p < P) g[(bi * M + m) * P + p] = acc[i][j];
    }
}

// A Gram matrix of one image, [M, C] fp32 through its strides, times `sign`.
struct Gram {
  const float* g;
  int64_t sm, sc;
  float sign;
  __device__ float at(int64_t m, int64_t c) const { return sign * g[m * sm + c * sc]; }
};

template <typename x1_t, typename x2_t>
__global__ void __launch_bounds__(kThreads, 2) gram_apply_kernel(
    const float* __restrict__ g1, const x1_t* __restrict__ x1, const float* __restrict__ r1,
    const float* __restrict__ g2, const x2_t* __restrict__ x2, const float* __restrict__ r2, float* __restrict__ df,
    float* __restrict__ proj, int64_t C1, int64_t C2, int64_t N, int64_t g1b, int64_t g1m, int64_t g1c, int64_t g2b,
    int64_t g2m, int64_t g2c, Bchw s1, Bchw s2) {
  __shared__ float a[kK][kB + 1], b[kK][kB + 1];
  __shared__ float prod[kB][kB + 1];
  const int64_t bi = blockIdx.z, m0 = static_cast<int64_t>(blockIdx.y) * kB, n0 = static_cast<int64_t>(blockIdx.x) * kB;
  const Features<x1_t> f1{x1 + bi * s1.b, r1 + bi * N, s1.c, s1.p};
  const Features<x2_t> f2{x2 + bi * s2.b, r2 + bi * N, s2.c, s2.p};
  const Gram G1{g1 + bi * g1b, g1m, g1c, 1.0f}, G2{g2 + bi * g2b, g2m, g2c, -1.0f};
  float acc[4][4] = {};
  const auto accumulate = [&](const Gram& G, const auto& f, int64_t C) {  // acc += G F over C channels
    for (int64_t c0 = 0; c0 < C; c0 += kK) {
      load_panel(a, m0, C1, c0, C, G.sm == 1, [&](int64_t m, int64_t c) { return G.at(m, c); });
      load_panel(b, n0, N, c0, C, f.sp == 1, [&](int64_t n, int64_t c) { return f.at(c, n); });  // i: pixels
      __syncthreads();
      tile_update(acc, a, b);
      __syncthreads();
    }
  };
  accumulate(G1, f1, C1);  // + G1 F1
  accumulate(G2, f2, C2);  // - G2 F2 (G2's sign is -1)
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
      const bool in = m < C1 && n < N;
      if (in) df[(bi * C1 + m) * N + n] = acc[i][j];
      prod[ty + 16 * i][tx + 16 * j] = in ? f1.at(m, n) * acc[i][j] : 0.0f;
    }
  __syncthreads();
  if (threadIdx.x < kB && n0 + threadIdx.x < N) {  // the tile's rows summed in order, one column per thread
    float s = 0.0f;
    const int64_t rows = C1 - m0 < kB ? C1 - m0 : kB;
    for (int64_t i = 0; i < rows; ++i) s += prod[i][threadIdx.x];
    proj[(bi * gridDim.y + blockIdx.y) * N + n0 + threadIdx.x] = s;
  }
}

template <typename scalar_t>
__global__ void unnormalise_kernel(const scalar_t* __restrict__ x, const float* __restrict__ r,
                                   const float* __restrict__ df, const float* __restrict__ proj,
                                   const float* __restrict__ scale, scalar_t* __restrict__ dx, int64_t C, int64_t N,
                                   int64_t total, Bchw xs, Bchw ds) {
  const float s = *scale;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = e % N, c = (e / N) % C, b = e / (N * C);
    const float rn = r[b * N + n];
    const float f = normalised(static_cast<float>(x[b * xs.b + c * xs.c + n * xs.p]), rn);
    dx[b * ds.b + c * ds.c + n * ds.p] = static_cast<scalar_t>(unnormalised_grad(df[e], f, proj[b * N + n], rn, s));
  }
}

// the grid's limits (images on grid.z, 64-channel blocks on grid.y)
void check_grid(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.size(0) <= 65535 && (x.size(1) + kB - 1) / kB <= 65535, name, ": at most 65535 images and ",
              65535 * kB, " channels");
}

#define SEGKD_DISPATCH_FEATURES(X, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (X).scalar_type(), NAME, __VA_ARGS__)

}  // namespace

void gram_cuda(const at::Tensor& x, const at::Tensor& rx, const at::Tensor& y, const at::Tensor& ry, at::Tensor& g) {
  check_gram(x, rx, y, ry, g);
  check_grid(x, "segkd_cpp::gram");
  check_grid(y, "segkd_cpp::gram");
  const int64_t B = x.size(0), M = x.size(1), P = y.size(1), N = rx.size(1);
  if (g.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const dim3 grid(static_cast<unsigned>((P + kB - 1) / kB), static_cast<unsigned>((M + kB - 1) / kB),
                  static_cast<unsigned>(B));
  SEGKD_DISPATCH_FEATURES(x, "segkd_gram_cuda", [&] {
    using x_t = scalar_t;
    SEGKD_DISPATCH_FEATURES(y, "segkd_gram_cuda", [&] {
      gram_kernel<x_t, scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<x_t>(), rx.data_ptr<float>(), y.data_ptr<scalar_t>(), ry.data_ptr<float>(), g.data_ptr<float>(),
          M, P, N, bchw_strides(x), bchw_strides(y));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gram_apply_cuda(const at::Tensor& g1, const at::Tensor& x1, const at::Tensor& r1, const at::Tensor& g2,
                     const at::Tensor& x2, const at::Tensor& r2, at::Tensor& df, at::Tensor& proj) {
  check_gram_apply(g1, x1, r1, g2, x2, r2, df, proj);
  check_grid(x1, "segkd_cpp::gram_apply");
  check_grid(x2, "segkd_cpp::gram_apply");
  const int64_t B = x1.size(0), C1 = x1.size(1), C2 = x2.size(1), N = r1.size(1), nm = (C1 + kB - 1) / kB;
  if (df.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x1.device());
  const dim3 grid(static_cast<unsigned>((N + kB - 1) / kB), static_cast<unsigned>(nm), static_cast<unsigned>(B));
  SEGKD_DISPATCH_FEATURES(x1, "segkd_gram_apply_cuda", [&] {
    using x1_t = scalar_t;
    SEGKD_DISPATCH_FEATURES(x2, "segkd_gram_apply_cuda", [&] {
      gram_apply_kernel<x1_t, scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          g1.data_ptr<float>(), x1.data_ptr<x1_t>(), r1.data_ptr<float>(), g2.data_ptr<float>(),
          x2.data_ptr<scalar_t>(), r2.data_ptr<float>(), df.data_ptr<float>(), proj.data_ptr<float>(), C1, C2, N,
          g1.stride(0), g1.stride(1), g1.stride(2), g2.stride(0), g2.stride(1), g2.stride(2), bchw_strides(x1),
          bchw_strides(x2));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void unnormalise_cuda(const at::Tensor& x, const at::Tensor& r, const at::Tensor& df, const at::Tensor& proj,
                      const at::Tensor& scale, at::Tensor& dx) {
  check_unnormalise(x, r, df, proj, scale, dx);
  check_grid(x, "segkd_cpp::unnormalise");
  const int64_t B = x.size(0), C = x.size(1), N = r.size(1);
  const int64_t total = B * C * N;
  if (total == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  SEGKD_DISPATCH_FEATURES(x, "segkd_unnormalise_cuda", [&] {
    unnormalise_kernel<scalar_t><<<grid_stride_blocks(total, kThreads), kThreads, 0,
                                   c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), r.data_ptr<float>(), df.data_ptr<float>(), proj.data_ptr<float>(),
        scale.data_ptr<float>(), dx.data_ptr<scalar_t>(), C, N, total, bchw_strides(x), bchw_strides(dx));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace segkd
