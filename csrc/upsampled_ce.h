// The backward of upsampled_cross_entropy (kernels/upsampled_ce.py) as one tile algorithm that the CUDA kernel
// (csrc/cuda/upsampled_ce.cu, a CUDA block per tile) and its CPU twin (csrc/cpu/upsampled_ce.cpp, a task per tile)
// both run: the same phases, loops, ranges and ownership, so that the CPU build checks not only the per-element math
// but the gather itself (which output pixels reach which low-res gradient elements). Only the `Block` differs: the
// CUDA block's threads share each phase's elements and synchronise between phases; the CPU task is one "thread"
// walking them all in order.
//
// A tile is image b, low-res rows [i0, i0 + kCeTH), columns [j0, j0 + kCeTW) and a group of up to kCeKG classes
// [k0, k0 + kCeKG) of the gradient dL/dx, x [B, K, h, w] logits (every class of the common segmentation label sets,
// K = 19, 21, 150, 171, is one group). It is a gather, without atomics: for every output row oy whose stencil
// reaches the tile's rows, and the output columns reaching its columns in chunks of kCeOW,
//   A. per output pixel: its label, whether it counts, its column stencil, and the log-sum-exp over all K classes of
//      the interpolated logits (two passes: max, then the sum of exp), recomputed from the low-res logits (nothing
//      full-resolution is ever stored), once per tile and row chunk;
//   then per chunk of kCeKC of the group's classes:
//   B. per (class, pixel): d = (softmax - onehot) * g, g = grad_output / |V| on counted pixels, else 0;
//   C. per (class, low-res column j): E = sum over the chunk's pixels of d times their horizontal weight on j, added
//      to the accumulator of (class, row, j) for the row's two vertical neighbours that fall in the tile.
// Phase C updates each accumulator element once per (row, chunk), between barriers: a fixed order of additions
// (deterministic); every gradient element is written once, by its tile. Each output pixel's log-sum-exp is computed
// by the ~(kCeTH + 1)(kCeTW + 1) / (kCeTH kCeTW) tiles its stencil reaches (1.1x at 8x upsampling), once per group.
#pragma once

#include <cstdint>

#include "ops.h"
#include "segkd_math.h"
#if defined(__CUDACC__)
namespace segkd {  // loads and stores: the types' own conversions on the device
template <typename T>
__host__ __device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}
template <typename T>
__host__ __device__ __forceinline__ T from_float(float f) {
  return static_cast<T>(f);
}
}  // namespace segkd
#else
#include "cpu/convert.h"  // vectorisable bf16 conversions on the CPU
#endif

namespace segkd {

constexpr int64_t kCeTH = 4;    // low-res rows per tile
constexpr int64_t kCeTW = 8;    // low-res columns per tile
constexpr int64_t kCeKG = 256;  // classes per tile (a group)
constexpr int64_t kCeKC = 32;   // classes per chunk of phases B and C
constexpr int64_t kCeOW = 80;   // output pixels per chunk of a row: the 75 that reach a tile at 8x, in one

// Geometry of one call: logits x [B, K, h, w] (element strides xb, xc, xp), labels y [B, H, W] (contiguous),
// gradient g like x (strides gb, gc, gp).
struct CeGeometry {
  int64_t K, h, w, H, W, ignore_index;
  int64_t xb, xc, xp, gb, gc, gp;
  float scale_h, scale_w;  // h / H, w / W
  float inv_h, inv_w;      // H / h, W / w
};

// The geometry of logits x [B, K, h, w] upsampled to labels y [B, H, W], the gradient's strides gs.
inline CeGeometry ce_geometry(const at::Tensor& x, const at::Tensor& y, int64_t ignore_index, const Bchw& gs) {
  const int64_t h = x.size(2), w = x.size(3), H = y.size(1), W = y.size(2);
  const Bchw xs = bchw_strides(x);
  return {x.size(1), h, w, H, W, ignore_index, xs.b, xs.c, xs.p, gs.b, gs.c, gs.p,
          static_cast<float>(static_cast<double>(h) / H), static_cast<float>(static_cast<double>(w) / W),
          static_cast<float>(static_cast<double>(H) / h), static_cast<float>(static_cast<double>(W) / w)};
}

// The arguments of both implementations (shapes, dtypes, devices), checked in one place.
inline void ce_check(const at::Tensor& x, const at::Tensor& y, const char* name) {
  TORCH_CHECK(x.dim() == 4 && y.dim() == 3 && y.size(0) == x.size(0), name,
              ": logits must be [B, K, h, w] and labels [B, H, W]");
  TORCH_CHECK(y.is_contiguous() && y.device() == x.device(), name,
              ": labels must be contiguous, on the logits' device");
}

inline void ce_check_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& loss,
                             const at::Tensor& count, int64_t block) {
  ce_check(x, y, "segkd_cpp::upsampled_ce");
  const int64_t nblk = (y.size(1) * y.size(2) + block - 1) / block;
  TORCH_CHECK(loss.numel() == x.size(0) * nblk && count.numel() == loss.numel() && loss.is_contiguous() &&
                  count.is_contiguous() && loss.scalar_type() == at::kFloat && count.scalar_type() == at::kFloat &&
                  loss.device() == x.device() && count.device() == x.device(),
              "segkd_cpp::upsampled_ce: loss and count must be dense fp32 [B, ceil(H*W / block)] on the logits' "
              "device");
}

