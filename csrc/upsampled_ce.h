// The backward of upsampled_cross_entropy (kernels/upsampled_ce.py) as one tile algorithm that the CUDA kernel
// (csrc/cuda/upsampled_ce.cu, a CUDA block per tile) and its CPU twin (csrc/cpu/upsampled_ce.cpp, a task per tile)
// both run: the same phases, loops, ranges and ownership, so that the CPU build checks not only the per-element math
// but the gather itself (which output pixels reach which low-res gradient elements). Only the `Block` differs: the
// CUDA block's threads share each phase's elements and synchronise between phases; the CPU task is one "thread"
// walking them all in order.
//
// A tile is image b, low-res rows [i0, i0 + kCeTH), columns [j0, j0 + kCeTW) and classes [k0, k0 + kCeKC) of the
// gradient dL/dx, x [B, K, h, w] logits. It is a gather, without atomics: for every output row oy whose stencil
// reaches the tile's rows, and the output columns reaching its columns in chunks of kCeOW,
//   A. per output pixel: its label, whether it counts, and the log-sum-exp over all K classes of the interpolated
//      logits (two passes: max, then the sum of exp), recomputed from the low-res logits (nothing full-resolution
//      is ever stored);
//   B. per (class of the tile, pixel): d = (softmax - onehot) * g, g = grad_output / |V| on counted pixels, else 0;
//   C. per (class, low-res column j): E = sum over the chunk's pixels of d times their horizontal weight on j, added
//      to the accumulator of (class, row, j) for the row's two vertical neighbours that fall in the tile.
// Each accumulator column (class, j) is owned by one thread of phase C across the whole loop (a fixed order of
// additions: deterministic), and every gradient element is written once, by its tile.
#pragma once

#include <cstdint>

#include "ops.h"
#include "segkd_math.h"

