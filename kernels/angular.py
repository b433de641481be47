"""Angular distillation: squared distance between L2-normalised student and teacher features.

With n(x) = x / max(||x||_2, EPS), EPS = 1e-6 (the F.normalize convention: a zero vector normalises to
zero, never NaN, in value and gradient), per sample b and averaged over the batch:

    "layer"   (LAD): sum_i (n(s)_i - n(t)_i)^2                         norm over all C*H*W entries
    "channel" (CAD): (1/C) * sum_c sum_hw (n(s_c)_hw - n(t_c)_hw)^2    norm over H*W per channel
    "point"   (PAD): (1/(H*W)) * sum_hw sum_c (n(s_hw)_c - n(t_hw)_c)^2  norm over C per pixel

Each per-sample value lies in [0, 4]. Liu et al., "Rethinking Knowledge Distillation with Raw Features
for Semantic Segmentation" (WACV 2024).

Fused form. In every mode the loss is the mean, over G groups (samples, (b, c) rows or (b, hw) pixels),
of a function of three sums over the group's vectors s and t:

    ss = s.s, tt = t.t, st = s.t,   ns = max(sqrt(ss), EPS), nt = max(sqrt(tt), EPS)
    g  = ss/ns^2 + tt/nt^2 - 2 st/(ns nt)
    dL/ds = (2/G) * [ (1 - c) s / ns^2 - t / (ns nt) ],   c = [sqrt(ss) > EPS] * (ss/ns^2 - st/(ns nt))

so forward is one reading pass (the three sums) and backward one more (read s and t, write dL/ds).
"""
import torch
import torch.nn.functional as F

from kernels._dispatch import empty, needs_grad, next_pow2, row_tiling, triton, tl, upcast, use_triton

EPS = 1e-6
MODES = ("layer", "channel", "point")


def angular_loss_reference(student, teacher, mode):
    """student, teacher: [B, C, H, W] of the same shape. Returns a float32 scalar."""
    if mode not in MODES:
        raise ValueError(f"angular_loss: unknown mode {mode!r}; expected one of {MODES}")
    b, c = student.shape[:2]
    s = upcast(student).reshape(b, c, -1)  # [B, C, HW]
    t = upcast(teacher).reshape(b, c, -1)
    if mode == "layer":
        d = F.normalize(s.reshape(b, -1), dim=1, eps=EPS) - F.normalize(t.reshape(b, -1), dim=1, eps=EPS)
        return d.pow(2).sum(1).mean().float()
    if mode == "channel":
        d = F.normalize(s, dim=2, eps=EPS) - F.normalize(t, dim=2, eps=EPS)
        return (d.pow(2).sum((1, 2)).mean() / c).float()
    d = F.normalize(s, dim=1, eps=EPS) - F.normalize(t, dim=1, eps=EPS)
    return (d.pow(2).sum((1, 2)).mean() / s.shape[2]).float()


