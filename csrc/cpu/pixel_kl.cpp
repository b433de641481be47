// CPU twin of csrc/cuda/pixel_kl.cu: the same blocks of `block` pixels (one partial KL sum each), the same three
// passes over the classes (max, sum of exp, KD terms) and the same per-element math (segkd_math.h). A block is
// worked in tiles of kTile pixels whose x = z / T and exp(x - max) stay in a per-thread buffer between the passes
// (the CUDA kernel recomputes them instead): two expf per element pair. The tile's pixels are the inner loop, so
// NCHW logits (pixel stride 1, a specialised loop) are read contiguously and every pass vectorises; blocks run in
// parallel (at::parallel_for).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "../segkd_math.h"
#include "convert.h"

namespace segkd {
namespace {

constexpr int64_t kTile = 64;

template <typename scalar_t, bool kUnit>
void pixel_kl_blocks(const at::Tensor& s, const at::Tensor& t, const uint8_t* valid, float batch_scale,
                     const float* wscale, float* kl, at::Tensor& g, float temperature, bool write_grad,
                     int64_t block) {
  const int64_t C = s.size(1), HW = s.size(2) * s.size(3);
  const int64_t nblk = (HW + block - 1) / block;
  const Bchw ss = bchw_strides(s), ts = bchw_strides(t);
  const Bchw gs = write_grad ? bchw_strides(g) : ss;
  const scalar_t* sp = s.data_ptr<scalar_t>();
  const scalar_t* tp = t.data_ptr<scalar_t>();
  scalar_t* gp = write_grad ? g.data_ptr<scalar_t>() : nullptr;
  const float inv_t = 1.0f / temperature;

  at::parallel_for(0, s.size(0) * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(4 * C * kTile);
    float *xs = buf.data(), *xt = xs + C * kTile, *es = xt + C * kTile, *et = es + C * kTile;
    // per pixel of the tile: max, sum of exp, then log and inverse of the sum (a Softmax, kept as arrays)
    float ms[kTile], mt[kTile], ls[kTile], lt[kTile], is[kTile], it[kTile], acc[kTile];
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / nblk, b0 = (job % nblk) * block, b1 = std::min(b0 + block, HW);
      const float scale = wscale != nullptr ? temperature * wscale[b] : batch_scale;
      float total = 0.0f;
      for (int64_t p0 = b0; p0 < b1; p0 += kTile) {
        const int64_t n = std::min(kTile, b1 - p0);
        const scalar_t* s0 = sp + b * ss.b + p0 * ss.p;
        const scalar_t* t0 = tp + b * ts.b + p0 * ts.p;
        const uint8_t* v = valid != nullptr ? valid + b * HW + p0 : nullptr;
        // Each pass: the classes in order (the outer loop: one CUDA thread's loop over them), the tile's pixels in
        // SIMD lanes (the inner loop, vectorised; contiguous for NCHW).
        std::fill(ms, ms + n, kLowest);
        std::fill(mt, mt + n, kLowest);
        for (int64_t c = 0; c < C; ++c) {  // pass 1: x = z / T, kept, and its max per pixel
          const scalar_t* sr = s0 + c * ss.c;
          const scalar_t* tr = t0 + c * ts.c;
          float *xsc = xs + c * kTile, *xtc = xt + c * kTile;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            xsc[i] = load<scalar_t, kUnit>(sr, i, ss.p) * inv_t;
            xtc[i] = load<scalar_t, kUnit>(tr, i, ts.p) * inv_t;
            ms[i] = max2(ms[i], xsc[i]);
            mt[i] = max2(mt[i], xtc[i]);
          }
        }
        std::fill(ls, ls + n, 0.0f);  // the sums of exp, then their logs
        std::fill(lt, lt + n, 0.0f);
        for (int64_t c = 0; c < C; ++c) {  // pass 2: e = exp(x - max), kept, and its sum
          const float *xsc = xs + c * kTile, *xtc = xt + c * kTile;
          float *esc = es + c * kTile, *etc = et + c * kTile;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            esc[i] = exp_shifted(xsc[i], ms[i]);
            etc[i] = exp_shifted(xtc[i], mt[i]);
            ls[i] += esc[i];
            lt[i] += etc[i];
          }
        }
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const Softmax student = softmax_stats(ms[i], ls[i]), teacher = softmax_stats(mt[i], lt[i]);
          ls[i] = student.log_sum;
          is[i] = student.inv_sum;
          lt[i] = teacher.log_sum;
          it[i] = teacher.inv_sum;
          acc[i] = 0.0f;
        }
        for (int64_t c = 0; c < C; ++c) {  // pass 3: the KL of each pixel and, if asked, its gradient
          const float *xsc = xs + c * kTile, *xtc = xt + c * kTile, *esc = es + c * kTile, *etc = et + c * kTile;
          scalar_t* gr = write_grad ? gp + b * gs.b + c * gs.c + p0 * gs.p : nullptr;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const KdTerm k = kd_term(xsc[i], esc[i], {ms[i], ls[i], is[i]}, xtc[i], etc[i], {mt[i], lt[i], it[i]},
                                     scale);
            acc[i] += k.kl;
            if (write_grad) {
              gr[kUnit ? i : i * gs.p] = from_float<scalar_t>(v == nullptr || v[i] != 0 ? k.grad : 0.0f);
            }
          }
        }
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          acc[i] = v == nullptr || v[i] != 0 ? acc[i] : 0.0f;
        }
        for (int64_t i = 0; i < n; ++i) {  // in pixel order: deterministic
          total += acc[i];
        }
      }
      kl[job] = total;
    }
  });
}

}  // namespace

void pixel_kl_cpu(const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& valid,
                  const at::Tensor& nvalid, const c10::optional<at::Tensor>& wscale, at::Tensor& kl, at::Tensor& g,
                  double temperature, bool write_grad, int64_t block) {
  TORCH_CHECK(s.dim() == 4 && s.sizes() == t.sizes() && s.scalar_type() == t.scalar_type(),
              "segkd_cpp::pixel_kl: student and teacher must be [B, C, H, W] of one dtype");
  TORCH_CHECK(kl.is_contiguous() && kl.scalar_type() == at::kFloat, "segkd_cpp::pixel_kl: kl must be dense fp32");
  const uint8_t* v = valid.has_value() ? valid->data_ptr<uint8_t>() : nullptr;
  const float* w = wscale.has_value() ? wscale->data_ptr<float>() : nullptr;
  const float batch_scale = static_cast<float>(temperature) / std::max(nvalid.item<float>(), 1.0f);
  const bool unit = bchw_strides(s).p == 1 && bchw_strides(t).p == 1 && (!write_grad || bchw_strides(g).p == 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "segkd_pixel_kl_cpu", [&] {
    const float temp = static_cast<float>(temperature);
    if (unit) {
      pixel_kl_blocks<scalar_t, true>(s, t, v, batch_scale, w, kl.data_ptr<float>(), g, temp, write_grad, block);
    } else {
      pixel_kl_blocks<scalar_t, false>(s, t, v, batch_scale, w, kl.data_ptr<float>(), g, temp, write_grad, block);
    }
  });
}

}  // namespace segkd
