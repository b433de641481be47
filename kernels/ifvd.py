"""IFVD's loss: each pixel's cosine similarity to its own class centre, student against teacher, in one pass.

For features f [B, C, h, w] and labels y [B, h, w] at the same resolution, with the class centres of each image
c_{b,k} = sum_{p: y_bp = k} f_{b,:,p} / |{p: y_bp = k}| (kernels.masked_avg_pool),

    M_{b,p} = f_{b,:,p} . c_{b,y_bp} / (max(|f_{b,:,p}|, EPS) * max(|c_{b,y_bp}|, EPS))   y_bp in [0, K), not ignored
            = |f_{b,:,p}|^2 / max(|f_{b,:,p}|, EPS)^2                                    otherwise (cos(f, f))
    L = 1 / (B*h*w) * sum_{b,p} (M^s_{b,p} - M^t_{b,p})^2                                 (nn.MSELoss(), every pixel)

EPS = 1e-8 (torch.nn.CosineSimilarity's default). The student's and the teacher's maps each come from their own
features and centres, so C_s and C_t may differ. Wang et al., "Intra-class Feature Variation Distillation for
Semantic Segmentation", ECCV 2020; the formula of CriterionIFV in the authors' code (YukangWang/IFVD
utils/criterion.py, copied into CIRKD losses/ifvd.py); engine/methods/ifvd.py says how it follows the code.

Gradient (the teacher is a target: a teacher that requires grad takes the torch reference), with
w_p = grad_output * 2 (M^s_p - M^t_p) / (B*h*w), F_p = max(|f_p|, EPS), Z_k = max(|c_k|, EPS), n_k the class count:

    direct:   dL/df_p  = w_p (c_{y_p} / (F_p Z_{y_p}) - [|f_p| > EPS] M_p f_p / |f_p|^2)      (valid p)
                       = w_p [|f_p| <= EPS] 2 f_p / EPS^2                                     (ignored p)
    centres:  dL/dc_k  = S_k / Z_k - [|c_k| > EPS] E_k c_k / |c_k|^2,
              S_k = sum_{p: y_p = k} (w_p / F_p) f_p,  E_k = sum_{p: y_p = k} w_p M_p
              dL/df_p += dL/dc_{y_p} / max(n_{y_p}, 1)                                       (valid p)

Fused form (Triton): the centres come from masked_avg_pool's fused pass; `_ifvd_fwd_kernel` then reads each
pixel block of the student and the teacher features once (in place, NCHW or channels-last), gathers each pixel's
centre row from the tiny [B, K, C] table, and writes M^s, M^t ([B, HW] fp32, kept for the backward) and the
block's partial sum of (M^s - M^t)^2 (summed in a fixed order afterwards: deterministic). The backward is one
weighted class-sum pass over the student features (masked_avg_pool's kernel with per-pixel weights: S_k and E_k)
and one pass writing dL/df in the features' dtype and layout. No [B, C, h, w] temporary in either direction.
"""
import torch

from kernels._dispatch import empty, empty_like, needs_grad, next_pow2, strided_bchw, triton, tl, upcast, use_triton
from kernels.masked_avg_pool import class_means, class_sums, masked_avg_pool, masked_avg_pool_forward

EPS = 1e-8


def _valid(y, num_classes, ignore_index):
    return (y >= 0) & (y < num_classes) & (y != ignore_index)


def class_centre_similarity(feat, labels, num_classes, ignore_index=255):
    """M [B, h, w] (fp32; float64 for float64 features): each pixel's cosine similarity to the mean feature of its
    class in its image, as in the module docstring; plain torch through masked_avg_pool, differentiable.

    feat: [B, C, h, w] (NCHW or channels-last, any float dtype); labels: [B, h, w] integer at feature resolution.
    The [B, C, h, w] map of centres is never built: the dot products come from one batched matmul of the
    [B, K, C] centres with the features, gathered at each pixel's label.
    """
    b, c = feat.shape[:2]
    f = upcast(feat).reshape(b, c, -1)  # [B, C, hw]
    if f.dtype == torch.float64:  # the tests' float64 ground truth: the centres in float64 too
        centres, _ = class_means(feat, labels, num_classes, ignore_index)
    else:
        centres, _ = masked_avg_pool(feat, labels, num_classes, ignore_index)  # [B, K, C] fp32
    y = labels.reshape(b, -1)  # [B, hw]
    valid = _valid(y, num_classes, ignore_index)
    idx = torch.where(valid, y, 0).long()  # [B, hw]
    dots = torch.bmm(centres.to(f.dtype), f).gather(1, idx[:, None])[:, 0]  # [B, K, hw] -> [B, hw]
    f_norm = torch.linalg.vector_norm(f, dim=1)  # [B, hw]
    f_den = f_norm.clamp_min(EPS)
    c_den = torch.linalg.vector_norm(centres, dim=2).clamp_min(EPS).to(f.dtype).gather(1, idx)  # [B, K] -> [B, hw]
    self_sim = (f_norm / f_den) ** 2  # cos(f, f): 1, or 0 for an all-zero feature, as the reference
    sim = torch.where(valid, dots / (f_den * c_den), self_sim)
    return sim.reshape(b, *feat.shape[2:])


