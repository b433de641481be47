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

There is no Triton kernel: the work is three batched matmuls that cuBLAS (or the CPU BLAS) already runs at
full speed with fp32 accumulation; a fused kernel could only save the normalised copies of the inputs
(O(N C), small next to the features themselves). SEGKD_KERNELS=torch takes `pairwise_similarity_gram`, the same
Gram form differentiated by autograd, instead of the custom op.
"""
import os

import torch
import torch.nn.functional as F

from kernels._dispatch import upcast

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


def pairwise_similarity_forward(s, t):
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
    return ((g_f - f * proj) / norm).reshape(x.shape).to(x.dtype)


def pairwise_similarity_backward(s, t, gss, gst, gtt, grad_loss, need_s, need_t):
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


@torch.library.custom_op("segkd::pairwise_similarity", mutates_args=())
def _pairwise_op(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return pairwise_similarity_forward(s, t)


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
    return pairwise_similarity_backward(s, t, gss, gst, gtt, grad_loss, need_s, need_t)


@_pairwise_backward_op.register_fake
def _(s, t, gss, gst, gtt, grad_loss, need_s, need_t):
    return (torch.empty_like(s) if need_s else s.new_empty(0)), (torch.empty_like(t) if need_t else t.new_empty(0))


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
    ds, dt = _pairwise_backward_op(s, t, gss, gst, gtt, grad_loss, need_s, need_t)
    return (ds if need_s else None), (dt if need_t else None)


_pairwise_op.register_autograd(_backward, setup_context=_setup_context)


def pairwise_similarity_loss(s, t):
    """SKD's pair-wise similarity loss, mean over (b, i, j) of (A_s - A_t)^2; see the module docstring for the
    formula, its Gram form and its accuracy. s [B, C_s, h, w], t [B, C_t, h, w] (channel counts may differ).
    Returns a float32 scalar. Never forms an N x N tensor and never synchronises with the host."""
    if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
        raise ValueError(f"pairwise_similarity_loss: student {tuple(s.shape)} and teacher {tuple(t.shape)} must be "
                         "[B, C_s, h, w] and [B, C_t, h, w] with the same B, h, w")
    if os.environ.get("SEGKD_KERNELS", "auto") == "torch":
        return pairwise_similarity_gram(s, t)
    return _pairwise_op(s, t)[0]
