"""Segmentation cross-entropy on logits upsampled to the labels' resolution, without the upsampled logits.

    z = bilinear(x)                       x [B, K, h, w] logits -> z [B, K, H, W], align_corners=False
    L = 1/|V| * sum_{(b,p) in V} (logsumexp_k z[b, :, p] - z[b, y_bp, p])
    dL/dx = bilinear^T( (softmax(z) - onehot(y)) * [p in V] / |V| ) * grad_output

i.e. `F.cross_entropy(F.interpolate(x.float(), size=(H, W), mode="bilinear", align_corners=False), y.long(),
ignore_index=ignore_index)`, the standard segmentation loss (the student's task loss in every KD method). V is the
set of pixels whose label is in [0, K) and not `ignore_index`: labels outside [0, K) are ignored, as
masked_avg_pool ignores them (F.cross_entropy would raise instead). The loss is the mean over V, and 0 with a zero
gradient when V is empty (F.cross_entropy returns NaN then).

Interpolation is PyTorch's align_corners=False rule, per axis with in/out = h/H (w/W):
src = max((dst + 0.5) * in/out - 0.5, 0), i0 = floor(src), i1 = min(i0 + 1, in - 1), weights (1 - (src - i0), src - i0);
with align_corners=True (how APD's released code upsamples its L_t logits; Triton and torch paths only),
src = dst * (in - 1)/(out - 1) (0 when out == 1), the rest alike;
z = wy0 * (wx0 x00 + wx1 x01) + wy1 * (wx0 x10 + wx1 x11). It holds for any H, W (not only multiples of h, w;
H == h is the identity; H < h a 2-tap downsampling).

Fused design. Forward: a program owns a block of output pixels of one image, reads their labels, computes each
pixel's 4-neighbour stencil and interpolates [K_BLOCK, P_BLOCK] logit tiles on the fly (gathered from the low-res
logits, NCHW or channels-last, in place through their strides) into an online max / sum-of-exp over K chunks (K =
150 or 171 loops), picking the target logit in the same pass. It writes one loss sum and one valid count per
program; these [B, n_blocks] partials are summed afterwards in a fixed order (deterministic, no atomics). Backward
is a gather, also without atomics: a program owns a [TH, TW] tile of low-res pixels and a K_BLOCK chunk of classes,
and loops over the output rows and column blocks whose stencil can reach the tile (a contiguous range of each,
found from the same rule with a margin; rows or columns that do not touch the tile get zero weight). For each
output row segment it recomputes the log-sum-exp over all K from the logits, forms
D = (softmax - onehot) * valid * grad_output / |V| for its chunk ([K_BLOCK, OW]), reduces the columns with the
transposed horizontal weights in one tl.dot ([K_BLOCK, OW] @ [OW, TW]), and adds the result to a [K_BLOCK, TH, TW]
accumulator with the row's vertical weights. Every low-res gradient element is written once by its owner. Nothing
of full resolution is ever stored, not even a [B, H, W] log-sum-exp: the backward recomputes it from logits that
are 1/64 of the output pixels at the workload (and hit the cache), which is cheaper than writing and re-reading a
16.8 MB fp32 buffer next to the 33.6 MB of labels that both passes must read anyway. The price is compute: each
output pixel's softmax is recomputed by the ~1.3 tiles its stencil reaches, once per class chunk (1 for K <= 64).

C++ backend (SEGKD_KERNELS=cuda; csrc/cuda/upsampled_ce.cu and its CPU twin): the same forward partials, one thread
per output pixel; the backward is the same kind of gather without atomics or full-resolution buffers, written once
in csrc/upsampled_ce.h as a tile algorithm that the CUDA block and the CPU task both run (4 x 8 low-res pixels x up to
256 classes per tile, so each output pixel's log-sum-exp is computed once per tile; output rows in chunks of 64
columns; the transposed interpolation summed per accumulator column instead of a tl.dot).

Traffic model (a model, not a measurement: each tensor counted once per kernel that reads or writes it, gathers
assumed to hit the cache) at the workload B = 8, K = 19, 64x128 bf16 logits -> 512x1024 int64 labels
(bench/bench_upsampled_ce.py prints it):
    unfused (.float(), interpolate, log_softmax, nll_loss and their backwards): 1.02 GB forward, 1.64 GB backward,
        four [8, 19, 512, 1024] fp32 tensors (319 MB each) written across the two;
    fused: 36 MB forward (labels + logits), 47.5 MB backward (labels and logits re-read by the overlapping tiles,
        the bf16 gradient written): 3.1% of the unfused bytes, and no full-resolution tensor.
"""
import torch
import torch.nn.functional as F