def class_centre_mse_reference(fs, ft, labels, num_classes, ignore_index=255):
    """The loss of the module docstring in plain torch (fp32, float64 kept), differentiable in both inputs."""
    m_s = class_centre_similarity(fs, labels, num_classes, ignore_index)
    m_t = class_centre_similarity(ft, labels, num_classes, ignore_index)
    return (m_s - m_t).square().mean()


@triton.jit
def _similarity(
        f_ptr,  # [B, C, HW] features, strides (sb, sc, sp)
        c_ptr,  # [B, K, C] fp32 class centres
        valid, cls, b, offs_p, mp, C, K, sb, sc, sp, BC: tl.constexpr, BP: tl.constexpr):
    """M [BP] for one pixel block of one network."""
    dot = tl.zeros((BP,), dtype=tl.float32)
    ff = tl.zeros((BP,), dtype=tl.float32)
    cc = tl.zeros((BP,), dtype=tl.float32)
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC).to(tl.int64)
        m = (offs_c < C)[:, None] & mp[None, :]
        f = tl.load(f_ptr + b * sb + offs_c[:, None] * sc + offs_p[None, :] * sp, mask=m, other=0.0).to(tl.float32)
        z = tl.load(c_ptr + (b * K + cls[None, :]) * C + offs_c[:, None], mask=m & valid[None, :], other=0.0)
        dot += tl.sum(f * z, axis=0)
        ff += tl.sum(f * f, axis=0)
        cc += tl.sum(z * z, axis=0)
    fd = tl.maximum(tl.sqrt(ff), 1e-8)
    zd = tl.maximum(tl.sqrt(cc), 1e-8)
    return tl.where(valid, dot / (fd * zd), ff / (fd * fd))


