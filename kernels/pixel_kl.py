"""Per-pixel KL divergence between teacher and student class distributions (Hinton KD for segmentation).

    L = T^2 * (1/|V|) * sum_{(b,h,w) in V} sum_c p_t * (log p_t - log p_s),   p = softmax(z / T) over C
    dL/dz_s = T * (p_s - p_t) / |V|   on valid pixels, 0 elsewhere

With per-image weights w [B] (DFSS's weighted per-image KD), each image is averaged over its own valid pixels V_b:

    L_w = T^2 * sum_b w_b * (1/|V_b|) * sum_{(h,w) in V_b} sum_c p_t * (log p_t - log p_s)
    dL_w/dz_s = T * w_b * (p_s - p_t) / |V_b|   on valid pixels of image b, 0 elsewhere

(an image with no valid pixel contributes 0). The weights are constants: a gradient for them is the torch
reference's.

`scale` (a constant, default 1) multiplies the loss and the gradient the forward writes: a method's loss weight
passed here rather than multiplied onto the result, so that the backward's grad_output is 1 (the total loss is a
sum) and the gradient is not read and written a second time to scale it (`_grad_scale.py` skips grad_output == 1).

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (2015); per-pixel form as in
Liu et al., "Structured Knowledge Distillation for Semantic Segmentation" (CVPR 2019).

The fused kernel reads logits as [C_block, HW_block] tiles through their strides (contiguous along pixels
for NCHW; channels-last logits are read in place, never copied; the gradient takes the student's layout),
computes both softmaxes in fp32 registers and, when the student needs a gradient, writes dL/dz_s in the
same pass: backward only scales it by grad_output (see `_grad_scale.py`). Bytes moved for forward +
backward: read student and teacher once, write the gradient once.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from kernels import _cpp
from kernels._dispatch import (eager_cpp, eager_function, empty, empty_like, needs_grad, next_pow2, pixel_vector_hint,
                               strided_bchw, triton, tl, upcast, use_cpp, use_triton)
from kernels._grad_scale import scale_grad


def pixel_kl_reference(student, teacher, temperature=1.0, valid=None, weights=None, scale=1.0):
    """student, teacher: [B, C, H, W] logits; valid: optional bool [B, H, W]; weights: optional [B]; scale: a
    constant factor. Returns a float32 scalar.

    V is the set of valid pixels (all pixels when `valid` is None); the loss is 0 when V is empty. With
    `weights`, L_w of the module docstring: the w_b-weighted sum of the per-image means over V_b.
    """
    t = float(temperature)
    log_ps = F.log_softmax(upcast(student) / t, dim=1)  # [B, C, H, W]
    log_pt = F.log_softmax(upcast(teacher) / t, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)  # [B, H, W]
    if weights is not None:
        if valid is None:
            per_image = kl.mean(dim=(1, 2))  # [B]
        else:
            kl = torch.where(valid, kl, torch.zeros_like(kl))
            per_image = kl.sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp_min(1)
        return ((upcast(weights) * per_image).sum() * (t * t * scale)).float()
    if valid is None:
        return (kl.mean() * (t * t * scale)).float()
    kl = torch.where(valid, kl, torch.zeros_like(kl))
    return (kl.sum() / valid.sum().clamp_min(1) * (t * t * scale)).float()


CPP_BLOCK = 256  # pixels per block of the C++ kernels (a CUDA block's threads; a CPU task's inner loop)


@triton.jit
def _pixel_kl_fwd_kernel(
    s_ptr,  # [B, C, HW] student logits, element strides (s_sb, s_sc, s_sp)
    t_ptr,  # [B, C, HW] teacher logits, element strides (t_sb, t_sc, t_sp)
    valid_ptr,  # [B, HW] uint8 valid mask (read only when HAS_VALID)
    nvalid_ptr,  # [] fp32 number of valid pixels |V| (read unless HAS_WEIGHTS)
    wscale_ptr,  # [B] fp32 w_b / max(|V_b|, 1) (read only when HAS_WEIGHTS)
    kl_ptr,  # [B, n_hw_blocks] fp32 out: sum of the per-pixel KL over each tile's valid pixels
    g_ptr,  # [B, C, HW] out (student dtype, strides g_s*): dL/dz_s for grad_output = 1 (written when WRITE_GRAD)
    C,
    HW,
    s_sb, s_sc, s_sp,
    t_sb, t_sc, t_sp,
    g_sb, g_sc, g_sp,
    inv_temp,
    temp,
    HAS_VALID: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,  # per-image scales w_b / |V_b| instead of the batch's 1 / |V|
    WRITE_GRAD: tl.constexpr,
    C_BLOCK: tl.constexpr,
    HW_BLOCK: tl.constexpr,
    ONE_TILE: tl.constexpr,  # C <= C_BLOCK: the whole class axis stays in registers
    VEC: tl.constexpr,  # > 1: HW and the batch/channel strides were passed / VEC (_dispatch.pixel_vector_hint)
):
    if VEC > 1:  # multiplied back by a constexpr, so the compiler sees their divisibility: vector accesses
        HW = HW * VEC
        s_sb = s_sb * VEC
        s_sc = s_sc * VEC
        t_sb = t_sb * VEC
        t_sc = t_sc * VEC
        g_sb = g_sb * VEC
        g_sc = g_sc * VEC
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hw = blk.to(tl.int64) * HW_BLOCK + tl.arange(0, HW_BLOCK)  # [HW_BLOCK]
    in_hw = hw < HW
    pix = in_hw
    if HAS_VALID:
        pix = in_hw & (tl.load(valid_ptr + b * HW + hw, mask=in_hw, other=0) != 0)
    if HAS_WEIGHTS:
        g_scale = temp * tl.load(wscale_ptr + b)
    else:
        g_scale = temp / tl.maximum(tl.load(nvalid_ptr), 1.0)
    # Element offsets through each tensor's own strides: NCHW (s_sp = 1) keeps loads contiguous along pixels,
    # channels-last (s_sc = 1) is read in place, as strided tiles, rather than copied.
    s_pix = (b * s_sb + hw * s_sp)[None, :]  # [1, HW_BLOCK]
    t_pix = (b * t_sb + hw * t_sp)[None, :]
    g_pix = (b * g_sb + hw * g_sp)[None, :]
    c_idx = tl.arange(0, C_BLOCK)  # [C_BLOCK]

    if ONE_TILE:
        in_c = c_idx < C
        ch = c_idx[:, None].to(tl.int64)  # [C_BLOCK, 1]
        m2 = in_c[:, None] & in_hw[None, :]  # [C_BLOCK, HW_BLOCK]
        # Padded classes get -1e30 (finite, so no inf - inf) and vanish from max, sum and KL; pixels
        # past HW load 0 and are masked out of the KL sum and the stores.
        zs = tl.load(s_ptr + s_pix + ch * s_sc, mask=m2, other=0.0).to(tl.float32) * inv_temp
        zt = tl.load(t_ptr + t_pix + ch * t_sc, mask=m2, other=0.0).to(tl.float32) * inv_temp
        zs = tl.where(in_c[:, None], zs, -1e30)
        zt = tl.where(in_c[:, None], zt, -1e30)
        xs = zs - tl.max(zs, axis=0)[None, :]
        xt = zt - tl.max(zt, axis=0)[None, :]
        es = tl.exp(xs)
        et = tl.exp(xt)
        lps = xs - tl.log(tl.sum(es, axis=0))[None, :]  # log p_s, [C_BLOCK, HW_BLOCK]
        lpt = xt - tl.log(tl.sum(et, axis=0))[None, :]
        pt = tl.exp(lpt)
        kl = tl.sum(tl.where(in_c[:, None], pt * (lpt - lps), 0.0), axis=0)  # [HW_BLOCK]
        if WRITE_GRAD:
            g = tl.where(pix[None, :], g_scale * (tl.exp(lps) - pt), 0.0)
            tl.store(g_ptr + g_pix + ch * g_sc, g.to(g_ptr.dtype.element_ty), mask=m2)
    else:
        # Pass 1: online max and sum over the class chunks (m: running max, z: sum of exp(x - m)).
        ms = tl.full([HW_BLOCK], float("-inf"), tl.float32)
        mt = tl.full([HW_BLOCK], float("-inf"), tl.float32)
        ss = tl.zeros([HW_BLOCK], tl.float32)
        st = tl.zeros([HW_BLOCK], tl.float32)
        for c0 in range(0, C, C_BLOCK):
            in_c = (c0 + c_idx) < C
            ch = (c0 + c_idx)[:, None].to(tl.int64)
            m2 = in_c[:, None] & in_hw[None, :]
            zs = tl.load(s_ptr + s_pix + ch * s_sc, mask=m2, other=0.0).to(tl.float32) * inv_temp
            zt = tl.load(t_ptr + t_pix + ch * t_sc, mask=m2, other=0.0).to(tl.float32) * inv_temp
            zs = tl.where(in_c[:, None], zs, -1e30)
            zt = tl.where(in_c[:, None], zt, -1e30)
            ms_new = tl.maximum(ms, tl.max(zs, axis=0))
            mt_new = tl.maximum(mt, tl.max(zt, axis=0))
            ss = ss * tl.exp(ms - ms_new) + tl.sum(tl.exp(zs - ms_new[None, :]), axis=0)
            st = st * tl.exp(mt - mt_new) + tl.sum(tl.exp(zt - mt_new[None, :]), axis=0)
            ms = ms_new
            mt = mt_new
        log_ss = tl.log(ss)
        log_st = tl.log(st)
        # Pass 2: log-probabilities against the final statistics, the KL and the gradient.
        kl = tl.zeros([HW_BLOCK], tl.float32)
        for c0 in range(0, C, C_BLOCK):
            in_c = (c0 + c_idx) < C
            ch = (c0 + c_idx)[:, None].to(tl.int64)
            m2 = in_c[:, None] & in_hw[None, :]
            zs = tl.load(s_ptr + s_pix + ch * s_sc, mask=m2, other=0.0).to(tl.float32) * inv_temp
            zt = tl.load(t_ptr + t_pix + ch * t_sc, mask=m2, other=0.0).to(tl.float32) * inv_temp
            lps = (zs - ms[None, :]) - log_ss[None, :]
            lpt = (zt - mt[None, :]) - log_st[None, :]
            pt = tl.exp(lpt)
            kl += tl.sum(tl.where(in_c[:, None], pt * (lpt - lps), 0.0), axis=0)
            if WRITE_GRAD:
                g = tl.where(pix[None, :], g_scale * (tl.exp(lps) - pt), 0.0)
                tl.store(g_ptr + g_pix + ch * g_sc, g.to(g_ptr.dtype.element_ty), mask=m2)

    tl.store(kl_ptr + b * tl.num_programs(0) + blk, tl.sum(tl.where(pix, kl, 0.0), axis=0))


def pixel_kl_forward(student, teacher, valid, temperature, write_grad, weights=None, scale=1.0):
    """Launch the fused kernel. Returns (loss [] fp32, dL/dz_s [B, C, H, W] student dtype, or [0] if not asked);
    L_w (the module docstring) when `weights` [B] is given; both times `scale`."""
    s, s_strides = strided_bchw(student)  # no copy for NCHW or channels-last
    t, t_strides = strided_bchw(teacher)
    b, c = s.shape[:2]
    hw = s[0, 0].numel()
    dev = s.device
    if valid is None:
        v = s  # never read (HAS_VALID is False)
        nvalid = torch.full((), float(b * hw), dtype=torch.float32, device=dev)
    else:
        v = valid.contiguous().view(torch.uint8)
        nvalid = valid.sum().to(torch.float32)  # stays on device: no host sync
    # A scale or weights take the kernels' per-image path: wscale [B] multiplies image b's KL sum and gradient
    # (for a scale alone, scale / |V| for every image: the batch mean, scaled).
    weighted = weights is not None or float(scale) != 1.0
    wscale = nvalid  # never read (HAS_WEIGHTS is False)
    if weights is not None:
        n_b = v.view(b, hw).sum(1, dtype=torch.float32) if valid is not None else torch.full_like(nvalid, float(hw))
        wscale = weights.to(torch.float32) * float(scale) / n_b.clamp_min(1.0)  # [B]: the per-image scale
    elif weighted:
        wscale = (float(scale) / nvalid.clamp_min(1.0)).expand(b).contiguous()

    if use_cpp("pixel_kl", s):  # the C++ kernel (csrc/) in place of the Triton launch, same buffers
        block = CPP_BLOCK
        kl = empty((b, -(-hw // block)), torch.float32, dev)
        g = empty_like(student) if write_grad else s.new_empty(0)
        _cpp.ops().pixel_kl(s, t, None if valid is None else v, nvalid, wscale if weighted else None, kl, g,
                            float(temperature), write_grad, block)
        return _pixel_kl_loss(kl, nvalid, wscale, temperature, weighted), g

    c_pad = next_pow2(c)
    one_tile = c_pad <= 256
    c_block = c_pad if one_tile else 64
    # ~4K-element tiles on 8 warps: with the JIT's specialisation at the workload shapes, 69 registers for
    # C = 19 and 64 for C = 150 and 171, no spills, 16-byte loads (bench/results/aot_sm90.md); smaller tiles
    # just add programs.
    hw_block = min(max(16, 4096 // c_block), max(16, next_pow2(hw)))
    n_blk = triton.cdiv(hw, hw_block)
    kl = empty((b, n_blk), torch.float32, dev)
    g = empty_like(student) if write_grad else s.new_empty(0)  # the student's memory format
    g_strides = strided_bchw(g)[1] if write_grad else s_strides
    vec, strides, hw_arg = pixel_vector_hint(hw, *s_strides, *t_strides, *g_strides)
    _pixel_kl_fwd_kernel[(n_blk, b)](
        s, t, v, nvalid, wscale, kl, g if write_grad else s, c, hw_arg, *strides,
        1.0 / float(temperature), float(temperature),
        HAS_VALID=valid is not None, HAS_WEIGHTS=weighted, WRITE_GRAD=write_grad, C_BLOCK=c_block,
        HW_BLOCK=hw_block, ONE_TILE=one_tile, VEC=vec, num_warps=8 if c_block * hw_block >= 4096 else 4)
    return _pixel_kl_loss(kl, nvalid, wscale, temperature, weighted), g


def _pixel_kl_loss(kl, nvalid, wscale, temperature, weighted):
    """The loss from the kernel's per-block KL sums kl [B, n_blocks]."""
    if weighted:
        return (kl.sum(1) * wscale).sum() * (float(temperature) ** 2)
    return kl.sum() * (float(temperature) ** 2) / nvalid.clamp_min(1.0)


