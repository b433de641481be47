"""Masked average pooling: per image, the mean feature of the pixels of each class (class prototypes).

    proto[b, k] = sum_{hw: y_bhw = k} f[b, :, hw] / count[b, k],   count[b, k] = |{hw: y_bhw = k}|
    dL/df[b, :, hw] = dL/dproto[b, y_bhw] / max(count[b, y_bhw], 1)   (0 where y_bhw is ignored)

Pixels labelled `ignore_index` (or any value outside [0, K)) are excluded; an absent class has count 0 and a
zero prototype. Used by Adaptive Perspective Distillation (Tian et al., TPAMI 2022) to build prototypes.

normalize=True pools the L2-normalised features f_hat = f / n, n = max(||f[b, :, hw]||, EPS) (F.normalize's
convention) without materialising them: the forward weights each pixel by 1/n in the class sums, and the
backward takes the gradient through the normalisation,
    dL/df = q / n - [||f|| > EPS] * f (f . q) / n^3,   q = dL/dproto[b, y_bhw] / max(count, 1)
so APD's projector outputs are read where they lie (16-bit, any dense layout) instead of being normalised into
an fp32 copy that every consumer then reads and whose backward moves it several times (issue 12).

Fused form: one pass over the features, read in place through their strides (NCHW or channels-last; the
gradient takes the features' layout). A program owns a [C_block] slice of channels and a range of pixels;
per [C_block, HW_block] feature tile it builds the [HW_block, K] one-hot of the labels in registers and
accumulates tile @ one_hot into a [C_block, K] tensor-core accumulator, with the class counts as a column sum
of the same one-hot. Backward is a gather of the (tiny) prototype gradient at each pixel's label.
"""
import torch
import torch.nn.functional as F

from kernels import _cpp
from kernels._dispatch import (DOT_PRECISION, dot_dtype, eager_cpp, eager_function, empty, next_pow2, strided_bchw,
                               triton, tl, upcast, use_cpp, use_triton)

EPS = 1e-6  # normalize=True: F.normalize's eps
CPP_THREADS = 65536  # CUDA threads the C++ class sums aim for: pixel splits until (image, split, channel) fill them


def masked_avg_pool_reference(feat, labels, num_classes, ignore_index=255, normalize=False):
    """feat: [B, C, H, W]; labels: [B, H, W] integer at feature resolution.

    Returns (prototypes [B, K, C] float32, counts [B, K] float32), of F.normalize(feat, dim=1) if normalize.
    """
    if normalize:
        feat = F.normalize(upcast(feat), dim=1, eps=EPS)
    protos, counts = class_means(feat, labels, num_classes, ignore_index)
    return protos.float(), counts.float()


def class_means(feat, labels, num_classes, ignore_index=255):
    """masked_avg_pool_reference in its compute dtype (float64 features stay float64: the tests' ground truth)."""
    b, c = feat.shape[:2]
    k = int(num_classes)
    lab = labels.reshape(b, -1).long()  # [B, HW]
    inside = (lab >= 0) & (lab < k) & (lab != ignore_index)
    f = upcast(feat).reshape(b, c, -1)  # [B, C, HW]
    onehot = F.one_hot(torch.where(inside, lab, 0), k).to(f.dtype) * inside[..., None]  # [B, HW, K]
    sums = torch.bmm(f, onehot)  # [B, C, K]
    counts = onehot.sum(1)  # [B, K]
    return sums.transpose(1, 2) / counts.clamp_min(1)[..., None], counts