@triton.jit
def _ifvd_fwd_kernel(
        fs_ptr,  # [B, C_s, HW] student features, strides (ssb, ssc, ssp)
        cs_ptr,  # [B, K, C_s] fp32 student centres
        ft_ptr,  # [B, C_t, HW] teacher features, strides (stb, stc, stp)
        ct_ptr,  # [B, K, C_t] fp32 teacher centres
        y_ptr,  # [B, HW] integer labels
        ms_ptr,  # [B, HW] fp32 out: M^s
        mt_ptr,  # [B, HW] fp32 out: M^t
        part_ptr,  # [B, n_blocks] fp32 out: sum over the block of (M^s - M^t)^2
        C_s, C_t, HW, K, ignore_index, ssb, ssc, ssp, stb, stc, stp,
        BC: tl.constexpr, BP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs_p = blk.to(tl.int64) * BP + tl.arange(0, BP)
    mp = offs_p < HW
    y = tl.load(y_ptr + b * HW + offs_p, mask=mp, other=-1).to(tl.int64)
    valid = mp & (y >= 0) & (y < K) & (y != ignore_index)
    cls = tl.where(valid, y, 0)
    m_s = _similarity(fs_ptr, cs_ptr, valid, cls, b, offs_p, mp, C_s, K, ssb, ssc, ssp, BC, BP)
    m_t = _similarity(ft_ptr, ct_ptr, valid, cls, b, offs_p, mp, C_t, K, stb, stc, stp, BC, BP)
    tl.store(ms_ptr + b * HW + offs_p, m_s, mask=mp)
    tl.store(mt_ptr + b * HW + offs_p, m_t, mask=mp)
    d = tl.where(mp, m_s - m_t, 0.0)
    tl.store(part_ptr + b * tl.num_programs(1) + blk, tl.sum(d * d, axis=0))


@triton.jit
def _ifvd_bwd_kernel(
        f_ptr,  # [B, C, HW] student features, strides (sb, sc, sp)
        c_ptr,  # [B, K, C] fp32 student centres
        gc_ptr,  # [B, K, C] fp32: dL/dc_k / max(n_k, 1)
        y_ptr,  # [B, HW] integer labels
        w_ptr,  # [B, HW] fp32: w_p (grad_output included)
        m_ptr,  # [B, HW] fp32: M^s
        zinv_ptr,  # [B, K] fp32: 1 / max(|c_k|, EPS)
        g_ptr,  # [B, C, HW] out, the features' dtype, strides (gb, gc_, gp): dL/df
        C, HW, K, ignore_index, sb, sc, sp, gb, gc_, gp,
        BC: tl.constexpr, BP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1).to(tl.int64) * BP + tl.arange(0, BP)
    mp = offs_p < HW
    y = tl.load(y_ptr + b * HW + offs_p, mask=mp, other=-1).to(tl.int64)
    valid = mp & (y >= 0) & (y < K) & (y != ignore_index)
    cls = tl.where(valid, y, 0)
    w = tl.load(w_ptr + b * HW + offs_p, mask=mp, other=0.0)
    m = tl.load(m_ptr + b * HW + offs_p, mask=mp, other=0.0)
    zinv = tl.load(zinv_ptr + b * K + cls, mask=valid, other=0.0)
    ff = tl.zeros((BP,), dtype=tl.float32)  # first pass: |f_p|^2
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC).to(tl.int64)
        msk = (offs_c < C)[:, None] & mp[None, :]
        f = tl.load(f_ptr + b * sb + offs_c[:, None] * sc + offs_p[None, :] * sp, mask=msk, other=0.0).to(tl.float32)
        ff += tl.sum(f * f, axis=0)
    nf = tl.sqrt(ff)
    big = nf > 1e-8
    k_c = w * zinv / tl.maximum(nf, 1e-8)  # coefficient of c_{y_p}
    k_f = tl.where(valid, tl.where(big, -w * m / tl.where(big, ff, 1.0), 0.0),
                   tl.where(big, 0.0, w * 2.0 / (1e-8 * 1e-8)))  # coefficient of f_p
    for c0 in range(0, C, BC):
        offs_c = c0 + tl.arange(0, BC).to(tl.int64)
        msk = (offs_c < C)[:, None] & mp[None, :]
        off = b * sb + offs_c[:, None] * sc + offs_p[None, :] * sp
        f = tl.load(f_ptr + off, mask=msk, other=0.0).to(tl.float32)
        tab = (b * K + cls[None, :]) * C + offs_c[:, None]
        z = tl.load(c_ptr + tab, mask=msk & valid[None, :], other=0.0)
        gc = tl.load(gc_ptr + tab, mask=msk & valid[None, :], other=0.0)
        g = k_c[None, :] * z + k_f[None, :] * f + gc
        tl.store(g_ptr + b * gb + offs_c[:, None] * gc_ + offs_p[None, :] * gp, g.to(g_ptr.dtype.element_ty),
                 mask=msk)


def _blocks(c):
    return max(16, min(32, next_pow2(c))), 64  # (BC, BP)


def class_centre_mse_forward(fs, ft, labels, num_classes, ignore_index):
    """-> (loss [] fp32, M^s [B, HW] fp32, M^t [B, HW] fp32, student centres [B, K, C_s] fp32, counts [B, K])."""
    cs, counts = masked_avg_pool_forward(fs, labels, num_classes, ignore_index)
    ct, _ = masked_avg_pool_forward(ft, labels, num_classes, ignore_index)
    fs, s_str = strided_bchw(fs)
    ft, t_str = strided_bchw(ft)
    y = labels.contiguous()
    b, hw = y.shape[0], y[0].numel()
    bc, bp = _blocks(max(fs.shape[1], ft.shape[1]))
    n_blocks = triton.cdiv(hw, bp)
    m_s, m_t = empty((b, hw), torch.float32, fs.device), empty((b, hw), torch.float32, fs.device)
    part = empty((b, n_blocks), torch.float32, fs.device)
    _ifvd_fwd_kernel[(b, n_blocks)](fs, cs, ft, ct, y, m_s, m_t, part, fs.shape[1], ft.shape[1], hw, num_classes,
                                    ignore_index, *s_str, *t_str, BC=bc, BP=bp, num_warps=4)
    return part.sum() / (b * hw), m_s, m_t, cs, counts


