// CPU twin of csrc/cuda/scale_grad.cu: g *= grad_output in place, g untouched when grad_output == 1.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "../ops.h"
#include "../segkd_math.h"
#include "convert.h"

namespace segkd {
namespace {

template <typename scalar_t>
void scale_dense(scalar_t* p, int64_t n, float go) {
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      p[i] = from_float<scalar_t>(scaled_grad(to_float(p[i]), go));
    }
  });
}

}  // namespace

void scale_grad_cpu(at::Tensor& g, const at::Tensor& grad_output) {
  TORCH_CHECK(g.is_non_overlapping_and_dense(), "segkd_cpp::scale_grad_: g must be dense (any layout)");
  const float go = grad_output.to(at::kFloat).item<float>();  // CPU memory: no device sync
  if (go == 1.0f || g.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "segkd_scale_grad_cpu", [&] {
    scale_dense<scalar_t>(g.data_ptr<scalar_t>(), g.numel(), go);  // dense: every element once, any layout
  });
}

}  // namespace segkd