@triton.jit
def _masked_avg_pool_fwd_kernel(
    f_ptr,  # [B, C, HW] features, element strides (f_sb, f_sc, f_sp)
    y_ptr,  # [B, HW] integer labels
    sums_ptr,  # [B, S, C, K_PAD] fp32 out: per pixel split, sum of the features of each class
    counts_ptr,  # [B, S, K_PAD] fp32 out: per pixel split, pixels of each class (written by C-block 0)
    a_ptr,  # [B, HW] fp32 per-pixel weights of the feature sums (read when WEIGHTED)
    e_ptr,  # [B, HW] fp32 per-pixel values summed per class instead of the counts (read when WEIGHTED)
    C,
    HW,
    K,
    ignore_index,
    f_sb, f_sc, f_sp,
    CHUNK: tl.constexpr,  # pixels per split, a multiple of HW_BLOCK
    C_BLOCK: tl.constexpr,
    HW_BLOCK: tl.constexpr,
    K_PAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    WEIGHTED: tl.constexpr,  # sums of a_p * f_p and of e_p per class instead of f_p and 1 (class_weighted_sums)
):
    cb = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_splits = tl.num_programs(1)
    c = cb * C_BLOCK + tl.arange(0, C_BLOCK)  # [C_BLOCK]
    in_c = c < C
    k = tl.arange(0, K_PAD)  # [K_PAD]
    acc = tl.zeros([C_BLOCK, K_PAD], tl.float32)
    cnt = tl.zeros([K_PAD], tl.float32)
    start = split.to(tl.int64) * CHUNK
    for i in range(0, CHUNK, HW_BLOCK):
        hw = start + i + tl.arange(0, HW_BLOCK)  # [HW_BLOCK]
        in_hw = hw < HW
        y = tl.load(y_ptr + b * HW + hw, mask=in_hw, other=-1).to(tl.int32)
        keep = in_hw & (y >= 0) & (y < K) & (y != ignore_index)
        onehot = (y[:, None] == k[None, :]) & keep[:, None]  # [HW_BLOCK, K_PAD]
        # through the strides: contiguous along pixels for NCHW, channels-last read in place
        offs = b * f_sb + c[:, None].to(tl.int64) * f_sc + hw[None, :] * f_sp  # [C_BLOCK, HW_BLOCK]
        f = tl.load(f_ptr + offs, mask=in_c[:, None] & in_hw[None, :], other=0.0)
        if WEIGHTED:  # fp32 operands: the weights are not exact in 16 bits
            a = tl.load(a_ptr + b * HW + hw, mask=in_hw, other=0.0)
            e = tl.load(e_ptr + b * HW + hw, mask=in_hw, other=0.0)
            oh = tl.where(onehot, 1.0, 0.0)
            acc = tl.dot(f.to(tl.float32), oh * a[:, None], acc, input_precision=PRECISION)
            cnt += tl.sum(oh * e[:, None], axis=0)
        else:
            # 0/1 is exact in every dtype, so feeding the dot in the feature's own dtype loses nothing.
            acc = tl.dot(f.to(DOT_DTYPE), onehot.to(DOT_DTYPE), acc, input_precision=PRECISION)
            cnt += tl.sum(onehot.to(tl.float32), axis=0)
    out = ((b * n_splits + split) * C + c[:, None]) * K_PAD + k[None, :]
    tl.store(sums_ptr + out, acc, mask=in_c[:, None])
    if cb == 0:
        tl.store(counts_ptr + (b * n_splits + split) * K_PAD + k, cnt)


@triton.jit
def _masked_avg_pool_bwd_kernel(
    y_ptr,  # [B, HW] integer labels
    gp_ptr,  # [B, K, C] fp32: dL/dproto / max(count, 1)
    g_ptr,  # [B, C, HW] out (feature dtype, strides g_sb, g_sc, g_sp): dL/df
    C,
    HW,
    K,
    ignore_index,
    g_sb, g_sc, g_sp,
    C_BLOCK: tl.constexpr,
    HW_BLOCK: tl.constexpr,
):
    blk = tl.program_id(0)
    cb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hw = blk.to(tl.int64) * HW_BLOCK + tl.arange(0, HW_BLOCK)
    in_hw = hw < HW
    c = cb * C_BLOCK + tl.arange(0, C_BLOCK)
    in_c = c < C
    y = tl.load(y_ptr + b * HW + hw, mask=in_hw, other=-1).to(tl.int32)
    keep = in_hw & (y >= 0) & (y < K) & (y != ignore_index)
    y = tl.where(keep, y, 0)
    # [C_BLOCK, HW_BLOCK] gather from the small [K, C] table of this image (it stays in cache).
    gp = tl.load(gp_ptr + (b * K + y[None, :]) * C + c[:, None], mask=in_c[:, None] & keep[None, :], other=0.0)
    tl.store(g_ptr + b * g_sb + c[:, None].to(tl.int64) * g_sc + hw[None, :] * g_sp, gp.to(g_ptr.dtype.element_ty),
             mask=in_c[:, None] & in_hw[None, :])


