// What the pair-wise similarity kernels' two implementations (csrc/cpu/pairwise.cpp, csrc/cuda/pairwise.cu) share:
// the output tile size, which also sets the row blocks of gram_apply's proj buffer, and the checks of their
// arguments (shapes, dtypes, devices), one place for both devices.
#pragma once

#include "ops.h"

namespace segkd {

// rows and columns of an output tile; rows of dF per block of proj (kernels/pairwise.py CPP_BLOCK_M)
constexpr int kPairTile = 64;

// features x [B, C, h, w] with their inverse norms r: dense fp32 [B, h*w] on x's device
inline void check_features(const at::Tensor& x, const at::Tensor& r, const char* name) {
  TORCH_CHECK(x.dim() == 4 && r.dim() == 2 && r.size(0) == x.size(0) && r.size(1) == x.size(2) * x.size(3) &&
                  r.is_contiguous() && r.scalar_type() == at::kFloat && r.device() == x.device(),
              name, ": features must be [B, C, h, w] with inverse norms dense fp32 [B, h*w] on their device");
}

inline void check_gram(const at::Tensor& x, const at::Tensor& rx, const at::Tensor& y, const at::Tensor& ry,
                       const at::Tensor& g) {
  check_features(x, rx, "segkd_cpp::gram");
  check_features(y, ry, "segkd_cpp::gram");
  TORCH_CHECK(g.is_contiguous() && g.scalar_type() == at::kFloat && g.numel() == x.size(0) * x.size(1) * y.size(1) &&
                  g.device() == x.device() && y.device() == x.device(),
              "segkd_cpp::gram: g must be dense fp32 [B, M, P], on the features' device");
}

inline void check_gram_apply(const at::Tensor& g1, const at::Tensor& x1, const at::Tensor& r1, const at::Tensor& g2,
                             const at::Tensor& x2, const at::Tensor& r2, const at::Tensor& df,
                             const at::Tensor& proj) {
  check_features(x1, r1, "segkd_cpp::gram_apply");
  check_features(x2, r2, "segkd_cpp::gram_apply");
  const int64_t B = x1.size(0), C1 = x1.size(1), C2 = x2.size(1), N = r1.size(1);
  TORCH_CHECK(g1.dim() == 3 && g1.size(1) == C1 && g1.size(2) == C1 && g2.dim() == 3 && g2.size(1) == C1 &&
                  g2.size(2) == C2 && g1.scalar_type() == at::kFloat && g2.scalar_type() == at::kFloat,
              "segkd_cpp::gram_apply: g1 must be fp32 [B, C1, C1] and g2 fp32 [B, C1, C2]");
  TORCH_CHECK(g1.device() == x1.device() && g2.device() == x1.device() && x2.device() == x1.device() &&
                  df.device() == x1.device() && proj.device() == x1.device(),
              "segkd_cpp::gram_apply: every tensor must be on the features' device");
  TORCH_CHECK(df.is_contiguous() && df.numel() == B * C1 * N && proj.is_contiguous() &&
                  proj.numel() == B * ((C1 + kPairTile - 1) / kPairTile) * N && df.scalar_type() == at::kFloat &&
                  proj.scalar_type() == at::kFloat,
              "segkd_cpp::gram_apply: df must be dense fp32 [B, C1, N] and proj [B, ceil(C1 / 64), N]");
}

inline void check_unnormalise(const at::Tensor& x, const at::Tensor& r, const at::Tensor& df, const at::Tensor& proj,
                              const at::Tensor& scale, const at::Tensor& dx) {
  check_features(x, r, "segkd_cpp::unnormalise");
  const int64_t B = x.size(0), C = x.size(1), N = r.size(1);
  TORCH_CHECK(df.is_contiguous() && df.numel() == B * C * N && proj.is_contiguous() && proj.numel() == B * N &&
                  dx.sizes() == x.sizes() && dx.scalar_type() == x.scalar_type() && scale.scalar_type() == at::kFloat &&
                  df.device() == x.device() && proj.device() == x.device() && scale.device() == x.device() &&
                  dx.device() == x.device(),
              "segkd_cpp::unnormalise: df [B, C, N] and proj [B, N] dense fp32, dx shaped like x in its dtype, scale "
              "fp32, all on x's device");
}

}  // namespace segkd