from kernels import _cpp
from kernels._dispatch import (DOT_PRECISION, eager_cpp, eager_function, empty, empty_like, next_pow2, strided_bchw,
                               triton, tl, upcast, use_cpp, use_triton)


def upsampled_cross_entropy_reference(logits, labels, ignore_index=255, align_corners=False):
    """logits [B, K, h, w], labels [B, H, W] integer. The plain-torch formula of the module docstring; returns a
    float32 scalar (computed in float64 for float64 logits)."""
    k = logits.shape[1]
    z = F.interpolate(upcast(logits), size=labels.shape[-2:], mode="bilinear",
                      align_corners=align_corners)  # [B, K, H, W]
    lab = labels.long()
    valid = (lab >= 0) & (lab < k) & (lab != ignore_index)  # [B, H, W]
    total = F.cross_entropy(z, torch.where(valid, lab, ignore_index), ignore_index=ignore_index, reduction="sum")
    return (total / valid.sum().clamp_min(1)).float()


@triton.jit
def _source(dst, scale, n_in, ALIGN_CORNERS: tl.constexpr):
    """PyTorch's source of output index dst: (lower neighbour, upper neighbour, weight of the upper one). dst: int
    tensor or scalar; scale = in/out, or (in - 1)/(out - 1) (0 when out == 1) with align_corners."""
    if ALIGN_CORNERS:
        src = dst.to(tl.float32) * scale
    else:
        src = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), n_in - 1)  # src >= 0: truncation is floor
    i1 = tl.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0.to(tl.float32)


@triton.jit
def _interpolate(
        x_ptr,  # [B, K, h, w] low-resolution logits, any strides
        chan, mask, q00, q01, q10, q11, wx, wy):
    """Bilinear logits [K_BLOCK, P] in fp32: chan [K_BLOCK, 1] channel offsets (batch included), q.. [1, P] pixel
    offsets of the four neighbours, wx, wy [1, P] weights of the upper neighbours."""
    x00 = tl.load(x_ptr + chan + q00, mask=mask, other=0.0).to(tl.float32)
    x01 = tl.load(x_ptr + chan + q01, mask=mask, other=0.0).to(tl.float32)
    x10 = tl.load(x_ptr + chan + q10, mask=mask, other=0.0).to(tl.float32)
    x11 = tl.load(x_ptr + chan + q11, mask=mask, other=0.0).to(tl.float32)
    return (1.0 - wy) * ((1.0 - wx) * x00 + wx * x01) + wy * ((1.0 - wx) * x10 + wx * x11)


