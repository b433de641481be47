"""Distance of a batch's per-sample activation statistics from a BatchNorm layer's running statistics.

    d_b = || mean_hw(x_b) - running_mean ||_2 + || var_hw(x_b) - running_var ||_2

with the biased variance over H*W. The per-layer term of DeepInversion's feature-statistics prior
(Yin et al., CVPR 2020) taken per sample; used by DFSS's Approximate Distribution Sampling to score images.

Fused form: one reading pass gives, per (b, c) row of N = H*W values, S1 = sum(x - k) and S2 = sum((x - k)^2)
around the row's first value k (the shift keeps E[x^2] - E[x]^2 from cancelling when |mean| >> std), so
mu = k + S1/N and var = S2/N - (S1/N)^2. The data-free generator backpropagates through d_b:

    dd_b/dx_bci = (mu_bc - rm_c) / (N ||mu_b - rm||) + 2 (var_bc - rv_c) (x_bci - mu_bc) / (N ||var_b - rv||)

(a zero norm contributes 0, as in torch's norm backward), one more pass that reads x and writes the gradient.
"""
import torch

from kernels import _cpp
from kernels._dispatch import (eager_cpp, eager_function, empty, needs_grad, row_tiling, strided_bchw, triton, tl,
                               upcast, use_cpp, use_triton)

CPP_CHUNK = 8192  # pixels per split of a row in the C++ kernels (a CPU task, a CUDA block)


def bn_stat_distance_reference(x, running_mean, running_var):
    """x: [B, C, H, W]; running_mean, running_var: [C]. Returns [B] float32."""
    x = upcast(x)
    mean = x.mean(dim=(2, 3))  # [B, C]
    var = x.var(dim=(2, 3), unbiased=False)
    return ((mean - upcast(running_mean)).norm(dim=1) + (var - upcast(running_var)).norm(dim=1)).float()


