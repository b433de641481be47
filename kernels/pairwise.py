"""Pair-wise similarity distillation (the pair-wise term of SKD) without the N x N similarity matrices.

Per image b, with each pixel's feature L2-normalised over channels, F_s: [C_s, N], F_t: [C_t, N] (N = h*w;
C_s and C_t may differ) and A = F^T F the [N, N] cosine similarity of every pixel pair:

    L = 1/B * sum_b 1/N^2 * sum_{i,j} (A_s - A_t)_ij^2
      = 1/B * sum_b (||F_s F_s^T||_F^2 - 2 ||F_s F_t^T||_F^2 + ||F_t F_t^T||_F^2) / N^2

(tr(A_s A_s) = ||F_s F_s^T||^2 and tr(A_s A_t) = ||F_s F_t^T||^2 by cyclic permutation of the trace). The
right-hand side needs three Gram matrices G_ss [C_s, C_s], G_st [C_s, C_t], G_tt [C_t, C_t]: O(N C^2) work
and O(C^2) extra memory instead of O(N^2 C) work and two N x N matrices (268 MB per image at N = 8192, fp32).

Gradients, from the Gram form (G symmetric for ss and tt):

    dL/dF_s = 4 / (B N^2) * (G_ss F_s - G_st F_t)          ( = 4 / (B N^2) * F_s (A_s - A_t) )
    dL/dF_t = 4 / (B N^2) * (G_tt F_t - G_st^T F_s)
    dL/dx   = (dL/dF - F * <F, dL/dF>_C) / max(||x||, eps)   through F = x / max(||x||, eps) (F.normalize);
              where ||x|| <= eps the norm is a constant and dL/dx = dL/dF / eps.

Cancellation: when A_s ~ A_t the loss is a small difference of three terms of size ~ N^2 * mean(A^2), so its
absolute error is ~ eps_acc * (||G_ss||^2 + 2 ||G_st||^2 + ||G_tt||^2) / N^2, not a fraction of the loss
itself. Everything is therefore computed in fp32 whatever the input dtype (bf16/fp16 inputs are upcast
before the Gram products, which are accumulated and kept in fp32, never rounded to 16 bits), and the three
squared Frobenius norms are summed and combined in float64 (C^2 elements: free). Float64 inputs stay float64
throughout (the tests' ground truth). The gradient has the same structure (G_ss F_s - G_st F_t) and the same
absolute, not relative, accuracy near A_s = A_t.

Liu et al., "Structured Knowledge Distillation for Semantic Segmentation", CVPR 2019 / TPAMI 2020; the
formula is winycg/CIRKD losses/skd.py (CriterionStructuralKD, which builds both N x N maps and takes
`((S - T)**2).mean()` over [B, N, N]).

Three paths behind one custom op (`pairwise_similarity_loss`), chosen per call by kernels._dispatch (use_cpp,
use_triton):

- Triton (CUDA tensors under SEGKD_KERNELS=auto, or =triton): the per-pixel normalisation is applied as the
  features are loaded, so neither the normalised copies nor an fp32 upcast of 16-bit features is ever written
  (at the workload's bf16 teacher feature, [8, 2048, 8192], that copy alone is 537 MB fp32). `_gram_kernel`
  computes G = (X r_x)(Y r_y)^T tile by tile ([BM, BP] of the output per program, a loop over pixel blocks),
  reading NCHW or channels-last features in place through their strides; r = 1 / max(||x||, eps) per pixel
  comes from one small torch reduction ([B, N] fp32). The backward's `_gram_apply_kernel` computes
  dF = G_1 F_1 - G_2 F_2 for a [BM, BN] tile (a loop over the channel blocks of both operands, Grams read
  from the forward's fp32 buffers) together with the tile's share of <F, dF>_C per pixel; `_unnormalise_kernel`
  then writes dL/dx in x's dtype and layout. Every `tl.dot` takes fp32 operands with PRECISION "ieee" (plain
  fp32 FMAs, no TF32 rounding of the operands: the cancellation above is why) and accumulates in fp32.
- C++ (SEGKD_KERNELS=cuda: csrc/cuda/pairwise.cu on CUDA tensors, its CPU twin csrc/cpu/pairwise.cpp on CPU ones):
  the same three kernels as the Triton path (Gram with normalisation on load, dF with the row blocks' shares of
  <F, dF>_C, the gradient through the normalisation) on the same buffers, fp32 FMAs without tensor cores.
- torch (CPU tensors under auto, float64 inputs, or SEGKD_KERNELS=torch): the same Gram form with torch.bmm on
  normalised fp32 copies. SEGKD_KERNELS=torch takes `pairwise_similarity_gram`, the Gram form differentiated
  by autograd, instead of the custom op.

The three Gram products are O(N C^2) FLOPs whichever path runs them: at the workload (B = 8, N = 8192,
C_s = 512, C_t = 2048) G_tt alone is 550 GFLOP, more than the rest of the loss; SKD's reference pools 2x2
first (N = 2048, 4x less). Which path is faster on a GPU is for the GPU suite to show.
"""
import os