@triton.jit
def _upsampled_ce_fwd_kernel(
    x_ptr,  # [B, K, h*w] logits, element strides (x_sb, x_sc, x_sp)
    y_ptr,  # [B, H*W] integer labels (read unless KD)
    t_ptr,  # [B, K, h*w] teacher logits, element strides (t_sb, t_sc, t_sp) (read when KD)
    loss_ptr,  # [B, n_blocks] fp32 out: sum of the per-pixel losses over each block's valid pixels
    count_ptr,  # [B, n_blocks] fp32 out: valid pixels of each block
    K, h, w, H, W,
    ignore_index,
    x_sb, x_sc, x_sp,
    t_sb, t_sc, t_sp,
    inv_temp,  # KD: 1 / T
    scale_h,  # h / H ((h - 1) / (H - 1) with ALIGN_CORNERS)
    scale_w,  # w / W (likewise)
    K_BLOCK: tl.constexpr,
    P_BLOCK: tl.constexpr,
    ALIGN_CORNERS: tl.constexpr,
    KD: tl.constexpr,  # KL(softmax(t/T) || softmax(x/T)) per output pixel (every pixel valid) instead of the CE
):
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    p = blk.to(tl.int64) * P_BLOCK + tl.arange(0, P_BLOCK)  # [P_BLOCK] output pixels
    in_p = p < H * W
    if KD:
        y = tl.full([P_BLOCK], -1, tl.int32)
        valid = in_p
    else:
        y = tl.load(y_ptr + b * H * W + p, mask=in_p, other=-1).to(tl.int32)
        valid = in_p & (y >= 0) & (y < K) & (y != ignore_index)
    y0, y1, wy = _source(p // W, scale_h, h, ALIGN_CORNERS)
    x0, x1, wx = _source(p % W, scale_w, w, ALIGN_CORNERS)
    i00 = (y0 * w + x0).to(tl.int64)[None, :]  # [1, P_BLOCK] low-res pixel indices of the four neighbours
    i01 = (y0 * w + x1).to(tl.int64)[None, :]
    i10 = (y1 * w + x0).to(tl.int64)[None, :]
    i11 = (y1 * w + x1).to(tl.int64)[None, :]
    q00 = i00 * x_sp
    q01 = i01 * x_sp
    q10 = i10 * x_sp
    q11 = i11 * x_sp
    k_idx = tl.arange(0, K_BLOCK)
    # Online log-sum-exp over the class chunks (m: running max, s: sum of exp(z - m)) and the target logit.
    m = tl.full([P_BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([P_BLOCK], tl.float32)
    z_y = tl.zeros([P_BLOCK], tl.float32)
    # KD: the teacher's online max and sum of exp, and a = sum_k exp(zt - mt) (zt - z), rescaled alike, so that
    # KL = a / st - (mt + log st) + (m + log s) in the same single pass over the classes
    mt = tl.full([P_BLOCK], float("-inf"), tl.float32)
    st = tl.zeros([P_BLOCK], tl.float32)
    a = tl.zeros([P_BLOCK], tl.float32)
    for k0 in range(0, K, K_BLOCK):
        k = k0 + k_idx
        in_k = k < K
        z = _interpolate(x_ptr, b * x_sb + k[:, None].to(tl.int64) * x_sc, in_k[:, None] & in_p[None, :],
                         q00, q01, q10, q11, wx[None, :], wy[None, :])  # [K_BLOCK, P_BLOCK]
        if KD:
            z = z * inv_temp
            zt = _interpolate(t_ptr, b * t_sb + k[:, None].to(tl.int64) * t_sc, in_k[:, None] & in_p[None, :],
                              i00 * t_sp, i01 * t_sp, i10 * t_sp, i11 * t_sp, wx[None, :], wy[None, :]) * inv_temp
            zt = tl.where(in_k[:, None], zt, -1e30)
            mt_new = tl.maximum(mt, tl.max(zt, axis=0))
            et = tl.exp(zt - mt_new[None, :])  # 0 for padded classes
            a = a * tl.exp(mt - mt_new) + tl.sum(et * tl.where(in_k[:, None], zt - z, 0.0), axis=0)
            st = st * tl.exp(mt - mt_new) + tl.sum(et, axis=0)
            mt = mt_new
        z = tl.where(in_k[:, None], z, -1e30)  # padded classes: finite, so no inf - inf, and exp() = 0
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[None, :]), axis=0)
        m = m_new
        z_y += tl.sum(tl.where(k[:, None] == y[None, :], z, 0.0), axis=0)
    if KD:  # >= 0 in exact arithmetic; the clamp keeps rounding (large logits, p_s ~ p_t) from going below
        loss = tl.maximum(a / st - (mt + tl.log(st)) + (m + tl.log(s)), 0.0)
    else:
        loss = tl.log(s) + m - z_y  # [P_BLOCK]
    out = b * tl.num_programs(0) + blk
    tl.store(loss_ptr + out, tl.sum(tl.where(valid, loss, 0.0), axis=0))
    tl.store(count_ptr + out, tl.sum(valid.to(tl.float32), axis=0))


@triton.jit
def _upsampled_ce_bwd_kernel(
    x_ptr,  # [B, K, h*w] logits, element strides (x_sb, x_sc, x_sp)
    y_ptr,  # [B, H*W] integer labels (read unless KD)
    t_ptr,  # [B, K, h*w] teacher logits, element strides (t_sb, t_sc, t_sp) (read when KD)
    scale_ptr,  # [] fp32: grad_output / max(|V|, 1) (KD: times T and the loss's scale)
    g_ptr,  # [B, K, h*w] out (logits' dtype, strides g_sb, g_sc, g_sp): dL/dlogits
    K, h, w, H, W,
    ignore_index,
    x_sb, x_sc, x_sp,
    t_sb, t_sc, t_sp,
    g_sb, g_sc, g_sp,
    inv_temp,  # KD: 1 / T
    scale_h,  # h / H ((h - 1) / (H - 1) with ALIGN_CORNERS)
    scale_w,  # w / W (likewise)
    inv_h,  # H / h ((H - 1) / (h - 1) with ALIGN_CORNERS, H when h == 1)
    inv_w,  # W / w (likewise)
    K_BLOCK: tl.constexpr,
    TH: tl.constexpr,  # low-res rows per tile
    TW: tl.constexpr,  # low-res columns per tile
    OW: tl.constexpr,  # output pixels per row segment
    ONE_CHUNK: tl.constexpr,  # K <= K_BLOCK: the log-sum-exp comes from the chunk's own tile
    PRECISION: tl.constexpr,
    ALIGN_CORNERS: tl.constexpr,
    KD: tl.constexpr,  # dL/dz = (softmax(z/T) - softmax(zt/T)) on every pixel instead of (softmax(z) - onehot(y))
):
    tile = tl.program_id(0)
    kc = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_tw = tl.cdiv(w, TW)
    i0 = (tile // n_tw) * TH
    j0 = (tile % n_tw) * TW
    ti = i0 + tl.arange(0, TH)  # [TH] low-res rows of this tile
    tj = j0 + tl.arange(0, TW)  # [TW] low-res columns
    k_idx = tl.arange(0, K_BLOCK)
    k = kc * K_BLOCK + k_idx  # [K_BLOCK] this program's classes
    in_k = k < K
    g_scale = tl.load(scale_ptr)
    # Output rows whose lower neighbour lies in [i0 - 1, i0 + TH - 1] (those alone can weight the tile): from
    # src = (o + 0.5) * in/out - 0.5, widened by one on each side against rounding. Likewise the columns.
    if ALIGN_CORNERS:  # src = o * (in - 1)/(out - 1): the rows with i0 - 1 <= src < i0 + TH, widened likewise
        oy_lo = tl.maximum(tl.floor((i0 - 1) * inv_h).to(tl.int32) - 1, 0)
        oy_hi = tl.minimum(tl.ceil((i0 + TH) * inv_h).to(tl.int32) + 1, H)
        ox_lo = tl.maximum(tl.floor((j0 - 1) * inv_w).to(tl.int32) - 1, 0)
        ox_hi = tl.minimum(tl.ceil((j0 + TW) * inv_w).to(tl.int32) + 1, W)
    else:
        oy_lo = tl.where(i0 >= 2, tl.maximum(tl.floor((i0 - 0.5) * inv_h - 0.5).to(tl.int32) - 1, 0), 0)
        oy_hi = tl.minimum(tl.ceil((i0 + TH + 0.5) * inv_h - 0.5).to(tl.int32) + 1, H)
        ox_lo = tl.where(j0 >= 2, tl.maximum(tl.floor((j0 - 0.5) * inv_w - 0.5).to(tl.int32) - 1, 0), 0)
        ox_hi = tl.minimum(tl.ceil((j0 + TW + 0.5) * inv_w - 0.5).to(tl.int32) + 1, W)
    acc = tl.zeros([K_BLOCK, TH, TW], tl.float32)
    for oy in range(oy_lo, oy_hi):
        y0, y1, wy = _source(tl.zeros([1], tl.int32) + oy, scale_h, h, ALIGN_CORNERS)  # [1] each (oy: a plain int
        # when interpreted)
        w_row = tl.where(ti == y0, 1.0 - wy, 0.0) + tl.where(ti == y1, wy, 0.0)  # [TH] (both when y0 == y1)
        for ox0 in range(ox_lo, ox_hi, OW):
            ox = ox0 + tl.arange(0, OW)  # [OW]
            in_p = ox < ox_hi
            if KD:
                lab = tl.full([OW], -1, tl.int32)
                valid = in_p
            else:
                lab = tl.load(y_ptr + (b * H + oy) * W + ox, mask=in_p, other=-1).to(tl.int32)
                valid = in_p & (lab >= 0) & (lab < K) & (lab != ignore_index)
            x0, x1, wx = _source(ox, scale_w, w, ALIGN_CORNERS)
            i00 = (y0 * w + x0).to(tl.int64)[None, :]  # [1, OW] low-res pixel indices of the four neighbours
            i01 = (y0 * w + x1).to(tl.int64)[None, :]
            i10 = (y1 * w + x0).to(tl.int64)[None, :]
            i11 = (y1 * w + x1).to(tl.int64)[None, :]
            # this chunk's logits, and the log-sum-exp over all K classes at these output pixels, recomputed from
            # the low-res logits (from the chunk itself when it holds every class)
            z = _interpolate(x_ptr, b * x_sb + k[:, None].to(tl.int64) * x_sc, in_k[:, None] & in_p[None, :],
                             i00 * x_sp, i01 * x_sp, i10 * x_sp, i11 * x_sp, wx[None, :], wy[:, None])
            if KD:
                z = z * inv_temp
            z = tl.where(in_k[:, None], z, -1e30)
            if ONE_CHUNK:
                m = tl.max(z, axis=0)
                lse = m + tl.log(tl.sum(tl.exp(z - m[None, :]), axis=0))  # [OW]
            else:
                lse = _lse(x_ptr, b * x_sb, x_sc, i00 * x_sp, i01 * x_sp, i10 * x_sp, i11 * x_sp, wx, wy, in_p,
                           k_idx, K, inv_temp if KD else 1.0, K_BLOCK, OW)
            prob = tl.exp(z - lse[None, :])  # [K_BLOCK, OW]; 0 for padded classes
            if KD:  # the target is the teacher's softmax at temperature T
                zt = _interpolate(t_ptr, b * t_sb + k[:, None].to(tl.int64) * t_sc, in_k[:, None] & in_p[None, :],
                                  i00 * t_sp, i01 * t_sp, i10 * t_sp, i11 * t_sp, wx[None, :], wy[:, None]) * inv_temp
                zt = tl.where(in_k[:, None], zt, -1e30)
                if ONE_CHUNK:
                    mt = tl.max(zt, axis=0)
                    lse_t = mt + tl.log(tl.sum(tl.exp(zt - mt[None, :]), axis=0))
                else:
                    lse_t = _lse(t_ptr, b * t_sb, t_sc, i00 * t_sp, i01 * t_sp, i10 * t_sp, i11 * t_sp, wx, wy, in_p,
                                 k_idx, K, inv_temp, K_BLOCK, OW)
                onehot = tl.exp(zt - lse_t[None, :])
            else:
                onehot = tl.where(k[:, None] == lab[None, :], 1.0, 0.0)
            d = (prob - onehot) * tl.where(valid, g_scale, 0.0)[None, :]  # dL/dz of this chunk
            # transposed horizontal interpolation: [OW, TW] weights of each output column on the tile's columns
            w_col = (tl.where(x0[:, None] == tj[None, :], 1.0 - wx[:, None], 0.0)
                     + tl.where(x1[:, None] == tj[None, :], wx[:, None], 0.0))
            e = tl.dot(d, w_col, input_precision=PRECISION)  # [K_BLOCK, TW]
            acc += e[:, None, :] * w_row[None, :, None]
    pix = (ti[None, :, None] * w + tj[None, None, :]).to(tl.int64)  # [1, TH, TW]
    offs = b * g_sb + k[:, None, None].to(tl.int64) * g_sc + pix * g_sp
    mask = in_k[:, None, None] & (ti < h)[None, :, None] & (tj < w)[None, None, :]
    tl.store(g_ptr + offs, acc.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lse(
        x_ptr,  # [B, K, h*w] logits, any strides
        base, x_sc, q00, q01, q10, q11, wx, wy, in_p, k_idx, K, mult, K_BLOCK: tl.constexpr, OW: tl.constexpr):
    """log-sum-exp over all K classes (online, chunk by chunk) of mult * (bilinear logits) at a row segment's output
    pixels [OW], recomputed from the low-res logits."""
    m = tl.full([OW], float("-inf"), tl.float32)
    s = tl.zeros([OW], tl.float32)
    for c0 in range(0, K, K_BLOCK):
        c = c0 + k_idx
        in_c = c < K
        zc = _interpolate(x_ptr, base + c[:, None].to(tl.int64) * x_sc, in_c[:, None] & in_p[None, :],
                          q00, q01, q10, q11, wx[None, :], wy[:, None]) * mult
        zc = tl.where(in_c[:, None], zc, -1e30)
        m_new = tl.maximum(m, tl.max(zc, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zc - m_new[None, :]), axis=0)
        m = m_new
    return m + tl.log(s)


# Tiling; tests shrink them so that small tensors reach every loop. Forward: [K_BLOCK, P_BLOCK] tiles of ~4K elements.
# Backward: [TH, TW] low-res tiles (each output pixel's softmax is recomputed by ~(TH + 1.4) (TW + 1.4) / (TH TW)
# tiles at 8x upsampling), OW output pixels per row segment, classes in chunks of at most BWD_K_BLOCK (one chunk
# for K <= 64; three for K = 150, each recomputing the log-sum-exp). tl.dot needs K_BLOCK, OW, TW >= 16. On 8 warps
# for sm_90 at the workload (bench/aot_report.py --only upsampled_ce): forward 75 registers (173 channels-last),
# backward 168 (K = 19) and 247 (K = 150, its [64, 8, 16] accumulator), no spills; 4 warps or 4K-element forward
# tiles spilled.
FWD_K_BLOCK = 32
FWD_TILE = 2048
BWD_K_BLOCK = 64
BWD_TILE = (8, 16, 32)  # (TH, TW, OW)
CPP_BLOCK = 256  # output pixels per forward block of the C++ kernels (a CUDA block's threads); their backward tiles
# are fixed in csrc/upsampled_ce.h


def _geometry(logits, labels):
    x, strides = strided_bchw(logits)  # no copy for NCHW or channels-last
    b, k, h, w = x.shape
    hh, ww = labels.shape[-2:]
    return x, strides, b, k, h, w, hh, ww


def _scales(h, w, hh, ww, align_corners):
    """(scale_h, scale_w, inv_h, inv_w): in/out and out/in per axis, or with align_corners (in - 1)/(out - 1) (0 when
    out == 1, as PyTorch) and (out - 1)/(in - 1) (out when in == 1: every output row then reads row 0)."""
    if not align_corners:
        return h / hh, w / ww, hh / h, ww / w
    fwd = lambda n_in, n_out: (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    inv = lambda n_in, n_out: (n_out - 1) / (n_in - 1) if n_in > 1 else float(n_out)
    return fwd(h, hh), fwd(w, ww), inv(h, hh), inv(w, ww)


def _forward_partials(x, strides, y, t, t_strides, hh, ww, ignore_index, inv_temp, align_corners, kd):
    """The Triton forward, CE (labels y; t unread) or KD (teacher t; y unread): per-block partials (loss sums, valid
    pixel counts), each [B, n_blocks] fp32."""
    b, k, h, w = x.shape
    k_block = min(FWD_K_BLOCK, max(16, next_pow2(k)))
    p_block = min(max(16, FWD_TILE // k_block), max(16, next_pow2(hh * ww)))
    n_blk = triton.cdiv(hh * ww, p_block)
    loss = empty((b, n_blk), torch.float32, x.device)
    count = empty((b, n_blk), torch.float32, x.device)
    _upsampled_ce_fwd_kernel[(n_blk, b)](
        x, y, t, loss, count, k, h, w, hh, ww, int(ignore_index), *strides, *t_strides, inv_temp,
        *_scales(h, w, hh, ww, align_corners)[:2], K_BLOCK=k_block, P_BLOCK=p_block,
        ALIGN_CORNERS=bool(align_corners), KD=kd, num_warps=8 if k_block * p_block >= 2048 else 4)
    return loss, count


def _backward_gather(x, strides, y, t, t_strides, hh, ww, ignore_index, g_scale, g, inv_temp, align_corners, kd):
    """The Triton backward gather into g (dL/dx, x's shape), CE (labels y; t unread) or KD (teacher t; y unread)."""
    b, k, h, w = x.shape
    th, tw, ow = BWD_TILE
    k_block = min(BWD_K_BLOCK, max(16, next_pow2(k)))
    n_tiles = triton.cdiv(h, th) * triton.cdiv(w, tw)
    _upsampled_ce_bwd_kernel[(n_tiles, triton.cdiv(k, k_block), b)](
        x, y, t, g_scale, g, k, h, w, hh, ww, int(ignore_index), *strides, *t_strides, *strided_bchw(g)[1], inv_temp,
        *_scales(h, w, hh, ww, align_corners), K_BLOCK=k_block, TH=th, TW=tw, OW=ow, ONE_CHUNK=k <= k_block,
        PRECISION=DOT_PRECISION, ALIGN_CORNERS=bool(align_corners), KD=kd, num_warps=8)
    return g


def upsampled_cross_entropy_forward(logits, labels, ignore_index, align_corners=False):
    """Launch the forward kernel. Returns (loss [] fp32, |V| [] fp32), both on the device."""
    x, strides, b, *_, hh, ww = _geometry(logits, labels)
    y = labels.contiguous()
    # the C++ kernel (csrc/) in place of the Triton launch; it has align_corners=False's rule only
    cpp = use_cpp("upsampled_cross_entropy", x) and not align_corners
    if cpp:
        n_blk = -(-hh * ww // CPP_BLOCK)  # not triton.cdiv: the C++ path runs without triton
        loss = empty((b, n_blk), torch.float32, x.device)  # per-block partials, the same on both paths
        count = empty((b, n_blk), torch.float32, x.device)
        _cpp.ops().upsampled_ce(x, _cpp.labels(y), int(ignore_index), loss, count, CPP_BLOCK)
    else:
        loss, count = _forward_partials(x, strides, y, x, strides, hh, ww, ignore_index, 1.0, align_corners, False)
    n_valid = count.sum()  # fixed-order sums of the partials: deterministic
    return loss.sum() / n_valid.clamp_min(1.0), n_valid


def upsampled_cross_entropy_backward(logits, labels, n_valid, grad_loss, ignore_index, align_corners=False):
    """Launch the backward kernel: dL/dlogits [B, K, h, w] in the logits' dtype and layout, scaled by grad_loss (a
    0-dim device tensor, never read on the host)."""
    x, strides, *_, hh, ww = _geometry(logits, labels)
    y = labels.contiguous()
    scale = (grad_loss.float() / n_valid.clamp_min(1.0)).reshape(())
    g = empty_like(logits)  # the logits' memory format
    if use_cpp("upsampled_cross_entropy", x) and not align_corners:
        _cpp.ops().upsampled_ce_backward(x, _cpp.labels(y), scale, int(ignore_index), g)
        return g
    return _backward_gather(x, strides, y, x, strides, hh, ww, ignore_index, scale, g, 1.0, align_corners, False)


@torch.library.custom_op("segkd::upsampled_cross_entropy", mutates_args=())
def _upsampled_ce_op(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                     align_corners: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return upsampled_cross_entropy_forward(logits, labels, ignore_index, align_corners)


@_upsampled_ce_op.register_fake
def _(logits, labels, ignore_index, align_corners=False):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty((), dtype=torch.float32)


@torch.library.custom_op("segkd::upsampled_cross_entropy_backward", mutates_args=())
def _upsampled_ce_backward_op(logits: torch.Tensor, labels: torch.Tensor, n_valid: torch.Tensor,
                              grad_loss: torch.Tensor, ignore_index: int, align_corners: bool = False) -> torch.Tensor:
    return upsampled_cross_entropy_backward(logits, labels, n_valid, grad_loss, ignore_index, align_corners)


@_upsampled_ce_backward_op.register_fake
def _(logits, labels, n_valid, grad_loss, ignore_index, align_corners=False):
    return empty_like(logits, poison=False)  # as the launcher


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    logits, labels, ignore_index, *rest = inputs
    ctx.align_corners = bool(rest and rest[0])
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, labels, output[1])  # the backward recomputes everything else
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_loss, _grad_n_valid):
    if grad_loss is None:
        return None, None, None, None
    logits, labels, n_valid = ctx.saved_tensors
    backward = upsampled_cross_entropy_backward if eager_cpp(logits) else _upsampled_ce_backward_op  # see eager_cpp
    return backward(logits, labels, n_valid, grad_loss, ctx.ignore_index, ctx.align_corners), None, None, None


_upsampled_ce_op.register_autograd(_backward, setup_context=_setup_context)
_UpsampledCeEager = eager_function(upsampled_cross_entropy_forward, _setup_context, _backward)  # see eager_cpp


def upsampled_cross_entropy(logits, labels, ignore_index=255, align_corners=False):
    """Cross-entropy of bilinearly upsampled logits [B, K, h, w] against labels [B, H, W]: mean over the valid
    pixels, 0 when there are none; see the module docstring. Returns a float32 scalar. align_corners: F.interpolate's
    (True: src = dst * (in - 1)/(out - 1), the rule APD's released code upsamples with).

    Fused kernels when `kernels._dispatch.use_triton` says so, the C++ ones (csrc/) under SEGKD_KERNELS=cuda (float64
    logits, the tests' ground truth, always take the torch reference). The C++ kernels have align_corners=False's
    rule only: with align_corners=True, SEGKD_KERNELS=cuda runs Triton on CUDA tensors and the reference on CPU
    ones."""
    if logits.dim() != 4 or labels.dim() != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"upsampled_cross_entropy: logits {tuple(logits.shape)} must be [B, K, h, w] and labels "
                         f"{tuple(labels.shape)} [B, H, W] with the same B")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"upsampled_cross_entropy: labels must be an integer tensor, got {labels.dtype}")
    if 0 in logits.shape[1:] or 0 in labels.shape[1:]:
        raise ValueError(f"upsampled_cross_entropy: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                         "need at least one class and one pixel")
    if align_corners:  # Triton only (see above)
        fused, op = use_triton(logits, labels), _upsampled_ce_op
    else:
        fused = use_cpp("upsampled_cross_entropy", logits) or use_triton(logits, labels, op="upsampled_cross_entropy")
        op = _UpsampledCeEager.apply if eager_cpp(logits) else _upsampled_ce_op
    if not fused or logits.dtype == torch.float64:
        return upsampled_cross_entropy_reference(logits, labels, ignore_index, align_corners)
    return op(logits, labels, int(ignore_index), bool(align_corners))[0]


# ----------------------------------------------------------------------------- KD on upsampled logits
def upsampled_pixel_kl_reference(student, teacher, size, temperature=1.0, scale=1.0, align_corners=False):
    """pixel_kl of both logits upsampled bilinearly to `size` (H, W): scale * T^2 * sum over the B*H*W output pixels
    of KL(softmax(t/T) || softmax(s/T)) / (B*H*W). Float32 scalar (float64 inputs computed in float64)."""
    from kernels.pixel_kl import pixel_kl_reference

    up = lambda x: F.interpolate(upcast(x), size=tuple(size), mode="bilinear", align_corners=align_corners)
    return (pixel_kl_reference(up(student), up(teacher), temperature) * scale).float()


def upsampled_pixel_kl_forward(student, teacher, hh, ww, temperature, scale, align_corners):
    """The KD mode of the forward kernel: (loss [] fp32, B*H*W [] fp32)."""
    x, strides = strided_bchw(student)
    t, t_strides = strided_bchw(teacher)
    loss, count = _forward_partials(x, strides, x, t, t_strides, hh, ww, -1, 1.0 / float(temperature),
                                    align_corners, True)
    n = count.sum()
    return loss.sum() / n.clamp_min(1.0) * (float(temperature) ** 2 * float(scale)), n


def upsampled_pixel_kl_backward(student, teacher, hh, ww, n, grad_loss, temperature, scale, align_corners):
    """dL/dstudent [B, K, h, w] in the student's dtype and layout: the KD mode of the backward gather."""
    x, strides = strided_bchw(student)
    t, t_strides = strided_bchw(teacher)
    g_scale = (grad_loss.float() * (float(temperature) * float(scale)) / n.clamp_min(1.0)).reshape(())
    return _backward_gather(x, strides, x, t, t_strides, hh, ww, -1, g_scale, empty_like(student),
                            1.0 / float(temperature), align_corners, True)


@torch.library.custom_op("segkd::upsampled_pixel_kl", mutates_args=())
def _upsampled_kd_op(student: torch.Tensor, teacher: torch.Tensor, height: int, width: int, temperature: float,
                     scale: float, align_corners: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return upsampled_pixel_kl_forward(student, teacher, height, width, temperature, scale, align_corners)


@_upsampled_kd_op.register_fake
def _(student, teacher, height, width, temperature, scale, align_corners):
    return student.new_empty((), dtype=torch.float32), student.new_empty((), dtype=torch.float32)


@torch.library.custom_op("segkd::upsampled_pixel_kl_backward", mutates_args=())
def _upsampled_kd_backward_op(student: torch.Tensor, teacher: torch.Tensor, height: int, width: int,
                              n: torch.Tensor, grad_loss: torch.Tensor, temperature: float, scale: float,
                              align_corners: bool) -> torch.Tensor:
    return upsampled_pixel_kl_backward(student, teacher, height, width, n, grad_loss, temperature, scale,
                                       align_corners)


@_upsampled_kd_backward_op.register_fake
def _(student, teacher, height, width, n, grad_loss, temperature, scale, align_corners):
    return empty_like(student, poison=False)


def _kd_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    student, teacher, *ctx.args = inputs  # height, width, temperature, scale, align_corners
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(student, teacher, output[1])


def _kd_backward(ctx, grad_loss, _grad_n):
    if grad_loss is None:
        return None, None, None, None, None, None, None
    student, teacher, n = ctx.saved_tensors
    height, width, temperature, scale, align_corners = ctx.args
    g = _upsampled_kd_backward_op(student, teacher, height, width, n, grad_loss, temperature, scale, align_corners)
    return g, None, None, None, None, None, None


_upsampled_kd_op.register_autograd(_kd_backward, setup_context=_kd_setup_context)


def upsampled_pixel_kl(student, teacher, size, temperature=1.0, scale=1.0, align_corners=False):
    """Per-pixel KD on logits [B, K, h, w] upsampled bilinearly to `size` (H, W), as the codes behind the CWD and APD
    tables compute their KD term (they interpolate both logits to the label size, then take KLDivLoss):
        L = scale * T^2 * sum_{b,p} KL(softmax(t_p/T) || softmax(s_p/T)) / (B*H*W)
    i.e. upsampled_pixel_kl_reference. Fused when `kernels._dispatch.use_triton` says so: the forward and the
    backward interpolate on the fly (upsampled_cross_entropy's kernels in their KD mode: the teacher's softmax as the
    target, every pixel counted), so no label-size logits are ever written (two [8, 19, 512, 1024] fp32 tensors at
    the workload, with their backward). A teacher that requires grad takes the reference. Triton and torch only
    (no C++ kernel)."""
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(f"upsampled_pixel_kl: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must "
                         "both be [B, K, h, w]")
    hh, ww = (int(v) for v in size)
    if 0 in student.shape[1:] or hh <= 0 or ww <= 0:
        raise ValueError(f"upsampled_pixel_kl: logits {tuple(student.shape)} and size {(hh, ww)} need at least one "
                         "class and one pixel")
    if not use_triton(student, teacher) or student.dtype == torch.float64 or (
            torch.is_grad_enabled() and teacher.requires_grad):
        return upsampled_pixel_kl_reference(student, teacher, (hh, ww), temperature, scale, align_corners)
    return _upsampled_kd_op(student, teacher, hh, ww, float(temperature), float(scale), bool(align_corners))[0]
