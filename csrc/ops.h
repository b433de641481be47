// Declarations of segkd's C++ kernels: each op has a CPU twin (csrc/cpu/<op>.cpp) and, in a CUDA build, a CUDA
// kernel (csrc/cuda/<op>.cu) with the same signature; csrc/ops.cpp registers both under one TORCH_LIBRARY.
//
// The ops are kernels, not whole losses: kernels/<op>.py allocates their outputs (poisoned under the tests), computes
// the small per-batch scalars, and reduces the per-block partial sums, exactly as around its Triton launch; the C++
// kernel replaces the Triton launch. Tensors are [B, C, H, W] whose H and W strides merge into one pixel stride
// (NCHW and channels-last both do: kernels._dispatch.strided_bchw guarantees it), read in place through strides.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

// Label tensors of the C++ kernels: int64, int32 or uint8 (kernels/<op>.py converts any other integer dtype).
#define SEGKD_DISPATCH_LABELS(TYPE, NAME, ...)                                                          \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kLong, __VA_ARGS__) AT_DISPATCH_CASE(at::kInt, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kByte, __VA_ARGS__))

namespace segkd {

// (batch, channel, pixel) element strides of a [B, C, H, W] tensor whose H and W strides merge
struct Bchw {
  int64_t b, c, p;
};

inline Bchw bchw_strides(const at::Tensor& x) {
  const int64_t h = x.size(2), w = x.size(3);
  const int64_t p = h == 1 ? x.stride(3) : (w == 1 ? x.stride(2) : x.stride(3));
  return {x.stride(0), x.stride(1), p};
}

// pixel_kl (kernels/pixel_kl.py): per block of `block` pixels of image b, the sum over its valid pixels of
// sum_c p_t (log p_t - log p_s) into kl[b, block index], and (write_grad) dL/dz_s for grad_output = 1 into g:
// grad_scale (p_s - p_t) on valid pixels, 0 elsewhere, grad_scale = T / max(nvalid, 1) or T * wscale[b].
void pixel_kl_cpu(const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& valid,
                  const at::Tensor& nvalid, const c10::optional<at::Tensor>& wscale, at::Tensor& kl, at::Tensor& g,
                  double temperature, bool write_grad, int64_t block);
void pixel_kl_cuda(const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& valid,
                   const at::Tensor& nvalid, const c10::optional<at::Tensor>& wscale, at::Tensor& kl, at::Tensor& g,
                   double temperature, bool write_grad, int64_t block);

// channel_kl (kernels/channel_kl.py): per row (b, c) of H*W logits, sum_hw q_t (log q_t - log q_s) into
// kl[b * C + c], and (write_grad) T scale / (B*C) (q_s - q_t) into g.
void channel_kl_cpu(const at::Tensor& s, const at::Tensor& t, at::Tensor& kl, at::Tensor& g, double temperature,
                    double scale, bool write_grad);
void channel_kl_cuda(const at::Tensor& s, const at::Tensor& t, at::Tensor& kl, at::Tensor& g, double temperature,
                     double scale, bool write_grad);

// angular_loss (kernels/angular.py), mode 0 layer, 1 channel, 2 point. Groups: samples b (layer: elements (c, p)
// in logical NCHW order), rows (b, c) (channel: elements p), pixels (b, p) (point: elements c). Layer and channel
// groups are cut into splits of `chunk` elements: out [3, G, S] gets each split's sums of s*s, t*t, s*t (point: S =
// 1). angular_apply writes g = k[0, group] * s - k[1, group] * t (k [2, G] fp32) in g's own layout.
void angular_stats_cpu(const at::Tensor& s, const at::Tensor& t, int64_t mode, int64_t chunk, at::Tensor& out);
void angular_stats_cuda(const at::Tensor& s, const at::Tensor& t, int64_t mode, int64_t chunk, at::Tensor& out);
void angular_apply_cpu(const at::Tensor& s, const at::Tensor& t, const at::Tensor& k, int64_t mode, at::Tensor& g);
void angular_apply_cuda(const at::Tensor& s, const at::Tensor& t, const at::Tensor& k, int64_t mode, at::Tensor& g);

// bn_stat_distance (kernels/bn_stat.py): per row (b, c) of H*W values and split of `chunk` of them, the sums of
// x - k and (x - k)^2 with k = x[b, c, first pixel] into out [2, B*C, S]; bn_stat_apply writes the backward's
// g = k[0, row] (x - k[1, row]) + k[2, row] (k [3, B*C] fp32) into g (dense, its own layout).
void bn_stat_cpu(const at::Tensor& x, int64_t chunk, at::Tensor& out);
void bn_stat_cuda(const at::Tensor& x, int64_t chunk, at::Tensor& out);
void bn_stat_apply_cpu(const at::Tensor& x, const at::Tensor& k, at::Tensor& g);
void bn_stat_apply_cuda(const at::Tensor& x, const at::Tensor& k, at::Tensor& g);

// masked_avg_pool (kernels/masked_avg_pool.py). class_sums: per image b, split s of the pixels (S = sums.size(1))
// and channel c, sums[b, s, k, c] = sum over the split's pixels p labelled k of a[b, p] f[b, c, p] (a = 1 when
// absent), and counts[b, s, k] = the sum of e[b, p] (1 when absent) over them; labels outside [0, K) or equal to
// ignore_index count nowhere. class_gather: g[b, c, p] = gp[b, y[b, p], c] for counted pixels, else 0.
void class_sums_cpu(const at::Tensor& f, const at::Tensor& y, int64_t K, int64_t ignore_index,
                    const c10::optional<at::Tensor>& a, const c10::optional<at::Tensor>& e, at::Tensor& sums,
                    at::Tensor& counts);
void class_sums_cuda(const at::Tensor& f, const at::Tensor& y, int64_t K, int64_t ignore_index,
                     const c10::optional<at::Tensor>& a, const c10::optional<at::Tensor>& e, at::Tensor& sums,
                     at::Tensor& counts);
void class_gather_cpu(const at::Tensor& y, const at::Tensor& gp, int64_t ignore_index, at::Tensor& g);
void class_gather_cuda(const at::Tensor& y, const at::Tensor& gp, int64_t ignore_index, at::Tensor& g);

// upsampled_cross_entropy (kernels/upsampled_ce.py), logits x [B, K, h, w], labels y [B, H, W] (contiguous). Forward:
// per block of `block` output pixels of image b, the sum over its counted pixels of lse - z_y into loss[b, block
// index] and their number into count (fp32 [B, nblk]). Backward: g = dL/dx for scale = grad_output / max(|V|, 1) (a
// 0-dim fp32 tensor on x's device), every element written (csrc/upsampled_ce.h).
void upsampled_ce_cpu(const at::Tensor& x, const at::Tensor& y, int64_t ignore_index, at::Tensor& loss,
                      at::Tensor& count, int64_t block);
void upsampled_ce_cuda(const at::Tensor& x, const at::Tensor& y, int64_t ignore_index, at::Tensor& loss,
                       at::Tensor& count, int64_t block);
void upsampled_ce_backward_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                               int64_t ignore_index, at::Tensor& g);
void upsampled_ce_backward_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                                int64_t ignore_index, at::Tensor& g);

