"""APD observation step: pixel-to-prototype cosine similarities and the KL between the two observations.

For L2-normalised pixel features f [B, D, H, W] and class prototypes A [B, K, D] of one image,

    o[b, k, hw] = cos(f[b, :, hw], A[b, k]) / tau      for classes present in image b
    o[b, k, hw] = ABSENT (= -1e4)                      for absent classes (softmax weight exactly 0 in fp32)
    p_a = softmax_k(o)

    L_ob = (1 / (B*H*W)) * sum_{b,hw} sum_k p_a,t * (log p_a,t - log p_a,s)

Tian et al., "Adaptive Perspective Distillation for Semantic Segmentation" (TPAMI 2022), Eq. for the
observation loss. An image with no present class gives a uniform observation on both sides and L_ob = 0.

Fused L_ob (`prototype_kl` on the Triton path). Prototypes are normalised in torch (tiny, and autograd then
carries their gradient back to the unnormalised ones); the kernel owns a block of pixels of one image and
reads the teacher features once (NCHW or channels-last, in place through their strides; dL/df_s takes the
student's layout): u = A_hat @ f and ||f||^2 accumulate over D chunks (tensor-core dots, tf32x3 for
~fp32 accuracy), then both softmaxes over K and the KL stay in registers. With g_k = (p_s,k - p_t,k) / (B*H*W)
on present classes (0 on absent ones), w = g / (tau * nf) and nf = max(||f_s||, EPS), the same program writes

    dL/df_s    = A_hat_s^T w - [||f_s|| > EPS] * f_s * sum_k(w_k u_k) / nf^2      (second pass over D,
                                                    re-reading the student tile the first pass just read)
    dL/dA_hat_s = sum_hw w f_s^T                                  (partial per program, summed over programs)

so backward only scales them by grad_output. Teacher inputs that require grad take the torch reference.
An optional `scale` (APD's lambda_kd times its element normalisation, a 0-dim tensor computed on the device)
multiplies L_ob and both gradients inside the kernel, so that with grad_output 1 the backward leaves dL/df_s alone
instead of reading and writing it again.

Fused `prototype_logits` (APD's L_t, whose gradient trains the teacher projector): the forward reads the
features once (u = A_hat @ f and ||f||^2 over D chunks, as above) and writes the logits and n = max(||f||, EPS)
per pixel; the backward reads the features once more with dL/do and writes, with w = dL/do / (tau n) on present
classes,
    dL/df     = A_hat^T w - [||f|| > EPS] * f * sum_k(dL/do_k * o_k) / n^2     (sum_k w_k u_k = sum_k dL/do_k o_k)
    dL/dA_hat = sum_hw w f^T                                  (the same two-stage sum as below)
Fused `prototype_ce` (APD's L_t in the paper convention: the CE of those logits against the labels at feature
resolution, mean over the valid pixels) is prototype_kl's kernel with the labels' one-hot as the target (LABELS):
CE = KL(onehot || p) since a one-hot has no entropy, g_k = (p_k - [k = y]) on valid pixels and 0 on ignored ones,
the mean's 1 / n_valid a device tensor in `scale`. One pass writes the loss and both gradients, and the logits are
never materialised. `prototype_logits` stays for the code convention, whose L_t upsamples the logits first.
All these ops take the features unnormalised (APD's projector outputs, 16-bit under autocast): normalising them
into a copy first moved most of APD's 15 GB per step (issue 12).

dL/dA_hat_s is a sum over all pixels of an image, reduced deterministically in two stages (no atomics, so
two runs give bitwise-equal gradients): each program owns a fixed run of pixel blocks and accumulates its
[K, D] partial in place in its own slice of a workspace [B, n_split, K, D] fp32 (plain loads and stores, one
writer per slice), then torch sums the split axis. n_split bounds the workspace (`_ga_splits`).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from kernels._dispatch import (DOT_PRECISION, empty, empty_like, needs_grad, next_pow2, strided_bchw, triton, tl,
                               upcast, use_triton)
from kernels._grad_scale import scale_grad_

ABSENT = -1e4
EPS = 1e-6


def prototype_logits_reference(feat, protos, present, tau):
    """feat [B, D, H, W] (pixel features), protos [B, K, D], present [B, K] bool -> logits [B, K, H, W] float32.

    Features and prototypes are normalised here (n(x) = x / max(||x||, EPS)), so the dot product is a cosine.
    """
    return _logits(feat, protos, present, tau).float()


def _logits(feat, protos, present, tau):
    """prototype_logits_reference in the compute dtype (float64 kept, so tests get a float64 ground truth)."""
    b, d, h, w = feat.shape
    f = F.normalize(upcast(feat).reshape(b, d, h * w), dim=1, eps=EPS)  # [B, D, HW]
    a = F.normalize(upcast(protos), dim=2, eps=EPS)  # [B, K, D]
    logits = torch.bmm(a.to(f.dtype), f) / tau  # [B, K, HW]
    logits = torch.where(present[..., None], logits, torch.full_like(logits, ABSENT))
    return logits.reshape(b, -1, h, w)


def prototype_ce_reference(feat, protos, present, labels, tau, ignore_index=255, scale=None):
    """L_t (times `scale` when given): cross-entropy of the observation logits against labels [B, H, W] at their
    resolution, mean over the valid pixels (labels in [0, K), not ignore_index; 0 when none is). Float32 scalar."""
    logits = _logits(feat, protos, present, tau)  # [B, K, H, W]
    k = logits.shape[1]
    valid = (labels >= 0) & (labels < k) & (labels != ignore_index)
    target = torch.where(valid, labels, torch.zeros_like(labels)).long()
    nll = F.cross_entropy(logits, target, reduction="none")  # [B, H, W]
    loss = torch.where(valid, nll, torch.zeros_like(nll)).sum() / valid.sum().clamp_min(1)
    return loss.float() if scale is None else (loss * scale).float()


def prototype_kl_reference(feat_s, feat_t, protos_s, protos_t, present, tau, scale=None):
    """L_ob (times `scale`, a float or 0-dim tensor, when given): pixel-mean KL(p_a,t || p_a,s). Float32 scalar.
    The caller detaches the teacher side."""
    from kernels.pixel_kl import pixel_kl_reference

    logits_s = _logits(feat_s, protos_s, present, tau)
    logits_t = _logits(feat_t, protos_t, present, tau)
    loss = pixel_kl_reference(logits_s, logits_t, 1.0)
    return loss if scale is None else (loss * scale).float()


@triton.jit
def _prototype_kl_fwd_kernel(
    fs_ptr,  # [B, D, HW] student pixel features, element strides (fs_sb, fs_sd, fs_sp)
    ft_ptr,  # [B, D, HW] teacher pixel features, element strides (ft_sb, ft_sd, ft_sp) (read unless LABELS)
    as_ptr,  # [B, K, D] fp32 normalised student prototypes A_hat_s
    at_ptr,  # [B, K, D] fp32 normalised teacher prototypes A_hat_t (read unless LABELS)
    present_ptr,  # [B, K] uint8: class k occurs in image b
    y_ptr,  # [B, HW] integer labels: the target is their one-hot instead of the teacher's observation (when LABELS)
    kl_ptr,  # [B, n_split] fp32 out: sum of the per-pixel KL over each program's pixel blocks
    gf_ptr,  # [B, D, HW] out (student dtype, strides gf_s*): dL/df_s for grad_output = 1 (written when WRITE_GF)
    ga_ptr,  # [B, n_split, K, D] fp32 in place: a program's partial dL/dA_hat_s, set by its first block, when WRITE_GA
    scale_ptr,  # [] fp32: the loss's scale (read when HAS_SCALE)
    D,
    HW,
    K,
    ignore_index,
    inv_tau,
    inv_n,  # 1 / (B*H*W)
    blocks_per_prog,  # pixel blocks [split * blocks_per_prog, ...) belong to program split
    fs_sb, fs_sd, fs_sp,
    ft_sb, ft_sd, ft_sp,
    gf_sb, gf_sd, gf_sp,
    WRITE_GF: tl.constexpr,
    WRITE_GA: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    LABELS: tl.constexpr,  # cross-entropy against the labels (prototype_ce) instead of KL against the teacher
    K_PAD: tl.constexpr,
    D_BLOCK: tl.constexpr,
    HW_BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    k = tl.arange(0, K_PAD)  # [K_PAD]
    in_k = k < K
    pres = (tl.load(present_ptr + b * K + k, mask=in_k, other=0) != 0) & in_k
    if HAS_SCALE:
        inv_n = inv_n * tl.load(scale_ptr)  # the gradients' factor; the loss is scaled by the launcher
    d_idx = tl.arange(0, D_BLOCK)
    a_base = b * K * D
    ws_base = (b * tl.num_programs(0) + split) * K * D  # this program's [K, D] slice of the workspace
    blk0 = split * blocks_per_prog
    kl_acc = 0.0
    for blk in range(blk0, tl.minimum(blk0 + blocks_per_prog, tl.cdiv(HW, HW_BLOCK))):
        hw = tl.arange(0, HW_BLOCK).to(tl.int64) + blk * HW_BLOCK  # [HW_BLOCK]; HW < 2^31 per image
        in_hw = hw < HW
        # Features through their strides: contiguous along pixels for NCHW, channels-last read in place.
        fs_pix = (b * fs_sb + hw * fs_sp)[None, :]  # [1, HW_BLOCK]
        ft_pix = (b * ft_sb + hw * ft_sp)[None, :]
        gf_pix = (b * gf_sb + hw * gf_sp)[None, :]

        # Pass 1: u = A_hat @ f ([K_PAD, HW_BLOCK]) and ||f||^2, over D chunks, one side after the other:
        # only one side's [K_PAD, D_BLOCK] prototype tile (split hi/lo for tf32x3) is live at a time, which
        # keeps K_PAD = 256 within the register file.
        us = tl.zeros([K_PAD, HW_BLOCK], tl.float32)
        fss = tl.zeros([HW_BLOCK], tl.float32)
        for d0 in range(0, D, D_BLOCK):
            d = d0 + d_idx
            f_mask = (d < D)[:, None] & in_hw[None, :]  # [D_BLOCK, HW_BLOCK]
            fs = tl.load(fs_ptr + fs_pix + d[:, None].to(tl.int64) * fs_sd, mask=f_mask, other=0.0).to(tl.float32)
            a_s = tl.load(as_ptr + a_base + k[:, None] * D + d[None, :], mask=in_k[:, None] & (d < D)[None, :],
                          other=0.0)  # [K_PAD, D_BLOCK]
            us = tl.dot(a_s, fs, us, input_precision=PRECISION)
            fss += tl.sum(fs * fs, axis=0)
        nfs = tl.maximum(tl.sqrt(fss), 1e-6)  # [HW_BLOCK], EPS as in the reference
        # Absent classes take ABSENT = -1e4 like the reference; padded classes -1e30 so they never count.
        os_ = tl.where(pres[:, None], us * (inv_tau / nfs)[None, :], tl.where(in_k[:, None], -1e4, -1e30))
        xs = os_ - tl.max(os_, axis=0)[None, :]
        lps = xs - tl.log(tl.sum(tl.exp(xs), axis=0))[None, :]  # [K_PAD, HW_BLOCK]
        if LABELS:  # the target is the label's one-hot: CE = -log p_s[y] on valid pixels, no gradient elsewhere
            y = tl.load(y_ptr + b * HW + hw, mask=in_hw, other=-1).to(tl.int32)
            live = in_hw & (y >= 0) & (y < K) & (y != ignore_index)
            onehot = (k[:, None] == y[None, :]) & live[None, :]
            pt = tl.where(onehot, 1.0, 0.0)
            kl = tl.sum(tl.where(onehot, -lps, 0.0), axis=0)  # [HW_BLOCK]
        else:
            ut = tl.zeros([K_PAD, HW_BLOCK], tl.float32)
            ftt = tl.zeros([HW_BLOCK], tl.float32)
            for d0 in range(0, D, D_BLOCK):
                d = d0 + d_idx
                f_mask = (d < D)[:, None] & in_hw[None, :]
                ft = tl.load(ft_ptr + ft_pix + d[:, None].to(tl.int64) * ft_sd, mask=f_mask, other=0.0).to(tl.float32)
                a_t = tl.load(at_ptr + a_base + k[:, None] * D + d[None, :], mask=in_k[:, None] & (d < D)[None, :],
                              other=0.0)
                ut = tl.dot(a_t, ft, ut, input_precision=PRECISION)
                ftt += tl.sum(ft * ft, axis=0)
            nft = tl.maximum(tl.sqrt(ftt), 1e-6)
            ot = tl.where(pres[:, None], ut * (inv_tau / nft)[None, :], tl.where(in_k[:, None], -1e4, -1e30))
            xt = ot - tl.max(ot, axis=0)[None, :]
            lpt = xt - tl.log(tl.sum(tl.exp(xt), axis=0))[None, :]
            pt = tl.exp(lpt)
            kl = tl.sum(tl.where(in_k[:, None], pt * (lpt - lps), 0.0), axis=0)  # [HW_BLOCK]
            live = in_hw  # every pixel observes
        kl_acc += tl.sum(tl.where(in_hw, kl, 0.0), axis=0)

        if WRITE_GF or WRITE_GA:
            g = tl.where(pres[:, None] & live[None, :], (tl.exp(lps) - pt) * inv_n, 0.0)
            w = g * (inv_tau / nfs)[None, :]  # dL/du_s, [K_PAD, HW_BLOCK]
            r = tl.where(tl.sqrt(fss) > 1e-6, -tl.sum(w * us, axis=0) / (nfs * nfs), 0.0)  # [HW_BLOCK]
            for d0 in range(0, D, D_BLOCK):
                d = d0 + d_idx
                in_d = d < D
                d64 = d[:, None].to(tl.int64)
                f_mask = in_d[:, None] & in_hw[None, :]
                a_mask = in_k[:, None] & in_d[None, :]
                fs = tl.load(fs_ptr + fs_pix + d64 * fs_sd, mask=f_mask, other=0.0).to(tl.float32)
                if WRITE_GF:
                    a_s = tl.load(as_ptr + a_base + k[:, None] * D + d[None, :], mask=a_mask, other=0.0)
                    gf = tl.dot(tl.trans(a_s), w, input_precision=PRECISION) + fs * r[None, :]  # [D_BLOCK, HW_BLOCK]
                    tl.store(gf_ptr + gf_pix + d64 * gf_sd, gf.to(gf_ptr.dtype.element_ty), mask=f_mask)
                if WRITE_GA:
                    ws = ga_ptr + ws_base + k[:, None] * D + d[None, :]  # [K_PAD, D_BLOCK]
                    # The first block writes the slice, so the workspace needs no zeroing.
                    ga = tl.load(ws, mask=a_mask & (tl.full([K_PAD, D_BLOCK], blk, tl.int32) > blk0), other=0.0)
                    ga = tl.dot(w, tl.trans(fs), ga, input_precision=PRECISION)  # [K_PAD, D_BLOCK]
                    tl.store(ws, ga, mask=a_mask)
            if WRITE_GA:
                tl.debug_barrier()  # the next block re-reads the slice, possibly from other threads of the program
    tl.store(kl_ptr + b * tl.num_programs(0) + split, kl_acc)


GA_PROGRAMS = 256  # programs per launch when dL/dA_hat_s is reduced: about 2 per SM of an H100/H200
GA_WORKSPACE_BYTES = 64 << 20  # bound on the [B, n_split, K, D] fp32 workspace


def _ga_splits(b, k, d, n_blk):
    """Number of pixel-block runs (programs per image) for the two-stage dL/dA_hat_s reduction.

    More splits keep the GPU busy; each costs a [K, D] fp32 partial per image, read once more by the sum.
    """
    return max(1, min(n_blk, triton.cdiv(GA_PROGRAMS, b), GA_WORKSPACE_BYTES // (b * k * d * 4)))


def prototype_kl_forward(feat_s, feat_t, ahat_s, ahat_t, present, tau, write_gf, write_ga, scale=None, labels=None,
                         ignore_index=255):
    """Returns (L_ob [] fp32, dL/df_s [B, D, H, W] or [0], dL/dA_hat_s [B, K, D] fp32 or [0]), all times `scale`
    (a 0-dim tensor, read on the device) when given. With `labels` [B, H, W] the target is their one-hot (the
    cross-entropy summed over valid pixels / (B*H*W)) and feat_t, ahat_t are not read."""
    fs, fs_strides = strided_bchw(feat_s)  # no copy for NCHW or channels-last
    ft, ft_strides = strided_bchw(feat_t) if labels is None else (fs, fs_strides)
    a_s = ahat_s.float().contiguous()
    a_t = ahat_t.float().contiguous() if labels is None else a_s
    y = labels.contiguous() if labels is not None else present  # never read without LABELS
    pres = present.contiguous().view(torch.uint8)
    b, d = fs.shape[:2]
    hw = fs[0, 0].numel()
    k = a_s.shape[1]
    k_pad = max(16, next_pow2(k))
    # Two [K_PAD, HW_BLOCK] fp32 accumulators stay live across the D loops. At the workload (D 512, sm_90,
    # 8 warps; tests/kernels/test_kernels_aot_sm90.py) K = 19 (K_PAD 32) takes 236 registers, no spills;
    # K = 150 (K_PAD 256) spills ~1 KB per thread: correct, but the K = 150 case is not tuned yet.
    hw_block = max(16, min(64, 2048 // k_pad))
    d_block = 16
    n_blk = triton.cdiv(hw, hw_block)
    per = triton.cdiv(n_blk, _ga_splits(b, k, d, n_blk)) if write_ga else 1
    n_split = triton.cdiv(n_blk, per)  # every program owns at least one pixel block
    kl = empty((b, n_split), torch.float32, fs.device)
    gf = empty_like(feat_s) if write_gf else fs.new_empty(0)  # the student's memory format
    gf_strides = strided_bchw(gf)[1] if write_gf else fs_strides
    ws = empty((b, n_split, k, d), torch.float32, fs.device) if write_ga else a_s.new_empty(0)
    sc = kl if scale is None else scale.to(torch.float32).reshape(())  # never read without a scale
    _prototype_kl_fwd_kernel[(n_split, b)](
        fs, ft, a_s, a_t, pres, y, kl, gf if write_gf else fs, ws if write_ga else a_s, sc, d, hw, k, int(ignore_index),
        1.0 / float(tau), 1.0 / (b * hw), per, *fs_strides, *ft_strides, *gf_strides, WRITE_GF=write_gf,
        WRITE_GA=write_ga, HAS_SCALE=scale is not None, LABELS=labels is not None, K_PAD=k_pad, D_BLOCK=d_block, HW_BLOCK=hw_block, PRECISION=DOT_PRECISION,
        num_warps=8)
    ga = ws.sum(1) if write_ga else ws  # [B, K, D]: a fixed-order reduction, deterministic
    loss = kl.sum() / (b * hw)
    return (loss if scale is None else loss * sc), gf, ga


@torch.library.custom_op("segkd::prototype_kl", mutates_args=())
def _prototype_kl_op(feat_s: torch.Tensor, feat_t: torch.Tensor, ahat_s: torch.Tensor, ahat_t: torch.Tensor,
                     present: torch.Tensor, tau: float, write_gf: bool, write_ga: bool,
                     scale: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                     ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return prototype_kl_forward(feat_s, feat_t, ahat_s, ahat_t, present, tau, write_gf, write_ga, scale, labels,
                                ignore_index)


@_prototype_kl_op.register_fake
def _(feat_s, feat_t, ahat_s, ahat_t, present, tau, write_gf, write_ga, scale=None, labels=None, ignore_index=255):
    gf = empty_like(feat_s, poison=False) if write_gf else feat_s.new_empty(0)  # as the launcher
    ga = ahat_s.new_empty(ahat_s.shape, dtype=torch.float32) if write_ga else ahat_s.new_empty(0, dtype=torch.float32)
    return feat_s.new_empty((), dtype=torch.float32), gf, ga


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no full-size zero gradient for the outputs that take none
    _, gf, ga = output
    ctx.mark_non_differentiable(gf, ga)
    ctx.save_for_backward(gf, ga)
    ctx.write_gf, ctx.write_ga = inputs[6], inputs[7]


def _backward(ctx, grad_loss, _grad_gf, _grad_ga):
    gf, ga = ctx.saved_tensors
    if ctx.write_gf:
        scale_grad_(gf, grad_loss)
    return (gf if ctx.write_gf else None, None, ga * grad_loss if ctx.write_ga else None,
            None, None, None, None, None, None, None, None)


_prototype_kl_op.register_autograd(_backward, setup_context=_setup_context)


@triton.jit
def _prototype_logits_fwd_kernel(
    f_ptr,  # [B, D, HW] pixel features (unnormalised), element strides (f_sb, f_sd, f_sp)
    a_ptr,  # [B, K, D] fp32 normalised prototypes A_hat
    present_ptr,  # [B, K] uint8: class k occurs in image b
    o_ptr,  # [B, K, HW] fp32 out: the observation logits
    n_ptr,  # [B, HW] fp32 out: max(||f||, EPS), kept for the backward
    D,
    HW,
    K,
    inv_tau,
    f_sb, f_sd, f_sp,
    K_PAD: tl.constexpr,
    D_BLOCK: tl.constexpr,
    HW_BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    k = tl.arange(0, K_PAD)
    in_k = k < K
    pres = (tl.load(present_ptr + b * K + k, mask=in_k, other=0) != 0) & in_k
    hw = tl.arange(0, HW_BLOCK).to(tl.int64) + blk * HW_BLOCK
    in_hw = hw < HW
    f_pix = (b * f_sb + hw * f_sp)[None, :]
    d_idx = tl.arange(0, D_BLOCK)
    u = tl.zeros([K_PAD, HW_BLOCK], tl.float32)
    ff = tl.zeros([HW_BLOCK], tl.float32)
    for d0 in range(0, D, D_BLOCK):
        d = d0 + d_idx
        f = tl.load(f_ptr + f_pix + d[:, None].to(tl.int64) * f_sd, mask=(d < D)[:, None] & in_hw[None, :],
                    other=0.0).to(tl.float32)  # [D_BLOCK, HW_BLOCK]
        a = tl.load(a_ptr + b * K * D + k[:, None] * D + d[None, :], mask=in_k[:, None] & (d < D)[None, :],
                    other=0.0)  # [K_PAD, D_BLOCK]
        u = tl.dot(a, f, u, input_precision=PRECISION)
        ff += tl.sum(f * f, axis=0)
    n = tl.maximum(tl.sqrt(ff), 1e-6)  # EPS as in the reference
    o = tl.where(pres[:, None], u * (inv_tau / n)[None, :], -1e4)  # ABSENT
    tl.store(o_ptr + (b * K + k[:, None]) * HW + hw[None, :], o, mask=in_k[:, None] & in_hw[None, :])
    tl.store(n_ptr + b * HW + hw, n, mask=in_hw)


@triton.jit
def _prototype_logits_bwd_kernel(
    f_ptr,  # [B, D, HW] pixel features, element strides (f_sb, f_sd, f_sp)
    a_ptr,  # [B, K, D] fp32 normalised prototypes A_hat
    present_ptr,  # [B, K] uint8
    o_ptr,  # [B, K, HW] fp32 the forward's logits
    n_ptr,  # [B, HW] fp32 the forward's max(||f||, EPS)
    go_ptr,  # [B, K, HW] fp32 dL/dlogits
    gf_ptr,  # [B, D, HW] out (feature dtype, strides gf_s*): dL/df (written when WRITE_GF)
    ga_ptr,  # [B, n_split, K, D] fp32 in place: a program's partial dL/dA_hat, set by its first block (when WRITE_GA)
    D,
    HW,
    K,
    inv_tau,
    blocks_per_prog,  # pixel blocks [split * blocks_per_prog, ...) belong to program split
    f_sb, f_sd, f_sp,
    gf_sb, gf_sd, gf_sp,
    WRITE_GF: tl.constexpr,
    WRITE_GA: tl.constexpr,
    K_PAD: tl.constexpr,
    D_BLOCK: tl.constexpr,
    HW_BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    k = tl.arange(0, K_PAD)
    in_k = k < K
    pres = (tl.load(present_ptr + b * K + k, mask=in_k, other=0) != 0) & in_k
    d_idx = tl.arange(0, D_BLOCK)
    ws_base = (b * tl.num_programs(0) + split) * K * D  # this program's [K, D] slice of the workspace
    blk0 = split * blocks_per_prog
    for blk in range(blk0, tl.minimum(blk0 + blocks_per_prog, tl.cdiv(HW, HW_BLOCK))):
        hw = tl.arange(0, HW_BLOCK).to(tl.int64) + blk * HW_BLOCK
        in_hw = hw < HW
        ko = (b * K + k[:, None]) * HW + hw[None, :]  # [K_PAD, HW_BLOCK]
        live = pres[:, None] & in_hw[None, :]
        g = tl.load(go_ptr + ko, mask=live, other=0.0)  # absent classes: constant logits, no gradient
        o = tl.load(o_ptr + ko, mask=live, other=0.0)
        n = tl.load(n_ptr + b * HW + hw, mask=in_hw, other=1.0)
        w = g * (inv_tau / n)[None, :]  # dL/du, u = A_hat f
        # sum_k w_k u_k = sum_k g_k o_k (o = u / (tau n)): the normalisation's term needs no second pass
        r = tl.where(n > 1e-6, -tl.sum(g * o, axis=0) / (n * n), 0.0)  # [HW_BLOCK]
        f_pix = (b * f_sb + hw * f_sp)[None, :]
        gf_pix = (b * gf_sb + hw * gf_sp)[None, :]
        for d0 in range(0, D, D_BLOCK):
            d = d0 + d_idx
            in_d = d < D
            d64 = d[:, None].to(tl.int64)
            f_mask = in_d[:, None] & in_hw[None, :]
            a_mask = in_k[:, None] & in_d[None, :]
            f = tl.load(f_ptr + f_pix + d64 * f_sd, mask=f_mask, other=0.0).to(tl.float32)
            if WRITE_GF:
                a = tl.load(a_ptr + b * K * D + k[:, None] * D + d[None, :], mask=a_mask, other=0.0)
                gf = tl.dot(tl.trans(a), w, input_precision=PRECISION) + f * r[None, :]  # [D_BLOCK, HW_BLOCK]
                tl.store(gf_ptr + gf_pix + d64 * gf_sd, gf.to(gf_ptr.dtype.element_ty), mask=f_mask)
            if WRITE_GA:
                ws = ga_ptr + ws_base + k[:, None] * D + d[None, :]
                ga = tl.load(ws, mask=a_mask & (tl.full([K_PAD, D_BLOCK], blk, tl.int32) > blk0), other=0.0)
                ga = tl.dot(w, tl.trans(f), ga, input_precision=PRECISION)
                tl.store(ws, ga, mask=a_mask)
        if WRITE_GA:
            tl.debug_barrier()  # the next block re-reads the slice, possibly from other threads of the program


def _logits_tiling(k):
    """(K_PAD, D_BLOCK, HW_BLOCK) of the logits kernels (8 warps): prototype_kl's, whose pixel block keeps its
    [K_PAD, HW_BLOCK] fp32 tiles within the register file (sm_90 registers and spills: bench/results/aot_sm90.md)."""
    k_pad = max(16, next_pow2(k))
    return k_pad, 16, max(16, min(64, 2048 // k_pad))


def prototype_logits_forward(feat, ahat, present, tau):
    """Returns (logits [B, K, H, W] fp32, norms [B, H*W] fp32: max(||f||, EPS) per pixel)."""
    f, f_strides = strided_bchw(feat)  # no copy for NCHW or channels-last
    a = ahat.float().contiguous()
    pres = present.contiguous().view(torch.uint8)
    b, d, h, w = f.shape
    k = a.shape[1]
    k_pad, d_block, hw_block = _logits_tiling(k)
    logits = empty((b, k, h, w), torch.float32, f.device)
    norms = empty((b, h * w), torch.float32, f.device)
    _prototype_logits_fwd_kernel[(triton.cdiv(h * w, hw_block), b)](
        f, a, pres, logits, norms, d, h * w, k, 1.0 / float(tau), *f_strides, K_PAD=k_pad, D_BLOCK=d_block,
        HW_BLOCK=hw_block, PRECISION=DOT_PRECISION, num_warps=8)
    return logits, norms


def prototype_logits_backward(feat, ahat, present, tau, logits, norms, grad_logits, write_gf, write_ga):
    """(dL/df in the features' dtype and layout or [0], dL/dA_hat [B, K, D] fp32 or [0]) from dL/dlogits."""
    f, f_strides = strided_bchw(feat)
    a = ahat.float().contiguous()
    pres = present.contiguous().view(torch.uint8)
    go = grad_logits.float().contiguous()
    b, d = f.shape[:2]
    hw = f[0, 0].numel()
    k = a.shape[1]
    k_pad, d_block, hw_block = _logits_tiling(k)
    n_blk = triton.cdiv(hw, hw_block)
    per = triton.cdiv(n_blk, _ga_splits(b, k, d, n_blk)) if write_ga else 1
    n_split = triton.cdiv(n_blk, per)
    gf = empty_like(feat) if write_gf else f.new_empty(0)
    gf_strides = strided_bchw(gf)[1] if write_gf else f_strides
    ws = empty((b, n_split, k, d), torch.float32, f.device) if write_ga else a.new_empty(0)
    _prototype_logits_bwd_kernel[(n_split, b)](
        f, a, pres, logits, norms, go, gf if write_gf else f, ws if write_ga else a, d, hw, k, 1.0 / float(tau),
        per, *f_strides, *gf_strides, WRITE_GF=write_gf, WRITE_GA=write_ga, K_PAD=k_pad, D_BLOCK=d_block,
        HW_BLOCK=hw_block, PRECISION=DOT_PRECISION, num_warps=8)
    return gf, (ws.sum(1) if write_ga else ws)


@torch.library.custom_op("segkd::prototype_logits", mutates_args=())
def _prototype_logits_op(feat: torch.Tensor, ahat: torch.Tensor, present: torch.Tensor,
                         tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    return prototype_logits_forward(feat, ahat, present, tau)


@_prototype_logits_op.register_fake
def _(feat, ahat, present, tau):
    b, _, h, w = feat.shape
    return feat.new_empty((b, ahat.shape[1], h, w), dtype=torch.float32), \
        feat.new_empty((b, h * w), dtype=torch.float32)


@torch.library.custom_op("segkd::prototype_logits_backward", mutates_args=())
def _prototype_logits_backward_op(feat: torch.Tensor, ahat: torch.Tensor, present: torch.Tensor, tau: float,
                                  logits: torch.Tensor, norms: torch.Tensor, grad_logits: torch.Tensor,
                                  write_gf: bool, write_ga: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return prototype_logits_backward(feat, ahat, present, tau, logits, norms, grad_logits, write_gf, write_ga)


@_prototype_logits_backward_op.register_fake
def _(feat, ahat, present, tau, logits, norms, grad_logits, write_gf, write_ga):
    gf = empty_like(feat, poison=False) if write_gf else feat.new_empty(0)
    ga = ahat.new_empty(ahat.shape, dtype=torch.float32) if write_ga else ahat.new_empty(0, dtype=torch.float32)
    return gf, ga


def _logits_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    feat, ahat, present, tau = inputs
    logits, norms = output
    ctx.mark_non_differentiable(norms)
    ctx.save_for_backward(feat, ahat, present, logits, norms)
    ctx.tau = tau


def _logits_backward(ctx, grad_logits, _grad_norms):
    if grad_logits is None:
        return None, None, None, None
    feat, ahat, present, logits, norms = ctx.saved_tensors
    write_gf, write_ga = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gf, ga = _prototype_logits_backward_op(feat, ahat, present, ctx.tau, logits, norms, grad_logits, write_gf,
                                           write_ga)
    return gf if write_gf else None, ga if write_ga else None, None, None


_prototype_logits_op.register_autograd(_logits_backward, setup_context=_logits_setup_context)


def _check_observation(name, feat, protos, present):
    if feat.dim() != 4 or protos.dim() != 3 or protos.shape[0] != feat.shape[0] or protos.shape[2] != feat.shape[1]:
        raise ValueError(f"{name}: feat {tuple(feat.shape)} must be [B, D, H, W] and protos {tuple(protos.shape)} "
                         "[B, K, D] with the same B and D")
    _check_present(name, present, protos)


def _check_present(name, present, protos):
    if present.shape != protos.shape[:2] or present.dtype != torch.bool:
        raise ValueError(f"{name}: present must be a bool [B, K] mask, got {present.dtype} {tuple(present.shape)}")


def _scale_tensor(name, scale, device):
    """An op's optional `scale` (a number or a one-element tensor) as a tensor on `device`, or None."""
    if scale is not None and not torch.is_tensor(scale):
        scale = torch.full((), float(scale), dtype=torch.float32, device=device)
    if scale is not None and scale.numel() != 1:
        raise ValueError(f"{name}: scale must be a number or a one-element tensor, got {tuple(scale.shape)}")
    return scale


def prototype_logits(feat, protos, present, tau):
    """Observation logits cos(f, A)/tau [B, K, H, W] fp32, absent classes ABSENT; see the module docstring.
    feat need not be normalised: the kernel normalises each pixel as it reads it.

    Fused when `kernels._dispatch.use_triton` says so: the forward reads the features once and writes the logits
    and the per-pixel norms; the backward (APD's L_t trains the teacher projector through it) reads the features
    once more and writes dL/df in their layout and dL/dA_hat (a two-stage sum, as prototype_kl's). The
    prototypes are normalised in torch, which carries their gradient back to the unnormalised ones.
    """
    _check_observation("prototype_logits", feat, protos, present)
    if not use_triton(feat, protos):
        return prototype_logits_reference(feat, protos, present, tau)
    ahat = F.normalize(protos.float(), dim=2, eps=EPS)
    return _prototype_logits_op(feat, ahat, present, float(tau))[0]


def prototype_ce(feat, protos, present, labels, tau, ignore_index=255, scale=None):
    """APD's L_t in the paper convention: the cross-entropy of the observation logits cos(f, A)/tau against the labels
    at feature resolution, mean over the valid pixels; = segmentation_ce(prototype_logits(...), labels) without the
    logits. Both the features and the prototypes take gradients (L_t trains the teacher projector).

    Fused when `kernels._dispatch.use_triton` says so: prototype_kl's kernel with the labels' one-hot as the target
    (LABELS), so one pass over the features computes the loss and writes dL/df and dL/dA_hat (a scalar loss: the
    backward only scales them, and not at all at grad_output 1). The mean over valid pixels is a device tensor: no
    host sync.
    """
    _check_observation("prototype_ce", feat, protos, present)
    if labels.shape != feat.shape[:1] + feat.shape[2:] or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"prototype_ce: labels must be an integer [B, H, W] tensor at the features' resolution, got "
                         f"{labels.dtype} {tuple(labels.shape)} for features {tuple(feat.shape)}")
    scale = _scale_tensor("prototype_ce", scale, feat.device)
    if not use_triton(feat, protos) or (scale is not None and needs_grad(scale)):
        return prototype_ce_reference(feat, protos, present, labels, tau, ignore_index, scale)
    b, k = protos.shape[:2]
    valid = (labels >= 0) & (labels < k) & (labels != ignore_index)
    factor = (labels.numel() / valid.sum().clamp_min(1)).to(torch.float32)  # the kernel divides by B*H*W
    factor = factor if scale is None else factor * scale.reshape(()).float()
    ahat = F.normalize(protos.float(), dim=2, eps=EPS)
    return _prototype_kl_op(feat, feat, ahat, ahat, present, float(tau), needs_grad(feat), needs_grad(protos),
                            factor.reshape(()), labels, int(ignore_index))[0]


def prototype_kl(feat_s, feat_t, protos_s, protos_t, present, tau, scale=None):
    """APD observation loss L_ob; see the module docstring. scale: an optional constant factor (a float or a 0-dim
    tensor without gradient, e.g. a loss weight times a normalisation computed on the device), applied inside the
    kernel so that the backward need not rescale dL/df_s.

    Fused kernel when `kernels._dispatch.use_triton` says so. If the teacher features or prototypes (or the
    scale) require grad (the caller normally detaches them), the exact torch reference runs instead.
    """
    if feat_s.dim() != 4 or feat_s.shape != feat_t.shape:
        raise ValueError(f"prototype_kl: feat_s {tuple(feat_s.shape)} and feat_t {tuple(feat_t.shape)} must both "
                         "be [B, D, H, W]")
    b, d = feat_s.shape[:2]
    if protos_s.shape != protos_t.shape or protos_s.dim() != 3 or protos_s.shape[0] != b or protos_s.shape[2] != d:
        raise ValueError(f"prototype_kl: protos_s {tuple(protos_s.shape)} and protos_t {tuple(protos_t.shape)} must "
                         f"both be [B, K, D] with B={b}, D={d}")
    _check_present("prototype_kl", present, protos_s)
    scale = _scale_tensor("prototype_kl", scale, feat_s.device)
    fixed = (feat_t, protos_t) if scale is None else (feat_t, protos_t, scale)
    if not use_triton(feat_s, feat_t, protos_s, protos_t) or needs_grad(*fixed):
        return prototype_kl_reference(feat_s, feat_t, protos_s, protos_t, present, tau, scale)
    ahat_s = F.normalize(protos_s.float(), dim=2, eps=EPS)  # [B, K, D]; torch autograd covers the normalisation
    ahat_t = F.normalize(protos_t.float(), dim=2, eps=EPS)
    return _prototype_kl_op(feat_s, feat_t, ahat_s, ahat_t, present, float(tau), needs_grad(feat_s),
                            needs_grad(protos_s), None if scale is None else scale.reshape(()))[0]