inline void ce_check_backward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& g) {
  ce_check(x, y, "segkd_cpp::upsampled_ce_backward");
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type() && scale.scalar_type() == at::kFloat &&
                  g.device() == x.device() && scale.device() == x.device(),
              "segkd_cpp::upsampled_ce_backward: g must be shaped like the logits, in their dtype, and scale fp32, "
              "both on the logits' device");
}

// A tile's working memory: a CUDA block's shared memory, a CPU task's buffer (44.2 KB). Per-pixel arrays are
// structures of arrays, so that the CPU twin's loops over pixels vectorise.
struct CeTile {
  float acc[kCeKG * kCeTH * kCeTW];  // [class, row, column] of the tile's gradient
  float d[kCeKC * kCeOW];            // phase B's [class, pixel] of the chunk
  float lse[kCeOW];  // the running max, then the log-sum-exp
  float sum[kCeOW];  // the sum of exp
  float g[kCeOW];    // grad_output / |V| on counted pixels, 0 elsewhere
  int32_t y[kCeOW];  // the label of counted pixels, -1 elsewhere
  int32_t c0[kCeOW], c1[kCeOW];  // each pixel's column stencil: its two low-res columns
  float cw[kCeOW];               // and the weight of the upper one
};

// One CPU task walking a tile's elements. The elements of a phase are independent (a CUDA block's threads run them
// at once), so the loops may run them in SIMD lanes.
struct SerialBlock {
  template <class F>
  void for_each(int64_t n, F f) const {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) f(i);
  }
  template <class F>
  void for_each2(int64_t n0, int64_t n1, F f) const {
    for (int64_t i = 0; i < n0; ++i) {
#pragma omp simd
      for (int64_t j = 0; j < n1; ++j) f(i, j);
    }
  }
  void sync() const {}
};

// The interpolated logit z[b, k] at the output pixel whose row stencil is (r, wy) and column stencil (c, wx).
template <typename scalar_t>
SEGKD_HD float interpolated(const scalar_t* x, const CeGeometry& G, int64_t b, int64_t k, const Source& r,
                            const Source& c) {
  const scalar_t* xk = x + b * G.xb + k * G.xc;
  const auto at = [&](int64_t i, int64_t j) { return to_float(xk[(i * G.w + j) * G.xp]); };
  return bilinear(at(r.i0, c.i0), at(r.i0, c.i1), at(r.i1, c.i0), at(r.i1, c.i1), c.w1, r.w1);
}

// The log-sum-exp over the K classes at one output pixel: the max of the interpolated logits, then the sum of exp,
// classes in order (the CUDA forward; the backward's phase A and the CPU forward run the same passes pixel-parallel).
template <typename scalar_t>
SEGKD_HD float pixel_lse(const scalar_t* x, const CeGeometry& G, int64_t b, const Source& r, const Source& c) {
  float m = kLowest, sum = 0.0f;
  for (int64_t k = 0; k < G.K; ++k) m = max2(m, interpolated(x, G, b, k, r, c));
  for (int64_t k = 0; k < G.K; ++k) sum += exp_shifted(interpolated(x, G, b, k, r, c), m);
  return log_sum_exp(m, sum);
}

// The interpolated logit of class k at the chunk's pixel t (row stencil r).
template <typename scalar_t>
SEGKD_HD float interpolated(const scalar_t* x, const CeGeometry& G, int64_t b, int64_t k, const Source& r,
                            const CeTile& T, int64_t t) {
  return interpolated(x, G, b, k, r, Source{T.c0[t], T.c1[t], T.cw[t]});
}