@triton.jit
def _bn_stat_fwd_kernel(
    x_ptr,  # [R, N] activations, R = B*C rows of N = H*W
    out_ptr,  # [2, R, S] fp32 out: per split, sum(x - k) and sum((x - k)^2), k = x[row, 0]
    N,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_rows = tl.num_programs(0)
    n_splits = tl.num_programs(1)
    shift = tl.load(x_ptr + row * N).to(tl.float32)
    start = split.to(tl.int64) * CHUNK
    s1 = tl.zeros([BLOCK], tl.float32)
    s2 = tl.zeros([BLOCK], tl.float32)
    for i in range(0, CHUNK, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        m = idx < N
        d = tl.where(m, tl.load(x_ptr + row * N + idx, mask=m, other=0.0).to(tl.float32) - shift, 0.0)
        s1 += d
        s2 += d * d
    out = row * n_splits + split
    tl.store(out_ptr + out, tl.sum(s1, axis=0))
    tl.store(out_ptr + n_rows * n_splits + out, tl.sum(s2, axis=0))


@triton.jit
def _bn_stat_bwd_kernel(
    x_ptr,  # [R, N] activations
    k_ptr,  # [3, R] fp32: dd/dx = a * (x - mu) + c0, rows of (a, mu, c0)
    g_ptr,  # [R, N] out (x dtype): dd/dx
    N,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_rows = tl.num_programs(0)
    a = tl.load(k_ptr + row)
    mu = tl.load(k_ptr + n_rows + row)
    c0 = tl.load(k_ptr + 2 * n_rows + row)
    start = split.to(tl.int64) * CHUNK
    for i in range(0, CHUNK, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        m = idx < N
        x = tl.load(x_ptr + row * N + idx, mask=m, other=0.0).to(tl.float32)
        tl.store(g_ptr + row * N + idx, (a * (x - mu) + c0).to(g_ptr.dtype.element_ty), mask=m)


def bn_stat_forward(x, running_mean, running_var):
    """Returns (d [B] fp32, mean [B, C] fp32, var [B, C] fp32)."""
    b, c = x.shape[:2]
    n = x[0, 0].numel()
    if use_cpp("bn_stat_distance", x):  # the C++ kernel (csrc/) reads NCHW and channels-last in place
        x = strided_bchw(x)[0]
        partial = empty((2, b * c, -(-n // CPP_CHUNK)), torch.float32, x.device)
        _cpp.ops().bn_stat(x, CPP_CHUNK, partial)
    else:
        x = x.contiguous()
        block, chunk, n_splits = row_tiling(n)
        partial = empty((2, b * c, n_splits), torch.float32, x.device)
        _bn_stat_fwd_kernel[(b * c, n_splits)](x, partial, n, CHUNK=chunk, BLOCK=block,
                                               num_warps=4 if block <= 1024 else 8)
    s1, s2 = partial.sum(2).reshape(2, b, c)
    shift = x[:, :, 0, 0].float()  # each row's first pixel: the kernels' shift k
    mean = (shift + s1 / n).contiguous()
    var = (s2 / n - (s1 / n) ** 2).clamp_min(0)
    d = (mean - running_mean.float()).norm(dim=1) + (var - running_var.float()).norm(dim=1)
    return d, mean, var


def bn_stat_backward(x, running_mean, running_var, mean, var, grad_d):
    """dd/dx (x dtype, NCHW-contiguous) for an upstream gradient grad_d [B]."""
    cpp = use_cpp("bn_stat_distance", x)
    x = strided_bchw(x)[0] if cpp else x.contiguous()  # the C++ kernel reads channels-last in place
    b, c = x.shape[:2]
    n = x[0, 0].numel()
    dm = mean - running_mean.float()  # [B, C]
    dv = var - running_var.float()
    nm = dm.norm(dim=1, keepdim=True)  # [B, 1]
    nv = dv.norm(dim=1, keepdim=True)
    go = grad_d.float()[:, None]
    c0 = torch.where(nm > 0, go * dm / (n * nm.clamp_min(1e-30)), torch.zeros_like(dm))
    a = torch.where(nv > 0, go * 2 * dv / (n * nv.clamp_min(1e-30)), torch.zeros_like(dv))
    k = torch.stack([a.reshape(-1), mean.reshape(-1), c0.reshape(-1)])  # [3, B*C]
    g = empty(x.shape, x.dtype, x.device)  # NCHW-contiguous, as the fake kernel says
    if cpp:
        _cpp.ops().bn_stat_apply(x, k, g)
        return g
    block, chunk, n_splits = row_tiling(n)
    _bn_stat_bwd_kernel[(b * c, n_splits)](x, k, g, n, CHUNK=chunk, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return g


@torch.library.custom_op("segkd::bn_stat_distance", mutates_args=())
def _bn_stat_op(x: torch.Tensor, running_mean: torch.Tensor,
                running_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return bn_stat_forward(x, running_mean, running_var)


@_bn_stat_op.register_fake
def _(x, running_mean, running_var):
    b, c = x.shape[:2]
    return x.new_empty((b,), dtype=torch.float32), x.new_empty((b, c), dtype=torch.float32), \
        x.new_empty((b, c), dtype=torch.float32)


@torch.library.custom_op("segkd::bn_stat_distance_backward", mutates_args=())
def _bn_stat_backward_op(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                         var: torch.Tensor, grad_d: torch.Tensor) -> torch.Tensor:
    return bn_stat_backward(x, running_mean, running_var, mean, var, grad_d)


@_bn_stat_backward_op.register_fake
def _(x, running_mean, running_var, mean, var, grad_d):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no full-size zero gradient for the outputs that take none
    x, running_mean, running_var = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, running_mean, running_var, mean, var)


def _backward(ctx, grad_d, _grad_mean, _grad_var):
    x, running_mean, running_var, mean, var = ctx.saved_tensors
    backward = bn_stat_backward if eager_cpp(x) else _bn_stat_backward_op  # eagerly: no custom-op wrapper
    return backward(x, running_mean, running_var, mean, var, grad_d), None, None


_bn_stat_op.register_autograd(_backward, setup_context=_setup_context)
_BnStatEager = eager_function(bn_stat_forward, _setup_context, _backward)  # see eager_cpp


def bn_stat_distance(x, running_mean, running_var):
    """Per-sample BN-statistic distance; see the module docstring.

    Fused Triton kernels when `kernels._dispatch.use_triton` says so, the C++ ones (csrc/) under
    SEGKD_KERNELS=cuda; running statistics that require grad take the torch reference (the kernels differentiate
    x only).
    """
    if x.dim() != 4 or running_mean.shape != x.shape[1:2] or running_var.shape != x.shape[1:2]:
        raise ValueError(f"bn_stat_distance: x {tuple(x.shape)} must be [B, C, H, W] with running_mean "
                         f"{tuple(running_mean.shape)} and running_var {tuple(running_var.shape)} both [C]")
    if (not (use_cpp("bn_stat_distance", x) or use_triton(x, running_mean, running_var, op="bn_stat_distance"))
            or needs_grad(running_mean, running_var)):
        return bn_stat_distance_reference(x, running_mean, running_var)
    op = _BnStatEager.apply if eager_cpp(x) else _bn_stat_op
    return op(x, running_mean, running_var)[0]