def class_centre_mse_backward(fs, labels, m_s, m_t, cs, counts, grad_loss, num_classes, ignore_index):
    """dL/dfs in fs's dtype and layout (see the module docstring)."""
    fs_, strides = strided_bchw(fs)
    y = labels.contiguous()
    b, c = fs.shape[:2]
    hw = y[0].numel()
    w = (grad_loss.float() * 2.0 / (b * hw)) * (m_s - m_t)  # [B, HW]
    valid = _valid(y.reshape(b, hw), num_classes, ignore_index)
    fnorm = torch.linalg.vector_norm(fs_.flatten(2), dim=1, dtype=torch.float32)  # [B, HW]
    a = torch.where(valid, w / fnorm.clamp_min(EPS), 0.0)
    e = torch.where(valid, w * m_s, 0.0)
    sums, e_k = class_sums(fs, labels, num_classes, ignore_index, a, e)  # [B, K, C], [B, K]: fused, weighted
    znorm = torch.linalg.vector_norm(cs, dim=2)  # [B, K]
    zinv = 1.0 / znorm.clamp_min(EPS)
    shrink = torch.where(znorm > EPS, e_k / torch.where(znorm > EPS, znorm, 1.0).square(), 0.0)
    gc = (sums * zinv[..., None] - shrink[..., None] * cs) / counts.clamp_min(1)[..., None]  # [B, K, C]
    g = empty_like(fs)
    bc, bp = _blocks(c)
    _ifvd_bwd_kernel[(b, triton.cdiv(hw, bp))](fs_, cs, gc.contiguous(), y, w, m_s, zinv.contiguous(), g, c, hw,
                                               num_classes, ignore_index, *strides, *strided_bchw(g)[1], BC=bc,
                                               BP=bp, num_warps=4)
    return g


@torch.library.custom_op("segkd::class_centre_mse", mutates_args=())
def _ifvd_op(fs: torch.Tensor, ft: torch.Tensor, labels: torch.Tensor, num_classes: int,
             ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return class_centre_mse_forward(fs, ft, labels, num_classes, ignore_index)


@_ifvd_op.register_fake
def _(fs, ft, labels, num_classes, ignore_index):
    b, c = fs.shape[:2]
    hw = labels[0].numel()
    f32 = lambda *shape: fs.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return f32(), f32(b, hw), f32(b, hw), f32(b, num_classes, c), f32(b, num_classes)


@torch.library.custom_op("segkd::class_centre_mse_backward", mutates_args=())
def _ifvd_backward_op(fs: torch.Tensor, labels: torch.Tensor, m_s: torch.Tensor, m_t: torch.Tensor,
                      cs: torch.Tensor, counts: torch.Tensor, grad_loss: torch.Tensor, num_classes: int,
                      ignore_index: int) -> torch.Tensor:
    return class_centre_mse_backward(fs, labels, m_s, m_t, cs, counts, grad_loss, num_classes, ignore_index)


@_ifvd_backward_op.register_fake
def _(fs, labels, m_s, m_t, cs, counts, grad_loss, num_classes, ignore_index):
    return empty_like(fs, poison=False)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    fs, _, labels, num_classes, ignore_index = inputs
    _, m_s, m_t, cs, counts = output
    ctx.mark_non_differentiable(m_s, m_t, cs, counts)
    ctx.save_for_backward(fs, labels, m_s, m_t, cs, counts)
    ctx.num_classes, ctx.ignore_index = num_classes, ignore_index


def _backward(ctx, grad_loss, *_):
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    fs, labels, m_s, m_t, cs, counts = ctx.saved_tensors
    g = _ifvd_backward_op(fs, labels, m_s, m_t, cs, counts, grad_loss, ctx.num_classes, ctx.ignore_index)
    return g, None, None, None, None


_ifvd_op.register_autograd(_backward, setup_context=_setup_context)


def class_centre_mse(fs, ft, labels, num_classes, ignore_index=255):
    """IFVD's loss (module docstring): fs [B, C_s, h, w], ft [B, C_t, h, w] (C_s and C_t may differ), labels
    [B, h, w] integer at that resolution. Returns a float32 scalar; the gradient reaches fs (directly and
    through its centres). Fused kernels when `kernels._dispatch.use_triton` says so and the teacher needs no
    gradient; else the torch reference."""
    if fs.dim() != 4 or ft.dim() != 4 or fs.shape[:1] + fs.shape[2:] != labels.shape or \
            ft.shape[:1] + ft.shape[2:] != labels.shape:
        raise ValueError(f"class_centre_mse: student {tuple(fs.shape)}, teacher {tuple(ft.shape)} and labels "
                         f"{tuple(labels.shape)} must be [B, C_s, h, w], [B, C_t, h, w] and [B, h, w]")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"class_centre_mse: labels must be an integer tensor, got {labels.dtype}")
    # fp32 whatever autocast says (the reference's bmm would run in bf16; the maps differ by small amounts)
    with torch.autocast(fs.device.type, enabled=False):
        if not use_triton(fs, ft, labels) or needs_grad(ft) or torch.float64 in (fs.dtype, ft.dtype):
            return class_centre_mse_reference(fs, ft, labels, num_classes, ignore_index).float()
        return _ifvd_op(fs, ft, labels, int(num_classes), int(ignore_index))[0]