namespace segkd {

constexpr int64_t kCeTH = 4;    // low-res rows per tile
constexpr int64_t kCeTW = 16;   // low-res columns per tile
constexpr int64_t kCeKC = 32;   // classes per tile
constexpr int64_t kCeOW = 128;  // output pixels per chunk of a row

// Geometry of one call: logits x [B, K, h, w] (element strides xb, xc, xp), labels y [B, H, W] (contiguous),
// gradient g like x (strides gb, gc, gp).
struct CeGeometry {
  int64_t K, h, w, H, W, ignore_index;
  int64_t xb, xc, xp, gb, gc, gp;
  float scale_h, scale_w;  // h / H, w / W
  float inv_h, inv_w;      // H / h, W / w
};

// The geometry of logits [B, K, h, w] (strides xs) upsampled to labels [B, H, W], gradient strides gs.
inline CeGeometry ce_geometry(int64_t K, int64_t h, int64_t w, int64_t H, int64_t W, int64_t ignore_index,
                              const Bchw& xs, const Bchw& gs) {
  return {K, h, w, H, W, ignore_index, xs.b, xs.c, xs.p, gs.b, gs.c, gs.p,
          static_cast<float>(static_cast<double>(h) / H), static_cast<float>(static_cast<double>(w) / W),
          static_cast<float>(static_cast<double>(H) / h), static_cast<float>(static_cast<double>(W) / w)};
}

// A tile's working memory: a CUDA block's shared memory, a CPU task's buffer (28.5 KB).
struct CeTile {
  float acc[kCeKC * kCeTH * kCeTW];  // [class, row, column] of the tile's gradient
  float d[kCeKC * kCeOW];            // phase B's [class, pixel] of the chunk
  float lse[kCeOW];
  float g[kCeOW];    // grad_output / |V| on counted pixels, 0 elsewhere
  int32_t y[kCeOW];  // the label of counted pixels, -1 elsewhere
  Source col[kCeOW];  // each pixel's column stencil (phase A's, reused by B and C)
};

// One CPU task walking a tile's elements in order.
struct SerialBlock {
  template <class F>
  void for_each(int64_t n, F f) const {
    for (int64_t i = 0; i < n; ++i) f(i);
  }
  template <class F>
  void for_each2(int64_t n0, int64_t n1, F f) const {
    for (int64_t i = 0; i < n0; ++i)
      for (int64_t j = 0; j < n1; ++j) f(i, j);
  }
  void sync() const {}
};

// The interpolated logit z[b, k] at the output pixel whose row stencil is (r, wy) and column stencil (c, wx).
template <typename scalar_t>
SEGKD_HD float interpolated(const scalar_t* x, const CeGeometry& G, int64_t b, int64_t k, const Source& r,
                            const Source& c) {
  const scalar_t* xk = x + b * G.xb + k * G.xc;
  const auto at = [&](int64_t i, int64_t j) { return static_cast<float>(xk[(i * G.w + j) * G.xp]); };
  return bilinear(at(r.i0, c.i0), at(r.i0, c.i1), at(r.i1, c.i0), at(r.i1, c.i1), c.w1, r.w1);
}

// The log-sum-exp over the K classes at one output pixel (two passes over the interpolated logits).
template <typename scalar_t>
SEGKD_HD float pixel_lse(const scalar_t* x, const CeGeometry& G, int64_t b, const Source& r, const Source& c) {
  float m = kLowest, sum = 0.0f;
  for (int64_t k = 0; k < G.K; ++k) m = max2(m, interpolated(x, G, b, k, r, c));
  for (int64_t k = 0; k < G.K; ++k) sum += exp_shifted(interpolated(x, G, b, k, r, c), m);
  return log_sum_exp(m, sum);
}

// The tile (b, i0, j0, k0) of dL/dx into g; g_scale = grad_output / max(|V|, 1). T: the tile's working memory.
template <typename scalar_t, typename label_t, class Block>
SEGKD_HD void ce_backward_tile(const scalar_t* x, const label_t* y, float g_scale, scalar_t* g, const CeGeometry& G,
                               int64_t b, int64_t i0, int64_t j0, int64_t k0, CeTile& T, const Block& blk) {
  blk.for_each(kCeKC * kCeTH * kCeTW, [=, &T](int64_t e) { T.acc[e] = 0.0f; });
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
      blk.for_each(n, [=, &T](int64_t t) {  // A: label, weight and log-sum-exp of each output pixel
        const int64_t ox = c0 + t;
        const int64_t label = static_cast<int64_t>(yb[oy * G.W + ox]);
        const bool counted = counted_label(label, G.K, G.ignore_index);
        T.y[t] = counted ? static_cast<int32_t>(label) : -1;
        T.g[t] = counted ? g_scale : 0.0f;
        T.col[t] = bilinear_source(ox, G.scale_w, G.w);
        T.lse[t] = pixel_lse(x, G, b, r, T.col[t]);
      });
      blk.sync();
      blk.for_each2(kCeKC, n, [=, &T](int64_t kk, int64_t t) {  // B: (softmax - onehot) * g of the tile's classes
        const int64_t k = k0 + kk;
        T.d[kk * kCeOW + t] =
            k < G.K ? ce_grad(interpolated(x, G, b, k, r, T.col[t]), T.lse[t], T.y[t] == k, T.g[t]) : 0.0f;
      });
      blk.sync();
      blk.for_each2(kCeKC, kCeTW, [=, &T](int64_t kk, int64_t jj) {  // C: through the transposed interpolation
        const int64_t j = j0 + jj;
        if (k0 + kk >= G.K || j >= G.w) return;
        int64_t lo, hi;
        reaching(j, 1, G.inv_w, G.W, lo, hi);
        lo = lo > c0 ? lo : c0;
        hi = hi < c0 + n ? hi : c0 + n;
        float e = 0.0f;
        for (int64_t t = lo - c0; t < hi - c0; ++t) {
          const Source& c = T.col[t];
          const float wj = (c.i0 == j ? 1.0f - c.w1 : 0.0f) + (c.i1 == j ? c.w1 : 0.0f);
          e += T.d[kk * kCeOW + t] * wj;
        }
        float* col = T.acc + kk * kCeTH * kCeTW + jj;
        if (in0) col[r0 * kCeTW] += e * (1.0f - r.w1);
        if (in1) col[r1 * kCeTW] += e * r.w1;
      });
      blk.sync();  // phase B of the next chunk overwrites d
    }
  }
  blk.for_each(kCeKC * kCeTH * kCeTW, [=, &T](int64_t e) {  // each element of the tile written once
    const int64_t k = k0 + e / (kCeTH * kCeTW), i = i0 + (e / kCeTW) % kCeTH, j = j0 + e % kCeTW;
    if (k < G.K && i < G.h && j < G.w) g[b * G.gb + k * G.gc + (i * G.w + j) * G.gp] = static_cast<scalar_t>(T.acc[e]);
  });
}

}  // namespace segkd