@triton.jit
def _masked_avg_pool_norm_bwd_kernel(
    f_ptr,  # [B, C, HW] features (unnormalised), element strides (f_sb, f_sc, f_sp)
    y_ptr,  # [B, HW] integer labels
    gp_ptr,  # [B, K, C] fp32: dL/dproto / max(count, 1)
    g_ptr,  # [B, C, HW] out (feature dtype, strides g_sb, g_sc, g_sp): dL/df through the normalisation
    C,
    HW,
    K,
    ignore_index,
    f_sb, f_sc, f_sp,
    g_sb, g_sc, g_sp,
    C_BLOCK: tl.constexpr,
    HW_BLOCK: tl.constexpr,
):
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hw = blk.to(tl.int64) * HW_BLOCK + tl.arange(0, HW_BLOCK)
    in_hw = hw < HW
    y = tl.load(y_ptr + b * HW + hw, mask=in_hw, other=-1).to(tl.int32)
    keep = in_hw & (y >= 0) & (y < K) & (y != ignore_index)
    y = tl.where(keep, y, 0)
    c_idx = tl.arange(0, C_BLOCK)
    # Pass 1 over the channels: ||f||^2 and f . q per pixel. Pass 2 writes q / n - f (f . q) / n^3 (its re-read
    # of the [C_BLOCK, HW_BLOCK] tiles of this program mostly hits L2).
    ff = tl.zeros([HW_BLOCK], tl.float32)
    fq = tl.zeros([HW_BLOCK], tl.float32)
    for c0 in range(0, C, C_BLOCK):
        c = c0 + c_idx
        in_c = c < C
        f = tl.load(f_ptr + b * f_sb + c[:, None].to(tl.int64) * f_sc + hw[None, :] * f_sp,
                    mask=in_c[:, None] & in_hw[None, :], other=0.0).to(tl.float32)
        q = tl.load(gp_ptr + (b * K + y[None, :]) * C + c[:, None], mask=in_c[:, None] & keep[None, :], other=0.0)
        ff += tl.sum(f * f, axis=0)
        fq += tl.sum(f * q, axis=0)
    inv = 1.0 / tl.maximum(tl.sqrt(ff), 1e-6)  # EPS
    r = tl.where(tl.sqrt(ff) > 1e-6, fq * inv * inv * inv, 0.0)
    for c0 in range(0, C, C_BLOCK):
        c = c0 + c_idx
        in_c = c < C
        f = tl.load(f_ptr + b * f_sb + c[:, None].to(tl.int64) * f_sc + hw[None, :] * f_sp,
                    mask=in_c[:, None] & in_hw[None, :], other=0.0).to(tl.float32)
        q = tl.load(gp_ptr + (b * K + y[None, :]) * C + c[:, None], mask=in_c[:, None] & keep[None, :], other=0.0)
        g = q * inv[None, :] - f * r[None, :]
        tl.store(g_ptr + b * g_sb + c[:, None].to(tl.int64) * g_sc + hw[None, :] * g_sp, g.to(g_ptr.dtype.element_ty),
                 mask=in_c[:, None] & in_hw[None, :])


def _tiling(c, k_pad):
    """(C_BLOCK, HW_BLOCK). tl.dot needs every dimension >= 16. The [HW_BLOCK, K_PAD] one-hot and the
    [C_BLOCK, K_PAD] accumulator grow with K: with these sizes on 8 warps the bf16 forward at the workload
    shapes takes 40 registers for K = 19 and 103 for K = 150, no spills (bench/results/aot_sm90.md)."""
    if k_pad <= 64:
        return max(16, min(64, next_pow2(c))), 32
    return max(16, min(32, next_pow2(c))), 16


