// CPU twin of csrc/cuda/pairwise.cu: the Gram products of pairwise_similarity_loss with the features normalised as
// they are loaded (segkd_math.h's `normalised`), fp32 accumulation in the order of the reduction index, as each CUDA
// thread accumulates its outputs; the backward's dF = G1 F1 - G2 F2 with its per-row-block share of <F1, dF>_C, and
// the gradient through the normalisation (`unnormalised_grad`).
//
// Both products are C[kB, kB] tiles of A^T B, added by a register-blocked rank update kMR rows at a time, the tile's
// columns in SIMD lanes; one task per (image, row block, column block) (at::parallel_for). The features are
// normalised as they are packed, once per call, into fp32 copies laid out for the update (pixel-major for the Gram,
// channel-major for dF): unlike the CUDA kernels, which normalise every tile's panels as they load them, the CPU
// twin does keep a normalised copy, as the torch path does.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "../pairwise.h"
#include "../segkd_math.h"
#include "convert.h"

namespace segkd {
namespace {

constexpr int64_t kB = kPairTile;  // rows and columns of an output tile
constexpr int64_t kNC = 256;  // channels per packed Gram panel of gram_apply
constexpr int64_t kMR = 4;    // rows of the tile per rank update (kMR x kB accumulators in registers)

int64_t padded(int64_t n) { return (n + kB - 1) / kB * kB; }

// acc [kB, kB] += A^T B over kc steps, A[k * lda + i] and B[k * ldb + j] (i, j < kB): every output accumulates its
// kc products in order.
void rank_update(float* acc, const float* A, int64_t lda, const float* B, int64_t ldb, int64_t kc) {
  for (int64_t m0 = 0; m0 < kB; m0 += kMR) {
    float c[kMR][kB];
    for (int64_t r = 0; r < kMR; ++r) std::copy(acc + (m0 + r) * kB, acc + (m0 + r + 1) * kB, c[r]);
    for (int64_t k = 0; k < kc; ++k) {
      const float* b = B + k * ldb;
#pragma GCC unroll 4
      for (int64_t r = 0; r < kMR; ++r) {
        const float a = A[k * lda + m0 + r];
#pragma omp simd
        for (int64_t p = 0; p < kB; ++p) c[r][p] += a * b[p];
      }
    }
    for (int64_t r = 0; r < kMR; ++r) std::copy(c[r], c[r] + kB, acc + (m0 + r) * kB);
  }
}

// The normalised features of every image, packed once (in parallel) for the tiles to share:
// pixel-major P[b][n][c] (padded to a multiple of kB channels with zeros) for the Gram (a reduction over pixels), or
// channel-major P[b][c][n] (padded pixels) for dF (a reduction over channels).
template <typename scalar_t>
void pack_features(const at::Tensor& x, const float* r, bool pixel_major, std::vector<float>& P) {
  const Bchw xs = bchw_strides(x);
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2) * x.size(3);
  const int64_t Cp = pixel_major ? padded(C) : C, Np = pixel_major ? N : padded(N);
  P.assign(B * Cp * Np, 0.0f);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  at::parallel_for(0, B * C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / C, c = row % C;
      const scalar_t* xr = xp + b * xs.b + c * xs.c;
      const float* rb = r + b * N;
      float* out = P.data() + b * Cp * Np + (pixel_major ? c : c * Np);
      const int64_t step = pixel_major ? Cp : 1;
      for (int64_t n = 0; n < N; ++n) out[n * step] = normalised(to_float(xr[n * xs.p]), rb[n]);
    }
  });
}

void packed(const at::Tensor& x, const at::Tensor& r, bool pixel_major, std::vector<float>& P) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segkd_pairwise_pack_cpu",
                                  [&] { pack_features<scalar_t>(x, r.data_ptr<float>(), pixel_major, P); });
}

// P[k, i] = sign * G[b, m0 + i, c0 + k] (any strides), zero beyond the rows: a panel of dF's Gram.
void pack_gram(const at::Tensor& G, float sign, int64_t b, int64_t m0, int64_t c0, int64_t kc, float* P) {
  const float* g = G.data_ptr<float>() + b * G.stride(0);
  const int64_t nm = std::min(kB, G.size(1) - m0);
  std::fill(P, P + kc * kB, 0.0f);
  for (int64_t i = 0; i < nm; ++i)
    for (int64_t k = 0; k < kc; ++k) P[k * kB + i] = sign * g[(m0 + i) * G.stride(1) + (c0 + k) * G.stride(2)];
}

bool same_features(const at::Tensor& x, const at::Tensor& rx, const at::Tensor& y, const at::Tensor& ry) {
  return x.is_same(y) && rx.is_same(ry);
}

}  // namespace