import torch
import torch.nn.functional as F

from kernels import _cpp
from kernels._dispatch import (eager_cpp, eager_function, empty, empty_like, strided_bchw, triton, tl, upcast, use_cpp,
                               use_triton)

NORM_EPS = 1e-12  # F.normalize's default, as CIRKD calls it


def pairwise_similarity_reference(s, t):
    """The literal N x N form (CIRKD's CriterionStructuralKD after its pooling): s [B, C_s, h, w],
    t [B, C_t, h, w]. Quadratic memory in h*w: for tests and benchmarks only. Returns a float32 scalar
    (computed in float64 for float64 inputs)."""
    fs = F.normalize(upcast(s).flatten(2), p=2, dim=1, eps=NORM_EPS)  # [B, C_s, N]
    ft = F.normalize(upcast(t).flatten(2), p=2, dim=1, eps=NORM_EPS)  # [B, C_t, N]
    a_s = fs.transpose(1, 2) @ fs  # [B, N, N]
    a_t = ft.transpose(1, 2) @ ft  # [B, N, N]
    return (a_s - a_t).square().mean().float()


def _normalised(x):
    """x [B, C, h, w] -> (F [B, C, N] in fp32 (float64 kept), max(||x||, eps) [B, 1, N])."""
    x = upcast(x).flatten(2)  # [B, C, N]
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(NORM_EPS)  # [B, 1, N]
    return x / norm, norm


def _combine(gss, gst, gtt, n):
    """(||G_ss||^2 - 2 ||G_st||^2 + ||G_tt||^2) / N^2, mean over the batch; sums in float64."""
    sq = lambda g: g.double().square().sum(dim=(1, 2))  # [B]
    return ((sq(gss) - 2 * sq(gst) + sq(gtt)) / (n * n)).mean()


def pairwise_similarity_gram(s, t):
    """The Gram form in plain torch, differentiated by autograd (the SEGKD_KERNELS=torch path)."""
    fs, _ = _normalised(s)
    ft, _ = _normalised(t)
    gss = fs @ fs.transpose(1, 2)  # [B, C_s, C_s]
    gst = fs @ ft.transpose(1, 2)  # [B, C_s, C_t]
    gtt = ft @ ft.transpose(1, 2)  # [B, C_t, C_t]
    return _combine(gss, gst, gtt, fs.shape[-1]).float()


def _torch_forward(s, t):
    """-> (loss [] fp32, G_ss [B, C_s, C_s], G_st [B, C_s, C_t], G_tt [B, C_t, C_t]), Grams in fp32 (float64
    for float64 inputs); the Grams are kept for the backward, the normalised features are not (recomputed)."""
    fs, _ = _normalised(s)
    ft, _ = _normalised(t)
    gss = torch.bmm(fs, fs.transpose(1, 2))
    gst = torch.bmm(fs, ft.transpose(1, 2))
    gtt = torch.bmm(ft, ft.transpose(1, 2))
    return _combine(gss, gst, gtt, fs.shape[-1]).float(), gss, gst, gtt


def _through_normalisation(x, f, norm, g_f):
    """dL/dx from dL/dF for F = x / max(||x||, eps): [B, C, N] each, norm [B, 1, N]."""
    proj = (f * g_f).sum(dim=1, keepdim=True)  # [B, 1, N]
    proj = torch.where(norm > NORM_EPS, proj, torch.zeros_like(proj))  # a clamped norm is a constant
    out = empty_like(x, poison=False)  # the layout the Triton path and the fake registration give
    return out.copy_(((g_f - f * proj) / norm).reshape(x.shape))