def class_sums(feat, labels, num_classes, ignore_index, a=None, e=None):
    """The fused class-sum pass: (sums [B, K, C] fp32, counts [B, K] fp32), or with per-pixel weights a, e [B, HW]:
    (sum_{p: y=k} a_p f_p, sum_{p: y=k} e_p)."""
    f, f_strides = strided_bchw(feat)  # no copy for NCHW or channels-last
    y = labels.contiguous()
    b, c = f.shape[:2]
    hw = f[0, 0].numel()
    k = int(num_classes)
    weighted = a is not None
    if _use_cpp(f, k):  # the C++ kernels (csrc/): per (image, split, channel) K bins, no atomics
        y = _cpp.labels(y)
        n_splits = max(1, min(-(-CPP_THREADS // (b * c)), -(-hw // 64))) if f.is_cuda else 1
        sums = empty((b, n_splits, k, c), torch.float32, f.device)
        counts = empty((b, n_splits, k), torch.float32, f.device)
        _cpp.ops().class_sums(f, y, k, int(ignore_index), a.float().contiguous() if weighted else None,
                              e.float().contiguous() if weighted else None, sums, counts)
        return sums.sum(1), counts.sum(1)
    k_pad = max(16, next_pow2(k))
    c_block, hw_block = _tiling(c, k_pad)
    n_cb = triton.cdiv(c, c_block)
    # Pixel splits give a GPU enough programs; the fp32 partials [B, S, C, K_PAD] are summed afterwards
    # (deterministic, unlike atomics), so S is capped to keep them under 1/8 of 16-bit feature bytes.
    n_splits = max(1, min(triton.cdiv(hw, 4 * hw_block), hw // (16 * k_pad), 4096 // (b * n_cb)))
    chunk = triton.cdiv(triton.cdiv(hw, n_splits), hw_block) * hw_block
    n_splits = triton.cdiv(hw, chunk)
    sums = empty((b, n_splits, c, k_pad), torch.float32, f.device)
    counts = empty((b, n_splits, k_pad), torch.float32, f.device)
    a, e = (a.float().contiguous(), e.float().contiguous()) if weighted else (sums, sums)  # unread unless weighted
    _masked_avg_pool_fwd_kernel[(n_cb, n_splits, b)](
        f, y, sums, counts, a, e, c, hw, k, int(ignore_index), *f_strides, CHUNK=chunk, C_BLOCK=c_block,
        HW_BLOCK=hw_block, K_PAD=k_pad, DOT_DTYPE=dot_dtype(f.dtype), PRECISION=DOT_PRECISION, WEIGHTED=weighted,
        num_warps=8)
    return sums.sum(1)[:, :, :k].transpose(1, 2), counts.sum(1)[:, :k].contiguous()  # [B, K, C], [B, K]


def inverse_norms(feat):
    """1 / max(||f[b, :, hw]||, EPS) [B, H*W] fp32: one reading pass over the features, in place (torch)."""
    n = torch.linalg.vector_norm(feat, dim=1, dtype=torch.float64 if feat.dtype == torch.float64 else torch.float32)
    return n.clamp_min(EPS).reciprocal().reshape(feat.shape[0], -1).float()  # [B, H*W]


def masked_avg_pool_forward(feat, labels, num_classes, ignore_index, normalize=False):
    """Returns (prototypes [B, K, C] fp32, counts [B, K] fp32)."""
    if normalize:  # class sums of f / n: the inverse norms as per-pixel weights, 1 in place of each count
        inv = inverse_norms(feat)
        sums, counts = class_sums(feat, labels, num_classes, ignore_index, inv, torch.ones_like(inv))
    else:
        sums, counts = class_sums(feat, labels, num_classes, ignore_index)
    return (sums / counts.clamp_min(1)[..., None]).contiguous(), counts


def class_weighted_sums_reference(feat, labels, num_classes, ignore_index, a, e):
    """(sum_{p: y_p = k} a_p f_p [B, K, C], sum_{p: y_p = k} e_p [B, K]) in plain torch; a, e: [B, HW]."""
    b, c = feat.shape[:2]
    lab = labels.reshape(b, -1).long()
    inside = (lab >= 0) & (lab < num_classes) & (lab != ignore_index)
    f = upcast(feat).reshape(b, c, -1)
    onehot = F.one_hot(torch.where(inside, lab, 0), num_classes).to(f.dtype) * inside[..., None]  # [B, HW, K]
    return torch.bmm(f * a.to(f.dtype)[:, None], onehot).transpose(1, 2), (onehot * e.to(f.dtype)[..., None]).sum(1)


def class_weighted_sums(feat, labels, num_classes, ignore_index, a, e):
    """Per-class weighted sums of the features and of a per-pixel value (IFVD's backward needs both): fused, one
    pass over the features in place, when `use_triton` says so; else the torch reference. Not differentiable."""
    if not (_use_cpp(feat, num_classes) or use_triton(feat, labels, op="masked_avg_pool")):
        return class_weighted_sums_reference(feat, labels, num_classes, ignore_index, a, e)
    return class_sums(feat, labels, num_classes, ignore_index, a, e)


def masked_avg_pool_backward(grad_protos, labels, counts, feat_shape, feat_dtype, ignore_index, channels_last=False,
                             feat=None):
    """dL/df [B, C, H, W] in the feature dtype (channels-last when asked: the features' layout) from
    dL/dproto [B, K, C]; through the normalisation when the features `feat` are given (normalize=True)."""
    y = labels.contiguous()
    b, c = feat_shape[:2]
    hw = y[0].numel()
    k = counts.shape[1]
    gp = (grad_protos.float() / counts.clamp_min(1)[..., None]).contiguous()  # [B, K, C]
    cpp = use_cpp("masked_avg_pool", y)
    # the C++ path projects through the normalisation in torch afterwards: gather q in fp32, not rounded to 16 bits
    g = empty(feat_shape, torch.float32 if cpp and feat is not None else feat_dtype, y.device,
              _memory_format(channels_last))
    if cpp:
        _cpp.ops().class_gather(_cpp.labels(y), gp, int(ignore_index), g)
        return g if feat is None else _through_normalisation(feat, g).to(feat_dtype)
    if feat is not None:
        f, f_strides = strided_bchw(feat)
        c_block, hw_block = min(32, next_pow2(c)), 64
        _masked_avg_pool_norm_bwd_kernel[(triton.cdiv(hw, hw_block), b)](
            f, y, gp, g, c, hw, k, int(ignore_index), *f_strides, *strided_bchw(g)[1], C_BLOCK=c_block,
            HW_BLOCK=hw_block, num_warps=4)
        return g
    c_block, hw_block = min(32, next_pow2(c)), 128
    _masked_avg_pool_bwd_kernel[(triton.cdiv(hw, hw_block), triton.cdiv(c, c_block), b)](
        y, gp, g, c, hw, k, int(ignore_index), *strided_bchw(g)[1], C_BLOCK=c_block, HW_BLOCK=hw_block, num_warps=4)
    return g


def _through_normalisation(feat, q):
    """dL/df = q / n - [||f|| > EPS] f (f . q) / n^3 in torch, from q = dL/d(f / n) (the C++ path's normalize=True
    backward: the gather runs in C++, this projection in plain torch)."""
    f = upcast(feat)
    q = q.to(f.dtype)
    norm = torch.linalg.vector_norm(f, dim=1, keepdim=True)
    inv = norm.clamp_min(EPS).reciprocal()
    r = torch.where(norm > EPS, (f * q).sum(1, keepdim=True) * inv.pow(3), 0.0)
    return q * inv - f * r


def _memory_format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _is_channels_last(x):
    """x is channels-last and not also NCHW-contiguous (the two coincide when C == 1 or H*W == 1)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


@torch.library.custom_op("segkd::masked_avg_pool", mutates_args=())
def _masked_avg_pool_op(feat: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int,
                        normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return masked_avg_pool_forward(feat, labels, num_classes, ignore_index, normalize)


@_masked_avg_pool_op.register_fake
def _(feat, labels, num_classes, ignore_index, normalize=False):
    b, c = feat.shape[:2]
    return feat.new_empty((b, num_classes, c), dtype=torch.float32), \
        feat.new_empty((b, num_classes), dtype=torch.float32)


def _backward_like(grad_protos, labels, counts, feat_like, ignore_index, channels_last, normalize=False):
    """masked_avg_pool_backward for features shaped like `feat_like` (the features themselves when normalize: the
    backward custom op's body)."""
    return masked_avg_pool_backward(grad_protos, labels, counts, feat_like.shape, feat_like.dtype, ignore_index,
                                    channels_last, feat_like if normalize else None)


@torch.library.custom_op("segkd::masked_avg_pool_backward", mutates_args=())
def _masked_avg_pool_backward_op(grad_protos: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor,
                                 feat_like: torch.Tensor, ignore_index: int, channels_last: bool,
                                 normalize: bool = False) -> torch.Tensor:
    return _backward_like(grad_protos, labels, counts, feat_like, ignore_index, channels_last, normalize)


@_masked_avg_pool_backward_op.register_fake
def _(grad_protos, labels, counts, feat_like, ignore_index, channels_last, normalize=False):
    return torch.empty_like(feat_like, memory_format=_memory_format(channels_last))


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no full-size zero gradient for the outputs that take none
    feat, labels, num_classes, ignore_index, *rest = inputs
    ctx.normalize = bool(rest and rest[0])
    ctx.mark_non_differentiable(output[1])
    # Only the shape and dtype of feat are needed without normalize: keep an empty stand-in, not the features.
    ctx.save_for_backward(labels, output[1], feat if ctx.normalize else feat.new_empty(()).expand(feat.shape))
    ctx.ignore_index = ignore_index
    ctx.channels_last = _is_channels_last(feat)  # the gradient takes the features' layout


def _backward(ctx, grad_protos, _grad_counts):
    labels, counts, feat_like = ctx.saved_tensors
    if grad_protos is None:
        return None, None, None, None, None
    backward = _backward_like if eager_cpp(labels) else _masked_avg_pool_backward_op  # eagerly: no custom-op wrapper
    return (backward(grad_protos, labels, counts, feat_like, ctx.ignore_index, ctx.channels_last, ctx.normalize),
            None, None, None, None)


_masked_avg_pool_op.register_autograd(_backward, setup_context=_setup_context)
_MaskedAvgPoolEager = eager_function(masked_avg_pool_forward, _setup_context, _backward)  # see eager_cpp


def _use_cpp(feat, num_classes):
    """The C++ kernels for these features: SEGKD_KERNELS=cuda, and at most 256 classes on CUDA (their bins)."""
    return use_cpp("masked_avg_pool", feat) and (not feat.is_cuda or int(num_classes) <= 256)


def masked_avg_pool(feat, labels, num_classes, ignore_index=255, normalize=False):
    """Class prototypes and pixel counts, of the L2-normalised features if `normalize`; see the module docstring.
    Fused Triton kernels when `kernels._dispatch.use_triton` says so, the C++ ones (csrc/) under
    SEGKD_KERNELS=cuda."""
    if feat.dim() != 4 or labels.shape != feat.shape[:1] + feat.shape[2:]:
        raise ValueError(f"masked_avg_pool: feat {tuple(feat.shape)} must be [B, C, H, W] and labels "
                         f"{tuple(labels.shape)} [B, H, W] at the same resolution")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"masked_avg_pool: labels must be an integer tensor, got {labels.dtype}")
    if not (_use_cpp(feat, num_classes) or use_triton(feat, labels, op="masked_avg_pool")):
        return masked_avg_pool_reference(feat, labels, num_classes, ignore_index, normalize)
    op = _MaskedAvgPoolEager.apply if eager_cpp(feat) else _masked_avg_pool_op
    return op(feat, labels, int(num_classes), int(ignore_index), bool(normalize))
