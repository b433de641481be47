"""Channel-wise distillation (CWD): KL between per-channel spatial distributions.

    L = T^2 / (B*C) * sum_{b,c} sum_{hw} q_t * (log q_t - log q_s),   q = softmax(z / T) over the H*W positions
    dL/dz_s = T / (B*C) * (q_s - q_t)

Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction" (ICCV 2021). Their code divides
the summed KL by N*C exactly as here, so CWD's published weight (3 on logits, T = 4) carries over unchanged.

Each (b, c) row of H*W logits (contiguous for NCHW; a stride-C row of a channels-last tensor, read in place
through the strides, never copied; the gradient takes the student's layout) can be far longer than a block,
and a row per program would leave most of a GPU idle at B*C = 152, so rows are cut into splits: pass 1 gives
each split's online max and sum of exp, pass 2 combines a row's splits into its log-normaliser, then computes the
KL and (when the student needs it) writes the gradient. A row that fits one split (up to kernels._dispatch
ROW_CHUNK = 8192 logits, the workload's 64x128 maps) is done in one pass instead: one program holds the row of both
inputs in registers, so each logit is read once and the gradient written once (issue 12: 1.67x -> 1.00x the
minimum bytes in the traffic model). Backward only scales that gradient, and not at all when
grad_output is 1: a method's weight is passed as `scale` (loss and gradient scaled in the forward) rather than
multiplied onto the result.
"""
import torch
import torch.nn.functional as F

from kernels import _cpp
from kernels._dispatch import (eager_cpp, eager_function, empty, empty_like, needs_grad, next_pow2, row_tiling,
                               strided_bchw, triton, tl, upcast, use_cpp, use_triton)
from kernels._grad_scale import scale_grad


def channel_kl_reference(student, teacher, temperature=4.0, scale=1.0):
    """student, teacher: [B, C, H, W]; scale: a constant factor. Returns a float32 scalar."""
    t = float(temperature)
    b, c = student.shape[:2]
    log_qs = F.log_softmax(upcast(student).reshape(b, c, -1) / t, dim=-1)  # [B, C, HW]
    log_qt = F.log_softmax(upcast(teacher).reshape(b, c, -1) / t, dim=-1)
    return ((log_qt.exp() * (log_qt - log_qs)).sum() * (t * t * scale) / (b * c)).float()