// The tile (b, i0, j0, group from class k0) of dL/dx into g; g_scale = grad_output / max(|V|, 1). T: the tile's
// working memory.
template <typename scalar_t, typename label_t, class Block>
SEGKD_HD void ce_backward_tile(const scalar_t* x, const label_t* y, float g_scale, scalar_t* g, const CeGeometry& G,
                               int64_t b, int64_t i0, int64_t j0, int64_t k0, CeTile& T, const Block& blk) {
  const int64_t kg = G.K - k0 < kCeKG ? G.K - k0 : kCeKG;  // the group's classes
  blk.for_each(kg * kCeTH * kCeTW, [=, &T](int64_t e) { T.acc[e] = 0.0f; });
  blk.sync();
  int64_t oy_lo, oy_hi, ox_lo, ox_hi;
  reaching(i0, kCeTH, G.inv_h, G.H, oy_lo, oy_hi);
  reaching(j0, kCeTW, G.inv_w, G.W, ox_lo, ox_hi);
  const label_t* yb = y + b * G.H * G.W;
  for (int64_t oy = oy_lo; oy < oy_hi; ++oy) {
    const Source r = bilinear_source(oy, G.scale_h, G.h);
    const int64_t r0 = r.i0 - i0, r1 = r.i1 - i0;  // the row's two neighbours, as rows of the tile
    const bool in0 = r0 >= 0 && r0 < kCeTH, in1 = r1 >= 0 && r1 < kCeTH;
    if (!in0 && !in1) continue;  // the same for every thread of the block
    for (int64_t c0 = ox_lo; c0 < ox_hi; c0 += kCeOW) {
      const int64_t n = ox_hi - c0 < kCeOW ? ox_hi - c0 : kCeOW;
      blk.for_each(n, [=, &T](int64_t t) {  // A: label, weight and stencil of each output pixel
        const int64_t ox = c0 + t;
        const int64_t label = static_cast<int64_t>(yb[oy * G.W + ox]);
        const bool counted = counted_label(label, G.K, G.ignore_index);
        const Source c = bilinear_source(ox, G.scale_w, G.w);
        T.y[t] = counted ? static_cast<int32_t>(label) : -1;
        T.g[t] = counted ? g_scale : 0.0f;
        T.c0[t] = static_cast<int32_t>(c.i0);
        T.c1[t] = static_cast<int32_t>(c.i1);
        T.cw[t] = c.w1;
        T.lse[t] = kLowest;
        T.sum[t] = 0.0f;
      });
      // and the log-sum-exp over all K classes: the max, then the sum of exp. Each pixel t stays with one thread
      // (the same mapping in every loop), so the class loops need no barrier.
      for (int64_t k = 0; k < G.K; ++k) {
        blk.for_each(n, [=, &T](int64_t t) { T.lse[t] = max2(T.lse[t], interpolated(x, G, b, k, r, T, t)); });
      }
      for (int64_t k = 0; k < G.K; ++k) {
        blk.for_each(n, [=, &T](int64_t t) {
          T.sum[t] += exp_shifted(interpolated(x, G, b, k, r, T, t), T.lse[t]);
        });
      }
      blk.for_each(n, [=, &T](int64_t t) { T.lse[t] = log_sum_exp(T.lse[t], T.sum[t]); });
      blk.sync();
      for (int64_t kc0 = 0; kc0 < kg; kc0 += kCeKC) {
        const int64_t kc = kg - kc0 < kCeKC ? kg - kc0 : kCeKC;
        blk.for_each2(kc, n, [=, &T](int64_t kk, int64_t t) {  // B: (softmax - onehot) * g of the chunk's classes
          const int64_t k = k0 + kc0 + kk;
          T.d[kk * kCeOW + t] = ce_grad(interpolated(x, G, b, k, r, T, t), T.lse[t], T.y[t] == k, T.g[t]);
        });
        blk.sync();
        blk.for_each2(kc, kCeTW, [=, &T](int64_t kk, int64_t jj) {  // C: through the transposed interpolation
          const int64_t j = j0 + jj;
          if (j >= G.w) return;
          int64_t lo, hi;
          reaching(j, 1, G.inv_w, G.W, lo, hi);
          lo = lo > c0 ? lo : c0;
          hi = hi < c0 + n ? hi : c0 + n;
          float e = 0.0f;
          for (int64_t t = lo - c0; t < hi - c0; ++t) {
            const float wj = (T.c0[t] == j ? 1.0f - T.cw[t] : 0.0f) + (T.c1[t] == j ? T.cw[t] : 0.0f);
            e += T.d[kk * kCeOW + t] * wj;
          }
          float* col = T.acc + (kc0 + kk) * kCeTH * kCeTW + jj;
          if (in0) col[r0 * kCeTW] += e * (1.0f - r.w1);
          if (in1) col[r1 * kCeTW] += e * r.w1;
        });
        blk.sync();  // phase B of the next chunk overwrites d, phase A of the next row chunk the pixels
      }
    }
  }
  blk.for_each(kg * kCeTH * kCeTW, [=, &T](int64_t e) {  // each element of the tile written once
    const int64_t k = k0 + e / (kCeTH * kCeTW), i = i0 + (e / kCeTW) % kCeTH, j = j0 + e % kCeTW;
    if (i < G.h && j < G.w) g[b * G.gb + k * G.gc + (i * G.w + j) * G.gp] = from_float<scalar_t>(T.acc[e]);
  });
}

}  // namespace segkd