@torch.library.custom_op("segkd::pixel_kl", mutates_args=())
def _pixel_kl_op(student: torch.Tensor, teacher: torch.Tensor, valid: Optional[torch.Tensor], temperature: float,
                 write_grad: bool, weights: Optional[torch.Tensor] = None,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    return pixel_kl_forward(student, teacher, valid, temperature, write_grad, weights, scale)


@_pixel_kl_op.register_fake
def _(student, teacher, valid, temperature, write_grad, weights=None, scale=1.0):
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
    return grad, None, None, None, None, None, None


_pixel_kl_op.register_autograd(_backward, setup_context=_setup_context)
_PixelKlEager = eager_function(pixel_kl_forward, _setup_context, _backward)  # see eager_cpp


def pixel_kl(student, teacher, temperature=1.0, valid=None, weights=None, scale=1.0):
    """Per-pixel KD loss; see the module docstring for the formula and normalisation.

    weights: optional [B] per-image weights -> L_w, the weighted sum of per-image means, in one launch (DFSS's
    weighted KD); without them the loss is the mean over all valid pixels of the batch, as before.
    scale: a constant factor of the loss (a method's weight), applied in the kernel so that the backward need not
    rescale the gradient.

    Runs the fused Triton kernel when `kernels._dispatch.use_triton` says so, the C++ one (csrc/) under
    SEGKD_KERNELS=cuda. A teacher or weights that require grad
    (the fused kernel only differentiates the student) take the torch reference, which is exact.
    """
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(f"pixel_kl: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "must both be [B, C, H, W]")
    if valid is not None and (valid.shape != student.shape[:1] + student.shape[2:] or valid.dtype != torch.bool):
        raise ValueError(f"pixel_kl: valid must be a bool [B, H, W] mask, got {valid.dtype} {tuple(valid.shape)}")
    if weights is not None and (weights.shape != student.shape[:1] or not weights.is_floating_point()):
        raise ValueError(f"pixel_kl: weights must be a floating-point [B] = [{student.shape[0]}] tensor, got "
                         f"{weights.dtype} {tuple(weights.shape)}")
    fixed = (teacher,) if weights is None else (teacher, weights)  # what the fused kernel does not differentiate
    if not (use_cpp("pixel_kl", student) or use_triton(student, *fixed, op="pixel_kl")) or needs_grad(*fixed):
        return pixel_kl_reference(student, teacher, temperature, valid, weights, scale)
    op = _PixelKlEager.apply if eager_cpp(student) else _pixel_kl_op
    return op(student, teacher, valid, float(temperature), needs_grad(student), weights, float(scale))[0]