@triton.jit
def _angular_rows_stats_kernel(
    s_ptr,  # [R, L] student; rows are samples (layer, L = C*H*W) or channels (channel, L = H*W)
    t_ptr,  # [R, L] teacher
    out_ptr,  # [3, R, S] fp32 out: per split, sum of s*s, t*t, s*t
    L,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_rows = tl.num_programs(0)
    n_splits = tl.num_programs(1)
    start = split.to(tl.int64) * CHUNK
    ss = tl.zeros([BLOCK], tl.float32)
    tt = tl.zeros([BLOCK], tl.float32)
    st = tl.zeros([BLOCK], tl.float32)
    for i in range(0, CHUNK, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        m = idx < L
        s = tl.load(s_ptr + row * L + idx, mask=m, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + row * L + idx, mask=m, other=0.0).to(tl.float32)
        ss += s * s
        tt += t * t
        st += s * t
    out = row * n_splits + split
    plane = n_rows * n_splits
    tl.store(out_ptr + out, tl.sum(ss, axis=0))
    tl.store(out_ptr + plane + out, tl.sum(tt, axis=0))
    tl.store(out_ptr + 2 * plane + out, tl.sum(st, axis=0))


@triton.jit
def _angular_point_stats_kernel(
    s_ptr,  # [B, C, HW] student
    t_ptr,  # [B, C, HW] teacher
    out_ptr,  # [3, B, HW] fp32 out: per pixel, sum over C of s*s, t*t, s*t
    C,
    HW,
    C_BLOCK: tl.constexpr,
    HW_BLOCK: tl.constexpr,
):
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_b = tl.num_programs(1)
    hw = blk.to(tl.int64) * HW_BLOCK + tl.arange(0, HW_BLOCK)  # [HW_BLOCK]
    in_hw = hw < HW
    c_idx = tl.arange(0, C_BLOCK)
    ss = tl.zeros([HW_BLOCK], tl.float32)
    tt = tl.zeros([HW_BLOCK], tl.float32)
    st = tl.zeros([HW_BLOCK], tl.float32)
    for c0 in range(0, C, C_BLOCK):
        offs = b * C * HW + (c0 + c_idx)[:, None].to(tl.int64) * HW + hw[None, :]  # [C_BLOCK, HW_BLOCK]
        m2 = ((c0 + c_idx) < C)[:, None] & in_hw[None, :]
        s = tl.load(s_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        ss += tl.sum(s * s, axis=0)
        tt += tl.sum(t * t, axis=0)
        st += tl.sum(s * t, axis=0)
    plane = n_b * HW
    tl.store(out_ptr + b * HW + hw, ss, mask=in_hw)
    tl.store(out_ptr + plane + b * HW + hw, tt, mask=in_hw)
    tl.store(out_ptr + 2 * plane + b * HW + hw, st, mask=in_hw)


@triton.jit
def _angular_rows_bwd_kernel(
    s_ptr,  # [R, L] student
    t_ptr,  # [R, L] teacher
    k_ptr,  # [2, R] fp32: dL/ds = k1 * s - k2 * t within a row
    g_ptr,  # [R, L] out (student dtype): dL/ds
    L,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    k1 = tl.load(k_ptr + row)
    k2 = tl.load(k_ptr + tl.num_programs(0) + row)
    start = split.to(tl.int64) * CHUNK
    for i in range(0, CHUNK, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        m = idx < L
        s = tl.load(s_ptr + row * L + idx, mask=m, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + row * L + idx, mask=m, other=0.0).to(tl.float32)
        tl.store(g_ptr + row * L + idx, (k1 * s - k2 * t).to(g_ptr.dtype.element_ty), mask=m)


@triton.jit
def _angular_point_bwd_kernel(
    s_ptr,  # [B, C, HW] student
    t_ptr,  # [B, C, HW] teacher
    k_ptr,  # [2, B, HW] fp32: dL/ds = k1 * s - k2 * t at each pixel
    g_ptr,  # [B, C, HW] out (student dtype): dL/ds
    C,
    HW,
    C_BLOCK: tl.constexpr,
    HW_BLOCK: tl.constexpr,
):
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hw = blk.to(tl.int64) * HW_BLOCK + tl.arange(0, HW_BLOCK)
    in_hw = hw < HW
    k1 = tl.load(k_ptr + b * HW + hw, mask=in_hw, other=0.0)[None, :]  # [1, HW_BLOCK]
    k2 = tl.load(k_ptr + tl.num_programs(1) * HW + b * HW + hw, mask=in_hw, other=0.0)[None, :]
    c_idx = tl.arange(0, C_BLOCK)
    for c0 in range(0, C, C_BLOCK):
        offs = b * C * HW + (c0 + c_idx)[:, None].to(tl.int64) * HW + hw[None, :]
        m2 = ((c0 + c_idx) < C)[:, None] & in_hw[None, :]
        s = tl.load(s_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        tl.store(g_ptr + offs, (k1 * s - k2 * t).to(g_ptr.dtype.element_ty), mask=m2)


def _point_tiling(c, hw):
    """(C_BLOCK, HW_BLOCK, num_warps) for the point mode: ~4K-element tiles on 8 warps (< 100 registers)."""
    c_block = min(32, next_pow2(c))
    hw_block = min(max(16, 4096 // c_block), max(16, next_pow2(hw)))
    return c_block, hw_block, 8 if c_block * hw_block >= 4096 else 4


def _rows(s, mode):
    """The [R, L] row view of a contiguous [B, C, H, W] tensor for the layer and channel modes."""
    b, c = s.shape[:2]
    return (b, s[0].numel()) if mode == "layer" else (b * c, s[0, 0].numel())


def angular_forward(student, teacher, mode):
    """Returns (loss [] fp32, stats [3, G] fp32: ss, tt, st per group) with G groups as in the docstring."""
    s = student.contiguous()
    t = teacher.contiguous()
    b, c = s.shape[:2]
    hw = s[0, 0].numel()
    if mode == "point":
        c_block, hw_block, warps = _point_tiling(c, hw)
        stats = empty((3, b, hw), torch.float32, s.device)
        _angular_point_stats_kernel[(triton.cdiv(hw, hw_block), b)](s, t, stats, c, hw, C_BLOCK=c_block,
                                                                     HW_BLOCK=hw_block, num_warps=warps)
        stats = stats.reshape(3, -1)
    else:
        rows, length = _rows(s, mode)
        block, chunk, n_splits = row_tiling(length)
        partial = empty((3, rows, n_splits), torch.float32, s.device)
        _angular_rows_stats_kernel[(rows, n_splits)](s, t, partial, length, CHUNK=chunk, BLOCK=block,
                                                     num_warps=4 if block <= 1024 else 8)
        stats = partial.sum(2)
    ss, tt, st = stats
    ns = ss.sqrt().clamp_min(EPS)
    nt = tt.sqrt().clamp_min(EPS)
    g = ss / (ns * ns) + tt / (nt * nt) - 2 * st / (ns * nt)  # [G]
    return g.clamp_min(0).mean(), stats  # clamp: rounding can take 2 - 2cos a hair below 0


def angular_backward(student, teacher, mode, stats, grad_loss):
    """dL/ds (student dtype) from the forward's group sums, for a loss gradient grad_loss (0-dim)."""
    s = student.contiguous()
    t = teacher.contiguous()
    b, c = s.shape[:2]
    hw = s[0, 0].numel()
    ss, tt, st = stats
    groups = ss.numel()
    ns = ss.sqrt().clamp_min(EPS)
    nt = tt.sqrt().clamp_min(EPS)
    cos_term = torch.where(ss.sqrt() > EPS, ss / (ns * ns) - st / (ns * nt), torch.zeros_like(ss))
    scale = 2.0 * grad_loss.float() / groups
    k = torch.stack([scale * (1 - cos_term) / (ns * ns), scale / (ns * nt)])  # [2, G]
    g = empty(s.shape, s.dtype, s.device)
    if mode == "point":
        c_block, hw_block, warps = _point_tiling(c, hw)
        _angular_point_bwd_kernel[(triton.cdiv(hw, hw_block), b)](s, t, k, g, c, hw, C_BLOCK=c_block,
                                                                   HW_BLOCK=hw_block, num_warps=warps)
    else:
        rows, length = _rows(s, mode)
        block, chunk, n_splits = row_tiling(length)
        _angular_rows_bwd_kernel[(rows, n_splits)](s, t, k, g, length, CHUNK=chunk, BLOCK=block,
                                                   num_warps=4 if block <= 1024 else 8)
    return g


@torch.library.custom_op("segkd::angular_loss", mutates_args=())
def _angular_op(student: torch.Tensor, teacher: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    return angular_forward(student, teacher, mode)


@_angular_op.register_fake
def _(student, teacher, mode):
    b, c = student.shape[:2]
    hw = student[0, 0].numel()
    groups = {"layer": b, "channel": b * c, "point": b * hw}[mode]
    return student.new_empty((), dtype=torch.float32), student.new_empty((3, groups), dtype=torch.float32)


@torch.library.custom_op("segkd::angular_loss_backward", mutates_args=())
def _angular_backward_op(student: torch.Tensor, teacher: torch.Tensor, mode: str, stats: torch.Tensor,
                         grad_loss: torch.Tensor) -> torch.Tensor:
    return angular_backward(student, teacher, mode, stats, grad_loss)


@_angular_backward_op.register_fake
def _(student, teacher, mode, stats, grad_loss):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no full-size zero gradient for the outputs that take none
    student, teacher, mode = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(student, teacher, output[1])
    ctx.mode = mode


def _backward(ctx, grad_loss, _grad_stats):
    student, teacher, stats = ctx.saved_tensors
    return _angular_backward_op(student, teacher, ctx.mode, stats, grad_loss), None, None


_angular_op.register_autograd(_backward, setup_context=_setup_context)


def angular_loss(student, teacher, mode):
    """Angular distillation loss (LAD/CAD/PAD); see the module docstring for the formulas.

    Fused kernels when `kernels._dispatch.use_triton` says so; a teacher that requires grad takes the
    torch reference (the kernels differentiate the student only).
    """
    if mode not in MODES:
        raise ValueError(f"angular_loss: unknown mode {mode!r}; expected one of {MODES}")
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(f"angular_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "must both be [B, C, H, W]")
    if not use_triton(student, teacher) or needs_grad(teacher):
        return angular_loss_reference(student, teacher, mode)
    return _angular_op(student, teacher, mode)[0]
