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

from kernels import _cpp
from kernels._dispatch import (eager_cpp, eager_function, empty, empty_like, needs_grad, next_pow2, row_tiling,
                               strided_bchw, triton, tl, upcast, use_cpp, use_triton)

EPS = 1e-6
MODES = ("layer", "channel", "point")  # the C++ kernels take the index
CPP_CHUNK = 8192  # elements per split of a layer / channel group in the C++ kernels (a CPU task, a CUDA block)


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


# Addressing. Every kernel indexes its tensors through strides, so NCHW and channels-last inputs are both read
# in place. Row kernels see a tensor as rows r = (r1, r2) = divmod(r, R2) of L elements i = (i1, i2) =
# divmod(i, N_IN); element (r, i) lives at r1*sr1 + r2*sr2 + i1*so + i2*si. TWO_LEVEL = False skips the
# element divmod (offset i*si) so that a unit-stride row stays visibly contiguous to the compiler. (Inlined in
# each kernel rather than a @triton.jit helper: tests/kernels/aot_compile.py swaps every JITFunction of the
# module for a recorder.)
@triton.jit
def _angular_rows_stats_kernel(
    s_ptr,  # [R, L] student, strides s_r1, s_r2, s_o, s_i; rows are samples (layer) or channels (channel)
    t_ptr,  # [R, L] teacher, strides t_r1, t_r2, t_o, t_i
    out_ptr,  # [3, R, S] fp32 out: per split, sum of s*s, t*t, s*t
    L,
    R2,
    N_IN,
    s_r1, s_r2, s_o, s_i,
    t_r1, t_r2, t_o, t_i,
    TWO_LEVEL: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_rows = tl.num_programs(0)
    n_splits = tl.num_programs(1)
    start = split.to(tl.int64) * CHUNK
    s_row = (row // R2) * s_r1 + (row % R2) * s_r2
    t_row = (row // R2) * t_r1 + (row % R2) * t_r2
    ss = tl.zeros([BLOCK], tl.float32)
    tt = tl.zeros([BLOCK], tl.float32)
    st = tl.zeros([BLOCK], tl.float32)
    for i in range(0, CHUNK, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        m = idx < L
        if TWO_LEVEL:
            s_off = s_row + (idx // N_IN) * s_o + (idx % N_IN) * s_i
            t_off = t_row + (idx // N_IN) * t_o + (idx % N_IN) * t_i
        else:
            s_off = s_row + idx * s_i
            t_off = t_row + idx * t_i
        s = tl.load(s_ptr + s_off, mask=m, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + t_off, mask=m, other=0.0).to(tl.float32)
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
    s_ptr,  # [B, C, HW] student, element strides (s_sb, s_sc, s_sp)
    t_ptr,  # [B, C, HW] teacher, element strides (t_sb, t_sc, t_sp)
    out_ptr,  # [3, B, HW] fp32 out: per pixel, sum over C of s*s, t*t, s*t
    C,
    HW,
    s_sb, s_sc, s_sp,
    t_sb, t_sc, t_sp,
    C_BLOCK: tl.constexpr,
    HW_BLOCK: tl.constexpr,
):
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_b = tl.num_programs(1)
    hw = blk.to(tl.int64) * HW_BLOCK + tl.arange(0, HW_BLOCK)  # [HW_BLOCK]
    in_hw = hw < HW
    s_pix = (b * s_sb + hw * s_sp)[None, :]  # [1, HW_BLOCK]
    t_pix = (b * t_sb + hw * t_sp)[None, :]
    c_idx = tl.arange(0, C_BLOCK)
    ss = tl.zeros([HW_BLOCK], tl.float32)
    tt = tl.zeros([HW_BLOCK], tl.float32)
    st = tl.zeros([HW_BLOCK], tl.float32)
    for c0 in range(0, C, C_BLOCK):
        ch = (c0 + c_idx)[:, None].to(tl.int64)  # [C_BLOCK, 1]
        m2 = ((c0 + c_idx) < C)[:, None] & in_hw[None, :]  # [C_BLOCK, HW_BLOCK]
        s = tl.load(s_ptr + s_pix + ch * s_sc, mask=m2, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + t_pix + ch * t_sc, mask=m2, other=0.0).to(tl.float32)
        ss += tl.sum(s * s, axis=0)
        tt += tl.sum(t * t, axis=0)
        st += tl.sum(s * t, axis=0)
    plane = n_b * HW
    tl.store(out_ptr + b * HW + hw, ss, mask=in_hw)
    tl.store(out_ptr + plane + b * HW + hw, tt, mask=in_hw)
    tl.store(out_ptr + 2 * plane + b * HW + hw, st, mask=in_hw)


@triton.jit
def _angular_rows_bwd_kernel(
    s_ptr,  # [R, L] student, strides s_r1, s_r2, s_o, s_i
    t_ptr,  # [R, L] teacher, strides t_r1, t_r2, t_o, t_i
    k_ptr,  # [2, R] fp32: dL/ds = k1 * s - k2 * t within a row
    g_ptr,  # [R, L] out (student dtype, strides g_r1, g_r2, g_o, g_i): dL/ds
    L,
    R2,
    N_IN,
    s_r1, s_r2, s_o, s_i,
    t_r1, t_r2, t_o, t_i,
    g_r1, g_r2, g_o, g_i,
    TWO_LEVEL: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    k1 = tl.load(k_ptr + row)
    k2 = tl.load(k_ptr + tl.num_programs(0) + row)
    start = split.to(tl.int64) * CHUNK
    s_row = (row // R2) * s_r1 + (row % R2) * s_r2
    t_row = (row // R2) * t_r1 + (row % R2) * t_r2
    g_row = (row // R2) * g_r1 + (row % R2) * g_r2
    for i in range(0, CHUNK, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        m = idx < L
        if TWO_LEVEL:
            s_off = s_row + (idx // N_IN) * s_o + (idx % N_IN) * s_i
            t_off = t_row + (idx // N_IN) * t_o + (idx % N_IN) * t_i
            g_off = g_row + (idx // N_IN) * g_o + (idx % N_IN) * g_i
        else:
            s_off = s_row + idx * s_i
            t_off = t_row + idx * t_i
            g_off = g_row + idx * g_i
        s = tl.load(s_ptr + s_off, mask=m, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + t_off, mask=m, other=0.0).to(tl.float32)
        tl.store(g_ptr + g_off, (k1 * s - k2 * t).to(g_ptr.dtype.element_ty), mask=m)


@triton.jit
def _angular_point_bwd_kernel(
    s_ptr,  # [B, C, HW] student, element strides (s_sb, s_sc, s_sp)
    t_ptr,  # [B, C, HW] teacher, element strides (t_sb, t_sc, t_sp)
    k_ptr,  # [2, B, HW] fp32: dL/ds = k1 * s - k2 * t at each pixel
    g_ptr,  # [B, C, HW] out (student dtype, strides g_sb, g_sc, g_sp): dL/ds
    C,
    HW,
    s_sb, s_sc, s_sp,
    t_sb, t_sc, t_sp,
    g_sb, g_sc, g_sp,
    C_BLOCK: tl.constexpr,
    HW_BLOCK: tl.constexpr,
):
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hw = blk.to(tl.int64) * HW_BLOCK + tl.arange(0, HW_BLOCK)
    in_hw = hw < HW
    k1 = tl.load(k_ptr + b * HW + hw, mask=in_hw, other=0.0)[None, :]  # [1, HW_BLOCK]
    k2 = tl.load(k_ptr + tl.num_programs(1) * HW + b * HW + hw, mask=in_hw, other=0.0)[None, :]
    s_pix = (b * s_sb + hw * s_sp)[None, :]  # [1, HW_BLOCK]
    t_pix = (b * t_sb + hw * t_sp)[None, :]
    g_pix = (b * g_sb + hw * g_sp)[None, :]
    c_idx = tl.arange(0, C_BLOCK)
    for c0 in range(0, C, C_BLOCK):
        ch = (c0 + c_idx)[:, None].to(tl.int64)  # [C_BLOCK, 1]
        m2 = ((c0 + c_idx) < C)[:, None] & in_hw[None, :]
        s = tl.load(s_ptr + s_pix + ch * s_sc, mask=m2, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + t_pix + ch * t_sc, mask=m2, other=0.0).to(tl.float32)
        tl.store(g_ptr + g_pix + ch * g_sc, (k1 * s - k2 * t).to(g_ptr.dtype.element_ty), mask=m2)


def _point_tiling(c, hw):
    """(C_BLOCK, HW_BLOCK, num_warps) for the point mode: ~4K-element tiles on 8 warps (< 100 registers at the
    workload shapes, bench/results/aot_sm90.md)."""
    c_block = min(32, next_pow2(c))
    hw_block = min(max(16, 4096 // c_block), max(16, next_pow2(hw)))
    return c_block, hw_block, 8 if c_block * hw_block >= 4096 else 4


def _row_layout(s, t, mode):
    """(rows, L, R2, N_IN, TWO_LEVEL) of the layer and channel modes' [R, L] rows (see the addressing comment
    above the kernels)."""
    b, c = s.shape[:2]
    hw = s[0, 0].numel()
    if mode == "channel":  # row (b, c), elements along the pixels
        return b * c, hw, c, hw, False
    # layer: row b of C*HW elements, whose order does not matter to the sums. Student and teacher dense with the
    # same strides (both NCHW or both channels-last, the gradient too): each sample is one run of C*HW elements
    # in memory, read as such. Otherwise element i = (c, hw) = divmod(i, HW) through each tensor's own strides.
    same = s.stride() == t.stride() and _dense(s)
    return b, c * hw, 1, hw, not same


def _dense(x):
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def _row_strides(strides, mode, two_level):
    """(sr1, sr2, so, si) of the row kernels from (batch, channel, pixel) strides."""
    sb, sc, sp = strides
    if mode == "channel":
        return sb, sc, 0, sp
    return (sb, 0, sc, sp) if two_level else (sb, 0, 0, 1)


def angular_forward(student, teacher, mode):
    """Returns (loss [] fp32, stats [3, G] fp32: ss, tt, st per group) with G groups as in the docstring."""
    s, s_strides = strided_bchw(student)  # no copy for NCHW or channels-last
    t, t_strides = strided_bchw(teacher)
    b, c = s.shape[:2]
    hw = s[0, 0].numel()
    if use_cpp("angular_loss", s):  # the C++ kernel (csrc/), splits of CPP_CHUNK elements per group
        groups, length = {"layer": (b, c * hw), "channel": (b * c, hw), "point": (b * hw, 1)}[mode]
        partial = empty((3, groups, -(-length // CPP_CHUNK)), torch.float32, s.device)
        _cpp.ops().angular_stats(s, t, MODES.index(mode), CPP_CHUNK, partial)
        stats = partial.sum(2)
    elif mode == "point":
        c_block, hw_block, warps = _point_tiling(c, hw)
        stats = empty((3, b, hw), torch.float32, s.device)
        _angular_point_stats_kernel[(triton.cdiv(hw, hw_block), b)](
            s, t, stats, c, hw, *s_strides, *t_strides, C_BLOCK=c_block, HW_BLOCK=hw_block, num_warps=warps)
        stats = stats.reshape(3, -1)
    else:
        rows, length, r2, n_in, two_level = _row_layout(s, t, mode)
        block, chunk, n_splits = row_tiling(length)
        partial = empty((3, rows, n_splits), torch.float32, s.device)
        _angular_rows_stats_kernel[(rows, n_splits)](
            s, t, partial, length, r2, n_in, *_row_strides(s_strides, mode, two_level),
            *_row_strides(t_strides, mode, two_level), TWO_LEVEL=two_level, CHUNK=chunk, BLOCK=block,
            num_warps=4 if block <= 1024 else 8)
        stats = partial.sum(2)
    ss, tt, st = stats
    ns = ss.sqrt().clamp_min(EPS)
    nt = tt.sqrt().clamp_min(EPS)
    g = ss / (ns * ns) + tt / (nt * nt) - 2 * st / (ns * nt)  # [G]
    return g.clamp_min(0).mean(), stats  # clamp: rounding can take 2 - 2cos a hair below 0


def angular_backward(student, teacher, mode, stats, grad_loss):
    """dL/ds (student dtype, the student's memory format) from the forward's group sums, for a loss gradient
    grad_loss (0-dim)."""
    s, s_strides = strided_bchw(student)
    t, t_strides = strided_bchw(teacher)
    b, c = s.shape[:2]
    hw = s[0, 0].numel()
    ss, tt, st = stats
    groups = ss.numel()
    ns = ss.sqrt().clamp_min(EPS)
    nt = tt.sqrt().clamp_min(EPS)
    cos_term = torch.where(ss.sqrt() > EPS, ss / (ns * ns) - st / (ns * nt), torch.zeros_like(ss))
    scale = 2.0 * grad_loss.float() / groups
    k = torch.stack([scale * (1 - cos_term) / (ns * ns), scale / (ns * nt)])  # [2, G]
    g = empty_like(student)  # dense, in the student's memory format
    g_strides = strided_bchw(g)[1]
    if use_cpp("angular_loss", s):
        _cpp.ops().angular_apply(s, t, k.contiguous(), MODES.index(mode), g)
    elif mode == "point":
        c_block, hw_block, warps = _point_tiling(c, hw)
        _angular_point_bwd_kernel[(triton.cdiv(hw, hw_block), b)](
            s, t, k, g, c, hw, *s_strides, *t_strides, *g_strides, C_BLOCK=c_block, HW_BLOCK=hw_block,
            num_warps=warps)
    else:
        rows, length, r2, n_in, two_level = _row_layout(s, t, mode)
        two_level = two_level or g.stride() != s.stride()  # flat runs need the gradient's strides to match too
        block, chunk, n_splits = row_tiling(length)
        _angular_rows_bwd_kernel[(rows, n_splits)](
            s, t, k, g, length, r2, n_in, *_row_strides(s_strides, mode, two_level),
            *_row_strides(t_strides, mode, two_level), *_row_strides(g_strides, mode, two_level),
            TWO_LEVEL=two_level, CHUNK=chunk, BLOCK=block, num_warps=4 if block <= 1024 else 8)
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
    return empty_like(student, poison=False)  # as angular_backward allocates it


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no full-size zero gradient for the outputs that take none
    student, teacher, mode = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(student, teacher, output[1])
    ctx.mode = mode


def _backward(ctx, grad_loss, _grad_stats):
    student, teacher, stats = ctx.saved_tensors
    backward = angular_backward if eager_cpp(student) else _angular_backward_op  # eagerly: no custom-op wrapper
    return backward(student, teacher, ctx.mode, stats, grad_loss), None, None


_angular_op.register_autograd(_backward, setup_context=_setup_context)
_AngularEager = eager_function(angular_forward, _setup_context, _backward)  # see eager_cpp


def angular_loss(student, teacher, mode):
    """Angular distillation loss (LAD/CAD/PAD); see the module docstring for the formulas.

    Fused Triton kernels when `kernels._dispatch.use_triton` says so, the C++ ones (csrc/) under
    SEGKD_KERNELS=cuda; a teacher that requires grad takes the torch reference (the kernels differentiate the
    student only).
    """
    if mode not in MODES:
        raise ValueError(f"angular_loss: unknown mode {mode!r}; expected one of {MODES}")
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(f"angular_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "must both be [B, C, H, W]")
    if not (use_cpp("angular_loss", student) or use_triton(student, teacher, op="angular_loss")) or needs_grad(teacher):
        return angular_loss_reference(student, teacher, mode)
    op = _AngularEager.apply if eager_cpp(student) else _angular_op
    return op(student, teacher, mode)[0]
