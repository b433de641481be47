// Block-wide reductions of one float per thread (fixed order: deterministic), for blockDim.x a multiple of 32 up to
// 1024. `shared` holds 32 floats; every thread gets the result. And the grid of the element-wise kernels.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../segkd_math.h"

namespace segkd {

// Blocks of `threads` for a grid-stride loop over n elements: one element per thread, at most 65535 * 8 blocks.
inline unsigned grid_stride_blocks(int64_t n, int threads) {
  return static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, 65535 * 8));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = max2(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // `shared` may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : (kMax ? kLowest : 0.0f);
  return kMax ? warp_max(v) : warp_sum(v);
}

}  // namespace segkd