@triton.jit
def _channel_kl_stats_kernel(
    s_ptr,  # [R, L] student logits, R = B*C rows (b, c) of L = H*W; element strides (s_sb, s_sc, s_sp)
    t_ptr,  # [R, L] teacher logits, element strides (t_sb, t_sc, t_sp)
    stats_ptr,  # [4, R, S] fp32 out: per split, max and sum of exp(x - max) of z_s/T, then of z_t/T
    L,
    C,
    s_sb, s_sc, s_sp,
    t_sb, t_sc, t_sp,
    inv_temp,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_rows = tl.num_programs(0)
    n_splits = tl.num_programs(1)
    start = split.to(tl.int64) * CHUNK
    ms = float("-inf")
    mt = float("-inf")
    zs_sum = 0.0
    zt_sum = 0.0
    s_row = (row // C) * s_sb + (row % C) * s_sc
    t_row = (row // C) * t_sb + (row % C) * t_sc
    for i in range(0, CHUNK, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)  # [BLOCK]
        m = idx < L
        # Out-of-row lanes get -1e30: exp(-1e30 - max) = 0, and every split starts inside the row so
        # its running max is a real logit from the first step on.
        zs = tl.where(m, tl.load(s_ptr + s_row + idx * s_sp, mask=m, other=0.0).to(tl.float32) * inv_temp, -1e30)
        zt = tl.where(m, tl.load(t_ptr + t_row + idx * t_sp, mask=m, other=0.0).to(tl.float32) * inv_temp, -1e30)
        ms_new = tl.maximum(ms, tl.max(zs, axis=0))
        mt_new = tl.maximum(mt, tl.max(zt, axis=0))
        zs_sum = zs_sum * tl.exp(ms - ms_new) + tl.sum(tl.exp(zs - ms_new), axis=0)
        zt_sum = zt_sum * tl.exp(mt - mt_new) + tl.sum(tl.exp(zt - mt_new), axis=0)
        ms = ms_new
        mt = mt_new
    out = row * n_splits + split
    plane = n_rows * n_splits
    tl.store(stats_ptr + out, ms)
    tl.store(stats_ptr + plane + out, zs_sum)
    tl.store(stats_ptr + 2 * plane + out, mt)
    tl.store(stats_ptr + 3 * plane + out, zt_sum)


@triton.jit
def _channel_kl_fwd_kernel(
    s_ptr,  # [R, L] student logits, element strides (s_sb, s_sc, s_sp)
    t_ptr,  # [R, L] teacher logits, element strides (t_sb, t_sc, t_sp)
    stats_ptr,  # [4, R, S] fp32 split statistics from _channel_kl_stats_kernel
    kl_ptr,  # [R, S] fp32 out: sum of q_t * (log q_t - log q_s) over each split
    g_ptr,  # [R, L] out (student dtype, strides g_s*): dL/dz_s for grad_output = 1 (written when WRITE_GRAD)
    L,
    C,
    s_sb, s_sc, s_sp,
    t_sb, t_sc, t_sp,
    g_sb, g_sc, g_sp,
    inv_temp,
    g_scale,  # T * scale / (B*C)
    WRITE_GRAD: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    S_PAD: tl.constexpr,  # next power of two >= S
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_rows = tl.num_programs(0)
    n_splits = tl.num_programs(1)
    plane = n_rows * n_splits
    # Combine the row's splits: log sum exp = M + log(sum_i z_i * exp(m_i - M)).
    sp = tl.arange(0, S_PAD)
    sm = sp < n_splits
    st_off = row * n_splits + sp
    m_s = tl.load(stats_ptr + st_off, mask=sm, other=float("-inf"))
    z_s = tl.load(stats_ptr + plane + st_off, mask=sm, other=0.0)
    m_t = tl.load(stats_ptr + 2 * plane + st_off, mask=sm, other=float("-inf"))
    z_t = tl.load(stats_ptr + 3 * plane + st_off, mask=sm, other=0.0)
    max_s = tl.max(m_s, axis=0)
    max_t = tl.max(m_t, axis=0)
    log_zs = tl.log(tl.sum(z_s * tl.exp(m_s - max_s), axis=0))
    log_zt = tl.log(tl.sum(z_t * tl.exp(m_t - max_t), axis=0))

    start = split.to(tl.int64) * CHUNK
    s_row = (row // C) * s_sb + (row % C) * s_sc
    t_row = (row // C) * t_sb + (row % C) * t_sc
    g_row = (row // C) * g_sb + (row % C) * g_sc
    kl = tl.zeros([BLOCK], tl.float32)
    for i in range(0, CHUNK, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        m = idx < L
        zs = tl.load(s_ptr + s_row + idx * s_sp, mask=m, other=0.0).to(tl.float32) * inv_temp
        zt = tl.load(t_ptr + t_row + idx * t_sp, mask=m, other=0.0).to(tl.float32) * inv_temp
        lqs = (zs - max_s) - log_zs
        lqt = (zt - max_t) - log_zt
        qt = tl.exp(lqt)
        kl += tl.where(m, qt * (lqt - lqs), 0.0)
        if WRITE_GRAD:
            tl.store(g_ptr + g_row + idx * g_sp, (g_scale * (tl.exp(lqs) - qt)).to(g_ptr.dtype.element_ty), mask=m)
    tl.store(kl_ptr + row * n_splits + split, tl.sum(kl, axis=0))


@triton.jit
def _channel_kl_row_kernel(
    s_ptr,  # [R, L] student logits, element strides (s_sb, s_sc, s_sp)
    t_ptr,  # [R, L] teacher logits, element strides (t_sb, t_sc, t_sp)
    kl_ptr,  # [R] fp32 out: sum of q_t * (log q_t - log q_s) over the row
    g_ptr,  # [R, L] out (student dtype, strides g_s*): dL/dz_s for grad_output = 1 (written when WRITE_GRAD)
    L,
    C,
    s_sb, s_sc, s_sp,
    t_sb, t_sc, t_sp,
    g_sb, g_sc, g_sp,
    inv_temp,
    g_scale,  # T * scale / (B*C)
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,  # >= L: the whole row in registers
):
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    m = idx < L
    s_row = (row // C) * s_sb + (row % C) * s_sc
    t_row = (row // C) * t_sb + (row % C) * t_sc
    zs = tl.where(m, tl.load(s_ptr + s_row + idx * s_sp, mask=m, other=0.0).to(tl.float32) * inv_temp, -1e30)
    zt = tl.where(m, tl.load(t_ptr + t_row + idx * t_sp, mask=m, other=0.0).to(tl.float32) * inv_temp, -1e30)
    xs = zs - tl.max(zs, axis=0)
    xt = zt - tl.max(zt, axis=0)
    lqs = xs - tl.log(tl.sum(tl.exp(xs), axis=0))
    lqt = xt - tl.log(tl.sum(tl.exp(xt), axis=0))
    qt = tl.exp(lqt)
    tl.store(kl_ptr + row, tl.sum(tl.where(m, qt * (lqt - lqs), 0.0), axis=0))
    if WRITE_GRAD:
        g_row = (row // C) * g_sb + (row % C) * g_sc
        tl.store(g_ptr + g_row + idx * g_sp, (g_scale * (tl.exp(lqs) - qt)).to(g_ptr.dtype.element_ty), mask=m)


def channel_kl_forward(student, teacher, temperature, write_grad, scale=1.0):
    """Launch both passes. Returns (loss [] fp32, dL/dz_s [B, C, H, W] student dtype, or [0] if not asked), both
    times `scale`."""
    s, s_strides = strided_bchw(student)  # no copy for NCHW or channels-last
    t, t_strides = strided_bchw(teacher)
    b, c = s.shape[:2]
    rows, length = b * c, s[0, 0].numel()
    temp = float(temperature)
    if use_cpp("channel_kl", s):  # the C++ kernel (csrc/): one task / CUDA block per row, same buffers
        kl = empty((rows,), torch.float32, s.device)
        g = empty_like(student) if write_grad else s.new_empty(0)
        _cpp.ops().channel_kl(s, t, kl, g, temp, float(scale), write_grad)
        return kl.sum() * (temp * temp * scale / rows), g
    g = empty_like(student) if write_grad else s.new_empty(0)  # the student's memory format
    g_strides = strided_bchw(g)[1] if write_grad else s_strides
    block, chunk, n_splits = row_tiling(length)
    if n_splits == 1:  # a row within one split (8192 logits: the workload's 64x128 maps) is held in registers
        kl = empty((rows,), torch.float32, s.device)
        block = max(16, next_pow2(length))
        _channel_kl_row_kernel[(rows,)](s, t, kl, g if write_grad else s, length, c, *s_strides, *t_strides,
                                        *g_strides, 1.0 / temp, temp * scale / rows, WRITE_GRAD=write_grad,
                                        BLOCK=block, num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16)
        return kl.sum() * (temp * temp * scale / rows), g
    stats = empty((4, rows, n_splits), torch.float32, s.device)
    kl = empty((rows, n_splits), torch.float32, s.device)
    grid = (rows, n_splits)
    warps = 4 if block <= 1024 else 8
    _channel_kl_stats_kernel[grid](s, t, stats, length, c, *s_strides, *t_strides, 1.0 / temp, CHUNK=chunk,
                                   BLOCK=block, num_warps=warps)
    _channel_kl_fwd_kernel[grid](s, t, stats, kl, g if write_grad else s, length, c, *s_strides, *t_strides,
                                 *g_strides, 1.0 / temp, temp * scale / rows,
                                 WRITE_GRAD=write_grad, CHUNK=chunk, BLOCK=block, S_PAD=next_pow2(n_splits),
                                 num_warps=warps)
    return kl.sum() * (temp * temp * scale / rows), g


@torch.library.custom_op("segkd::channel_kl", mutates_args=())
def _channel_kl_op(student: torch.Tensor, teacher: torch.Tensor, temperature: float, write_grad: bool,
                   scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    return channel_kl_forward(student, teacher, temperature, write_grad, scale)


@_channel_kl_op.register_fake
def _(student, teacher, temperature, write_grad, scale=1.0):
    grad = empty_like(student, poison=False) if write_grad else student.new_empty(0)  # as the launcher
    return student.new_empty((), dtype=torch.float32), grad


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no full-size zero gradient for the outputs that take none
    grad = output[1]
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad)


def _backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    scale_grad(grad, grad_loss)
    return grad, None, None, None, None


_channel_kl_op.register_autograd(_backward, setup_context=_setup_context)
_ChannelKlEager = eager_function(channel_kl_forward, _setup_context, _backward)  # see eager_cpp


def channel_kl(student, teacher, temperature=4.0, scale=1.0):
    """Channel-wise KD loss; see the module docstring for the formula and normalisation. scale: a constant factor
    of the loss (a method's weight), applied in the kernel so that the backward need not rescale the gradient.

    Fused kernels when `kernels._dispatch.use_triton` says so; a teacher that requires grad takes the
    torch reference (the kernels differentiate the student only).
    """
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(f"channel_kl: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "must both be [B, C, H, W]")
    if not (use_cpp("channel_kl", student) or use_triton(student, teacher, op="channel_kl")) or needs_grad(teacher):
        return channel_kl_reference(student, teacher, temperature, scale)
    op = _ChannelKlEager.apply if eager_cpp(student) else _channel_kl_op
    return op(student, teacher, float(temperature), needs_grad(student), float(scale))[0]