def _torch_backward(s, t, gss, gst, gtt, grad_loss, need_s, need_t):
    """-> (dL/ds like s or [0], dL/dt like t or [0]), scaled by grad_loss (a 0-dim tensor, read on device)."""
    fs, ns = _normalised(s)
    ft, nt = _normalised(t)
    b, n = fs.shape[0], fs.shape[-1]
    scale = grad_loss.to(fs.dtype) * (4.0 / (b * n * n))
    ds = dt = s.new_empty(0)
    if need_s:
        g_fs = (torch.bmm(gss, fs) - torch.bmm(gst, ft)) * scale  # [B, C_s, N]
        ds = _through_normalisation(s, fs, ns, g_fs)
    if need_t:
        g_ft = (torch.bmm(gtt, ft) - torch.bmm(gst.transpose(1, 2), fs)) * scale  # [B, C_t, N]
        dt = _through_normalisation(t, ft, nt, g_ft)
    return ds, dt


# Tiles: [BM, BP] Gram outputs per program, pixels in blocks of BK; the backward's [BM, BN] dF tiles and channel
# blocks of BC. tl.dot needs every block >= 16. Tests shrink them to reach every loop with small tensors.
GRAM_BLOCKS = (64, 64, 32)  # (BM, BP, BK)
APPLY_BLOCKS = (64, 64, 32)  # (BM, BN, BC)
CPP_BLOCK_M = 64  # rows of dF per block of the C++ kernels (csrc/cpu/pairwise.cpp, csrc/cuda/pairwise.cu: kB)
PRECISION = "ieee"


@triton.jit
def _gram_kernel(
        x_ptr,  # [B, M, N] first operand, any strides (NCHW or channels-last features)
        rx_ptr,  # [B, N] fp32: 1 / max(||x||, eps) per pixel
        y_ptr,  # [B, P, N] second operand, any strides
        ry_ptr,  # [B, N] fp32
        g_ptr,  # [B, M, P] fp32 out: (X r_x)(Y r_y)^T
        M, P, N, sxb, sxm, sxn, syb, syp, syn,
        BM: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1).to(tl.int64) * BM + tl.arange(0, BM)
    offs_p = tl.program_id(2).to(tl.int64) * BP + tl.arange(0, BP)
    mm, mp = offs_m < M, offs_p < P
    acc = tl.zeros((BM, BP), dtype=tl.float32)
    for k0 in range(0, N, BK):
        offs_k = k0 + tl.arange(0, BK).to(tl.int64)
        mk = offs_k < N
        rx = tl.load(rx_ptr + b * N + offs_k, mask=mk, other=0.0)
        ry = tl.load(ry_ptr + b * N + offs_k, mask=mk, other=0.0)
        x = tl.load(x_ptr + b * sxb + offs_m[:, None] * sxm + offs_k[None, :] * sxn, mask=mm[:, None] & mk[None, :],
                    other=0.0).to(tl.float32) * rx[None, :]  # [BM, BK]
        y = tl.load(y_ptr + b * syb + offs_p[None, :] * syp + offs_k[:, None] * syn, mask=mk[:, None] & mp[None, :],
                    other=0.0).to(tl.float32) * ry[:, None]  # [BK, BP]
        acc += tl.dot(x, y, input_precision=PRECISION)
    tl.store(g_ptr + b * M * P + offs_m[:, None] * P + offs_p[None, :], acc, mask=mm[:, None] & mp[None, :])