void gram_cpu(const at::Tensor& x, const at::Tensor& rx, const at::Tensor& y, const at::Tensor& ry, at::Tensor& g) {
  check_gram(x, rx, y, ry, g);
  const int64_t B = x.size(0), M = x.size(1), P = y.size(1), N = rx.size(1);
  std::vector<float> xpk, ypk;
  packed(x, rx, true, xpk);  // [B, N, Mp]
  const bool same = same_features(x, rx, y, ry);  // G_ss, G_tt: one packed copy serves both operands
  if (!same) packed(y, ry, true, ypk);
  const std::vector<float>& yp = same ? xpk : ypk;
  const int64_t Mp = padded(M), Pp = padded(P), nm = Mp / kB, np = Pp / kB;
  float* gp = g.data_ptr<float>();
  at::parallel_for(0, B * nm * np, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kB * kB);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / (nm * np), m0 = (job / np % nm) * kB, p0 = job % np * kB;
      std::fill(acc.begin(), acc.end(), 0.0f);
      rank_update(acc.data(), xpk.data() + b * N * Mp + m0, Mp, yp.data() + b * N * Pp + p0, Pp, N);
      for (int64_t i = 0; i < std::min(kB, M - m0); ++i)
        for (int64_t j = 0; j < std::min(kB, P - p0); ++j) gp[(b * M + m0 + i) * P + p0 + j] = acc[i * kB + j];
    }
  });
}

void gram_apply_cpu(const at::Tensor& g1, const at::Tensor& x1, const at::Tensor& r1, const at::Tensor& g2,
                    const at::Tensor& x2, const at::Tensor& r2, at::Tensor& df, at::Tensor& proj) {
  check_gram_apply(g1, x1, r1, g2, x2, r2, df, proj);
  const int64_t B = x1.size(0), C1 = x1.size(1), C2 = x2.size(1), N = r1.size(1), nm = (C1 + kB - 1) / kB;
  std::vector<float> f1, f2;
  packed(x1, r1, false, f1);  // [B, C1, Np]
  packed(x2, r2, false, f2);  // [B, C2, Np]
  const int64_t Np = padded(N), nn = Np / kB;
  float *dp = df.data_ptr<float>(), *pp = proj.data_ptr<float>();
  at::parallel_for(0, B * nm * nn, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kB * kB), A(kNC * kB);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / (nm * nn), mb = job / nn % nm, m0 = mb * kB, n0 = job % nn * kB;
      const int64_t rows = std::min(kB, C1 - m0), cols = std::min(kB, N - n0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      const auto accumulate = [&](const at::Tensor& G, float sign, const std::vector<float>& f, int64_t C) {
        for (int64_t c0 = 0; c0 < C; c0 += kNC) {  // acc += sign G F over C channels
          const int64_t kc = std::min(kNC, C - c0);
          pack_gram(G, sign, b, m0, c0, kc, A.data());
          rank_update(acc.data(), A.data(), kB, f.data() + (b * C + c0) * Np + n0, Np, kc);
        }
      };
      accumulate(g1, 1.0f, f1, C1);   // + G1 F1
      accumulate(g2, -1.0f, f2, C2);  // - G2 F2
      // the tile's own rows of F1, for its share of <F1, dF>_C (summed over the row blocks in kernels/pairwise.py)
      float* pr = pp + (b * nm + mb) * N + n0;
      std::fill(pr, pr + cols, 0.0f);
      for (int64_t i = 0; i < rows; ++i) {
        float* out = dp + (b * C1 + m0 + i) * N + n0;
        const float* f = f1.data() + (b * C1 + m0 + i) * Np + n0;
        for (int64_t j = 0; j < cols; ++j) {
          out[j] = acc[i * kB + j];
          pr[j] += f[j] * acc[i * kB + j];
        }
      }
    }
  });
}

void unnormalise_cpu(const at::Tensor& x, const at::Tensor& r, const at::Tensor& df, const at::Tensor& proj,
                     const at::Tensor& scale, at::Tensor& dx) {
  check_unnormalise(x, r, df, proj, scale, dx);
  const int64_t B = x.size(0), C = x.size(1), N = r.size(1);
  const float s = scale.item<float>();  // CPU memory: no device sync
  const Bchw xs = bchw_strides(x), ds = bchw_strides(dx);
  const float *rp = r.data_ptr<float>(), *dfp = df.data_ptr<float>(), *pp = proj.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segkd_unnormalise_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / C, c = row % C;
        const scalar_t* xr = xp + b * xs.b + c * xs.c;
        scalar_t* out = dxp + b * ds.b + c * ds.c;
        const float *rr = rp + b * N, *pr = pp + b * N, *dr = dfp + row * N;
        for (int64_t n = 0; n < N; ++n) {
          const float f = normalised(to_float(xr[n * xs.p]), rr[n]);
          out[n * ds.p] = from_float<scalar_t>(unnormalised_grad(dr[n], f, pr[n], rr[n], s));
        }
      }
    });
  });
}

}  // namespace segkd