// pairwise_similarity_loss (kernels/pairwise.py); features [B, C, h, w] read through their strides and normalised
// as they are loaded (f = x r, r [B, N] fp32 = 1 / max(||x||, eps) per pixel, N = h*w). gram: g [B, M, P] fp32 =
// (X r_x)(Y r_y)^T. gram_apply: df [B, C1, N] fp32 = g1 F1 - g2 F2 (g1 [B, C1, C1], g2 [B, C1, C2] fp32, any
// strides) and proj [B, ceil(C1 / 64), N] fp32, each 64-row block's sum of F1 * df. unnormalise: dx (x's shape and
// dtype, its own strides) = scale (df - f proj) r, scale a 0-dim fp32 tensor on the device.
void gram_cpu(const at::Tensor& x, const at::Tensor& rx, const at::Tensor& y, const at::Tensor& ry, at::Tensor& g);
void gram_cuda(const at::Tensor& x, const at::Tensor& rx, const at::Tensor& y, const at::Tensor& ry, at::Tensor& g);
void gram_apply_cpu(const at::Tensor& g1, const at::Tensor& x1, const at::Tensor& r1, const at::Tensor& g2,
                    const at::Tensor& x2, const at::Tensor& r2, at::Tensor& df, at::Tensor& proj);
void gram_apply_cuda(const at::Tensor& g1, const at::Tensor& x1, const at::Tensor& r1, const at::Tensor& g2,
                     const at::Tensor& x2, const at::Tensor& r2, at::Tensor& df, at::Tensor& proj);
void unnormalise_cpu(const at::Tensor& x, const at::Tensor& r, const at::Tensor& df, const at::Tensor& proj,
                     const at::Tensor& scale, at::Tensor& dx);
void unnormalise_cuda(const at::Tensor& x, const at::Tensor& r, const at::Tensor& df, const at::Tensor& proj,
                      const at::Tensor& scale, at::Tensor& dx);

// scale_grad_ (kernels/_grad_scale.py): g *= grad_output in place, untouched when grad_output == 1.
void scale_grad_cpu(at::Tensor& g, const at::Tensor& grad_output);
void scale_grad_cuda(at::Tensor& g, const at::Tensor& grad_output);

}  // namespace segkd