@triton.jit
def _gram_apply_kernel(
        g1_ptr,  # [B, M, C1] fp32 Gram (strides sg1b, sg1m, sg1c: G_st^T is a transposed view)
        x1_ptr,  # [B, C1, N] features multiplied by G1, any strides
        r1_ptr,  # [B, N] fp32 1 / max(||x1||, eps)
        g2_ptr,  # [B, M, C2] fp32 Gram, subtracted
        x2_ptr,  # [B, C2, N] features multiplied by G2
        r2_ptr,  # [B, N] fp32
        df_ptr,  # [B, M, N] fp32 out: dF = G1 (X1 r1) - G2 (X2 r2)
        proj_ptr,  # [B, n_mblocks, N] fp32 out: sum over this block's rows of (X1 r1) * dF
        M, C1, C2, N, sg1b, sg1m, sg1c, s1b, s1c, s1n, sg2b, sg2m, sg2c, s2b, s2c, s2n,
        BM: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr):
    """Rows of dF are channels of the operand X1 (M == C1): dF for the student is G_ss F_s - G_st F_t."""
    b = tl.program_id(0).to(tl.int64)
    pm = tl.program_id(1).to(tl.int64)
    offs_m = pm * BM + tl.arange(0, BM)
    offs_n = tl.program_id(2).to(tl.int64) * BN + tl.arange(0, BN)
    mm, mn = offs_m < M, offs_n < N
    r1 = tl.load(r1_ptr + b * N + offs_n, mask=mn, other=0.0)
    r2 = tl.load(r2_ptr + b * N + offs_n, mask=mn, other=0.0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for c0 in range(0, C1, BC):
        offs_c = c0 + tl.arange(0, BC).to(tl.int64)
        mc = offs_c < C1
        g = tl.load(g1_ptr + b * sg1b + offs_m[:, None] * sg1m + offs_c[None, :] * sg1c,
                    mask=mm[:, None] & mc[None, :], other=0.0)  # [BM, BC]
        x = tl.load(x1_ptr + b * s1b + offs_c[:, None] * s1c + offs_n[None, :] * s1n, mask=mc[:, None] & mn[None, :],
                    other=0.0).to(tl.float32) * r1[None, :]  # [BC, BN]
        acc += tl.dot(g, x, input_precision=PRECISION)
    for c0 in range(0, C2, BC):
        offs_c = c0 + tl.arange(0, BC).to(tl.int64)
        mc = offs_c < C2
        g = tl.load(g2_ptr + b * sg2b + offs_m[:, None] * sg2m + offs_c[None, :] * sg2c,
                    mask=mm[:, None] & mc[None, :], other=0.0)
        x = tl.load(x2_ptr + b * s2b + offs_c[:, None] * s2c + offs_n[None, :] * s2n, mask=mc[:, None] & mn[None, :],
                    other=0.0).to(tl.float32) * r2[None, :]
        acc -= tl.dot(g, x, input_precision=PRECISION)
    mask = mm[:, None] & mn[None, :]
    tl.store(df_ptr + b * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)
    f = tl.load(x1_ptr + b * s1b + offs_m[:, None] * s1c + offs_n[None, :] * s1n, mask=mask,
                other=0.0).to(tl.float32) * r1[None, :]  # this tile's own rows of the normalised X1
    tl.store(proj_ptr + (b * tl.num_programs(1) + pm) * N + offs_n, tl.sum(f * acc, axis=0), mask=mn)


@triton.jit
def _unnormalise_kernel(
        x_ptr,  # [B, C, N] features, any strides
        r_ptr,  # [B, N] fp32 1 / max(||x||, eps)
        df_ptr,  # [B, C, N] fp32 dL/dF without the scale
        proj_ptr,  # [B, N] fp32 <F, dF>_C, 0 where ||x|| <= eps (a clamped norm is a constant)
        scale_ptr,  # [] fp32: grad_output * 4 / (B N^2)
        dx_ptr,  # [B, C, N] out, x's dtype, strides (sdb, sdc, sdn)
        C, N, sxb, sxc, sxn, sdb, sdc, sdn,
        BC: tl.constexpr, BN: tl.constexpr):
    """dL/dx = scale * (dF - F <F, dF>_C) / max(||x||, eps), F = x r."""
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BC + tl.arange(0, BC)
    offs_n = tl.program_id(2).to(tl.int64) * BN + tl.arange(0, BN)
    mn = offs_n < N
    mask = (offs_c < C)[:, None] & mn[None, :]
    r = tl.load(r_ptr + b * N + offs_n, mask=mn, other=0.0)
    proj = tl.load(proj_ptr + b * N + offs_n, mask=mn, other=0.0)
    xo = b * sxb + offs_c[:, None] * sxc + offs_n[None, :] * sxn
    f = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32) * r[None, :]
    df = tl.load(df_ptr + b * C * N + offs_c[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    dx = (df - f * proj[None, :]) * r[None, :] * tl.load(scale_ptr)
    tl.store(dx_ptr + b * sdb + offs_c[:, None] * sdc + offs_n[None, :] * sdn, dx.to(dx_ptr.dtype.element_ty),
             mask=mask)


def _inverse_norms(x):
    """x [B, C, h, w] -> (x read as [B, C, N] with its strides, strides, 1 / max(||x||, eps) [B, N] fp32,
    whether ||x|| > eps [B, N])."""
    x, strides = strided_bchw(x)
    norm = torch.linalg.vector_norm(x.flatten(2), dim=1, dtype=torch.float32)  # [B, N]; 16-bit read once, no copy
    return x, strides, 1.0 / norm.clamp_min(NORM_EPS), norm > NORM_EPS


def _gram(x, sx, rx, y, sy, ry):
    b, m, p, n = x.shape[0], x.shape[1], y.shape[1], rx.shape[1]
    bm, bp, bk = GRAM_BLOCKS
    g = empty((b, m, p), torch.float32, x.device)
    if use_cpp("pairwise_similarity_loss", x):  # the C++ kernel (csrc/) in place of the Triton launch
        _cpp.ops().gram(x, rx, y, ry, g)
        return g
    _gram_kernel[(b, triton.cdiv(m, bm), triton.cdiv(p, bp))](
        x, rx, y, ry, g, m, p, n, *sx, *sy, BM=bm, BP=bp, BK=bk, PRECISION=PRECISION, num_warps=4)
    return g


def pairwise_similarity_forward(s, t):
    """The Triton launcher of the forward: (loss, G_ss, G_st, G_tt), Grams in fp32."""
    s, ss, rs, _ = _inverse_norms(s)
    t, st, rt, _ = _inverse_norms(t)
    gss, gst, gtt = _gram(s, ss, rs, s, ss, rs), _gram(s, ss, rs, t, st, rt), _gram(t, st, rt, t, st, rt)
    return _combine(gss, gst, gtt, rs.shape[1]).float(), gss, gst, gtt


def _fused_grad(x1, s1, r1, live1, g1, x2, s2, r2, g2, scale):
    """dL/dx1 for dF = G1 F1 - G2 F2 (g1, g2 [B, C1, C1], [B, C1, C2] views with any strides)."""
    b, c1, c2, n = x1.shape[0], x1.shape[1], x2.shape[1], r1.shape[1]
    cpp = use_cpp("pairwise_similarity_loss", x1)  # the C++ kernels in place of the Triton launches
    bm, bn, bc = APPLY_BLOCKS
    n_mblocks = -(-c1 // (CPP_BLOCK_M if cpp else bm))  # not triton.cdiv: the C++ path runs without triton
    df = empty((b, c1, n), torch.float32, x1.device)
    proj = empty((b, n_mblocks, n), torch.float32, x1.device)
    if cpp:
        _cpp.ops().gram_apply(g1, x1, r1, g2, x2, r2, df, proj)
    else:
        _gram_apply_kernel[(b, n_mblocks, triton.cdiv(n, bn))](
            g1, x1, r1, g2, x2, r2, df, proj, c1, c1, c2, n, *g1.stride(), *s1, *g2.stride(), *s2,
            BM=bm, BN=bn, BC=bc, PRECISION=PRECISION, num_warps=8)
    proj = torch.where(live1, proj.sum(dim=1), 0.0)  # fixed order over the row blocks: deterministic
    dx = empty_like(x1)  # x1's layout when dense; NCHW for a non-dense view (its own strides, not x1's)
    if cpp:
        _cpp.ops().unnormalise(x1, r1, df, proj, scale, dx)
    else:
        _unnormalise_kernel[(b, triton.cdiv(c1, bm), triton.cdiv(n, bn))](
            x1, r1, df, proj, scale, dx, c1, n, *s1, *strided_bchw(dx)[1], BC=bm, BN=bn, num_warps=4)
    return dx


def pairwise_similarity_backward(s, t, gss, gst, gtt, grad_loss, need_s, need_t):
    """The Triton launcher of the backward: (dL/ds or [0], dL/dt or [0]), scaled by grad_loss (0-dim, on device)."""
    s, ss, rs, live_s = _inverse_norms(s)
    t, st, rt, live_t = _inverse_norms(t)
    b, n = s.shape[0], rs.shape[1]
    scale = (grad_loss.float() * (4.0 / (b * n * n))).reshape(())
    ds = _fused_grad(s, ss, rs, live_s, gss, t, st, rt, gst, scale) if need_s else s.new_empty(0)
    dt = _fused_grad(t, st, rt, live_t, gtt, s, ss, rs, gst.transpose(1, 2), scale) if need_t else t.new_empty(0)
    return ds, dt


def _fused(s, t):
    """The fused path (Triton, or the C++ kernels under SEGKD_KERNELS=cuda) for these inputs? Float64 inputs (the
    tests' ground truth) always take torch."""
    fused = use_cpp("pairwise_similarity_loss", s, t) or use_triton(s, t, op="pairwise_similarity_loss")
    return fused and torch.float64 not in (s.dtype, t.dtype)


def _forward(s, t):
    """-> (loss [] fp32, G_ss [B, C_s, C_s], G_st [B, C_s, C_t], G_tt [B, C_t, C_t]): the Grams are fp32 (float64
    for float64 inputs) and kept for the backward."""
    return pairwise_similarity_forward(s, t) if _fused(s, t) else _torch_forward(s, t)


def _backward_grads(s, t, gss, gst, gtt, grad_loss, need_s, need_t):
    """-> (dL/ds like s or [0], dL/dt like t or [0]), scaled by grad_loss (a 0-dim tensor, read on device)."""
    if _fused(s, t):
        return pairwise_similarity_backward(s, t, gss, gst, gtt, grad_loss, need_s, need_t)
    return _torch_backward(s, t, gss, gst, gtt, grad_loss, need_s, need_t)


@torch.library.custom_op("segkd::pairwise_similarity", mutates_args=())
def _pairwise_op(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(s, t)


@_pairwise_op.register_fake
def _(s, t):
    b, c_s, c_t = s.shape[0], s.shape[1], t.shape[1]
    acc = upcast(s.new_empty(0)).dtype
    g = lambda m, k: s.new_empty((b, m, k), dtype=acc)
    return s.new_empty((), dtype=torch.float32), g(c_s, c_s), g(c_s, c_t), g(c_t, c_t)


@torch.library.custom_op("segkd::pairwise_similarity_backward", mutates_args=())
def _pairwise_backward_op(s: torch.Tensor, t: torch.Tensor, gss: torch.Tensor, gst: torch.Tensor,
                          gtt: torch.Tensor, grad_loss: torch.Tensor, need_s: bool,
                          need_t: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_grads(s, t, gss, gst, gtt, grad_loss, need_s, need_t)


@_pairwise_backward_op.register_fake
def _(s, t, gss, gst, gtt, grad_loss, need_s, need_t):
    return (empty_like(s, poison=False) if need_s else s.new_empty(0)), \
        (empty_like(t, poison=False) if need_t else t.new_empty(0))


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the Gram outputs take no gradient: no zero tensors for them
    s, t = inputs
    _, gss, gst, gtt = output
    ctx.mark_non_differentiable(gss, gst, gtt)
    ctx.save_for_backward(s, t, gss, gst, gtt)


def _backward(ctx, grad_loss, _g_ss, _g_st, _g_tt):
    if grad_loss is None:
        return None, None
    s, t, gss, gst, gtt = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    backward = _backward_grads if eager_cpp(s, t) else _pairwise_backward_op  # see eager_cpp
    ds, dt = backward(s, t, gss, gst, gtt, grad_loss, need_s, need_t)
    return (ds if need_s else None), (dt if need_t else None)


_pairwise_op.register_autograd(_backward, setup_context=_setup_context)
_PairwiseEager = eager_function(_forward, _setup_context, _backward)  # see eager_cpp


def pairwise_similarity_loss(s, t):
    """SKD's pair-wise similarity loss, mean over (b, i, j) of (A_s - A_t)^2; see the module docstring for the
    formula, its Gram form and its accuracy. s [B, C_s, h, w], t [B, C_t, h, w] (channel counts may differ).
    Returns a float32 scalar. Never forms an N x N tensor and never synchronises with the host."""
    if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
        raise ValueError(f"pairwise_similarity_loss: student {tuple(s.shape)} and teacher {tuple(t.shape)} must be "
                         "[B, C_s, h, w] and [B, C_t, h, w] with the same B, h, w")
    if os.environ.get("SEGKD_KERNELS", "auto") == "torch":
        return pairwise_similarity_gram(s, t)
    op = _PairwiseEager.apply if eager_cpp(s, t) else _pairwise_op
    return op(s, t)[0]
