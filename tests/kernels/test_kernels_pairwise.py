"""kernels/pairwise.py: the Gram-form pair-wise similarity loss against the naive N x N form in float64.

Tolerances. The Gram form computes the loss as a difference of three terms (||G_ss||^2 - 2 ||G_st||^2 +
||G_tt||^2) / N^2, each of size ~ mean(A^2), while the loss itself can be far smaller (A_s ~ A_t). Its error is
therefore bounded in absolute terms by the size of those terms, not by the loss:

    |L - L64| <= 16 * eps_fp32 * S + 1e-5 * L64,   S = (||G_ss||^2 + 2 ||G_st||^2 + ||G_tt||^2) / (B N^2)

(the largest error/(eps_fp32 * S) measured at N = 2048, C_s = 128, C_t = 512 was 4.5, bf16 inputs; 0.4 fp32).
The gradient G_ss F_s - G_st F_t likewise, per element:

    |g - g64| <= 16 * eps_fp32 * scale_g + eps_dtype * (|g64| + tiny_dtype),
    scale_g = 4 |grad_out| / (B N^2) * max (|G_ss| |F_s| + |G_st| |F_t|) / ||x||   (the magnitude of the two terms)

the second part being the rounding of the gradient to the input's dtype (bf16/fp16), including fp16's
subnormal spacing eps * tiny = 6e-8 (this loss's gradients are ~4 / (B N^2) small: often subnormal in fp16). L64 and g64 are the
naive N x N form in float64 on the same (already rounded) inputs.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
import kernels.pairwise as pairwise
from kernel_testing import DEVICE, GO, LAYOUT_PAIRS, force_backend, laid_out, layout_copies, randn
from kernel_testing import both_kernels  # noqa: F401  (the `fused` fixture: Triton and C++ kernels)
from kernels import pairwise_similarity_loss
from kernels.pairwise import pairwise_similarity_gram, pairwise_similarity_reference

EPS32 = torch.finfo(torch.float32).eps
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, C_s, C_t, h, w): student and teacher widths differ; N = h*w odd, prime, 1; batch 1
SHAPES = [(2, 19, 21, 5, 7), (1, 11, 150, 9, 13), (1, 171, 19, 3, 5), (2, 21, 21, 4, 4), (3, 7, 5, 1, 1),
          (1, 6, 9, 1, 17)]


@pytest.fixture(params=["gram", "triton", "triton-small", "cuda"])
def path(request, monkeypatch):
    """The custom op's torch Gram path (CPU tensors under SEGKD_KERNELS=auto), its Triton path (interpreted on the
    CPU, buffers poisoned), the Triton path with the smallest tiles, so small tensors still go through several
    pixel and channel blocks of every loop, and the C++ kernels (SEGKD_KERNELS=cuda: the CPU twins here)."""
    if request.param == "gram":
        monkeypatch.setenv("SEGKD_KERNELS", "auto")
        if DEVICE == "cuda":
            pytest.skip("CUDA tensors take the Triton path under auto")
    else:
        force_backend("cuda" if request.param == "cuda" else "triton", monkeypatch)
        if request.param == "triton-small":
            monkeypatch.setattr(pairwise, "GRAM_BLOCKS", (16, 16, 16))
            monkeypatch.setattr(pairwise, "APPLY_BLOCKS", (16, 16, 16))
    return request.param


def naive64(s, t, go=GO, grad_t=False):
    """The N x N form in float64 with autograd: (loss, ds, dt or None) for upstream gradient go."""
    s64 = s.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_(grad_t)
    loss = pairwise_similarity_reference(s64, t64)
    fs, ft = F.normalize(s64.flatten(2), dim=1), F.normalize(t64.flatten(2), dim=1)
    loss = (fs.transpose(1, 2) @ fs - ft.transpose(1, 2) @ ft).square().mean()  # the reference, kept in float64
    (loss * go).backward()
    return loss.detach(), s64.grad, t64.grad


def bounds(x, y, go):
    """(S, scale_g of x, scale_g of y) of the module docstring, in float64."""
    fx, fy = F.normalize(x.double().flatten(2), dim=1), F.normalize(y.double().flatten(2), dim=1)
    b, n = fx.shape[0], fx.shape[-1]
    gxx, gxy, gyy = fx @ fx.transpose(1, 2), fx @ fy.transpose(1, 2), fy @ fy.transpose(1, 2)
    sq = lambda g: g.square().sum()
    big = (sq(gxx) + 2 * sq(gxy) + sq(gyy)) / (b * n * n)
    nx = x.double().flatten(2).norm(dim=1, keepdim=True).clamp_min(1e-12)
    ny = y.double().flatten(2).norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = 4 * abs(go) / (b * n * n)
    gx = k * ((gxx.abs() @ fx.abs() + gxy.abs() @ fy.abs()) / nx).max()
    gy = k * ((gyy.abs() @ fy.abs() + gxy.transpose(1, 2).abs() @ fx.abs()) / ny).max()
    return big.item(), gx.item(), gy.item()


def check(s, t, go=GO, grad_t=False):
    """Our loss and gradients against the float64 naive form, within the bounds of the module docstring."""
    sg = s.detach().clone().requires_grad_()
    tg = t.detach().clone().requires_grad_(grad_t)
    loss = pairwise_similarity_loss(sg, tg)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    (loss * go).backward()
    want, ds, dt = naive64(s, t, go, grad_t)
    big, gs_scale, gt_scale = bounds(s, t, go)
    err = abs(loss.item() - want.item())
    tol = 16 * EPS32 * big + 1e-5 * abs(want.item())
    assert err <= tol, f"loss {loss.item():.9g} vs {want.item():.9g}: error {err:.3g} > {tol:.3g}"
    grads = [(sg.grad, ds, gs_scale, s)] + ([(tg.grad, dt, gt_scale, t)] if grad_t else [])
    for got, ref, scale, x in grads:
        assert got is not None and got.dtype == x.dtype and got.shape == x.shape
        assert torch.isfinite(got).all()
        low, tiny = (0.0, 0.0) if x.dtype == torch.float32 else (torch.finfo(x.dtype).eps, torch.finfo(x.dtype).tiny)
        excess = (got.double() - ref).abs() - (16 * EPS32 * scale + low * (ref.abs() + tiny))
        assert excess.max().item() <= 0, f"gradient off by {excess.max().item():.3g} beyond tolerance"
    if not grad_t:
        assert tg.grad is None
    return loss


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_naive_float64(path, shape, dtype):
    b, cs, ct, h, w = shape
    check(randn(b, cs, h, w, dtype=dtype, scale=3), randn(b, ct, h, w, dtype=dtype, scale=3))


@pytest.mark.parametrize("go", [1.0, -2.5])
def test_teacher_gradient_and_grad_output(path, go):
    check(randn(2, 19, 5, 7), randn(2, 21, 5, 7), go=go, grad_t=True)


def realistic(kind, dtype, b=1, cs=128, ct=512, h=32, w=64, seed=0):
    """Post-ReLU-like features at N = 2048. kind: 'random' (independent), 'near' (the teacher is an isometry of the
    student plus 1% noise: A_t ~ A_s, the loss a 1e-5 fraction of its terms), 'same' (exact isometry: A_t = A_s)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, cs, h, w, generator=g).relu() + 0.1
    if kind == "random":
        t = torch.randn(b, ct, h, w, generator=g).relu()
    else:
        q, _ = torch.linalg.qr(torch.randn(ct, cs, generator=g, dtype=torch.float64))  # orthonormal columns
        t = torch.einsum("tc,bchw->bthw", q, s.double()).float()
        if kind == "near":
            t = t + 1e-2 * torch.randn(b, ct, h, w, generator=g)
    return s.to(DEVICE, dtype), t.to(DEVICE, dtype)


REALISTIC = [(kind, dtype) for kind in ("random", "near", "same") for dtype in (torch.float32, torch.bfloat16)]
# Interpreted, the Triton path takes ~30 s at N = 2048: the default run keeps the hardest case (bf16, A_s ~ A_t)
SLOW_TRITON = [pytest.param(kind, dtype, marks=() if (kind, dtype) == ("near", torch.bfloat16) else pytest.mark.slow)
               for kind, dtype in REALISTIC]


def check_realistic(kind, dtype):
    s, t = realistic(kind, dtype)
    loss = check(s, t, grad_t=True)
    if kind != "random":  # the terms are ~0.7 each; the loss is orders of magnitude below them
        assert loss.item() < 1e-4


@pytest.mark.parametrize("kind, dtype", REALISTIC, ids=str)
def test_realistic_size_and_cancellation(kind, dtype):
    """N = 2048, C_s = 128, C_t = 512 on the custom op's torch Gram path (CPU tensors) or Triton (CUDA)."""
    check_realistic(kind, dtype)


@pytest.mark.parametrize("kind, dtype", SLOW_TRITON, ids=str)
def test_realistic_size_and_cancellation_triton(fused, kind, dtype):
    check_realistic(kind, dtype)


def test_by_hand(path):
    # 2 pixels. Student (C=2): (1, 0) and (0, 3) -> orthogonal, A_s = I. Teacher (C=1): 1 and 2 -> both +1 after
    # normalisation, A_t = all ones. (A_s - A_t)^2 = [[0, 1], [1, 0]]: mean over B*N*N = 4 entries is 1/2.
    s = torch.tensor([[1.0, 0.0], [0.0, 3.0]]).reshape(1, 2, 1, 2)
    t = torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 2)
    assert pairwise_similarity_loss(s, t).item() == pytest.approx(0.5, rel=1e-6)
    assert pairwise_similarity_reference(s, t).item() == pytest.approx(0.5, rel=1e-6)
    # scaling any pixel's feature changes nothing (per-pixel normalisation)
    assert pairwise_similarity_loss(s * torch.tensor([5.0, 0.1]), t).item() == pytest.approx(0.5, rel=1e-6)


def test_zero_pixel_is_finite_and_matches_autograd(path):
    # F.normalize clamps a zero norm at 1e-12: the pixel's F is 0 and its gradient is dL/dF / 1e-12, huge but
    # finite, exactly what autograd gives through F.normalize (as CIRKD runs it).
    s, t = randn(2, 6, 4, 5), randn(2, 9, 4, 5)
    s[0, :, 1, 2] = 0
    check(s, t)


def test_forward_only_and_no_grad(path):
    s, t = randn(1, 19, 5, 7), randn(1, 21, 5, 7)
    with torch.no_grad():
        loss = pairwise_similarity_loss(s.requires_grad_(), t)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(naive64(s, t)[0].item(), rel=1e-5)


def test_torch_mode_takes_the_autograd_gram_form(monkeypatch):
    s, t = randn(2, 11, 6, 5), randn(2, 13, 6, 5)
    monkeypatch.setenv("SEGKD_KERNELS", "torch")
    check(s, t, grad_t=True)
    sg = s.clone().requires_grad_()
    pairwise_similarity_gram(sg, t).backward()
    _, ds, _ = naive64(s, t, go=1.0)
    torch.testing.assert_close(sg.grad.double(), ds, rtol=1e-4, atol=1e-9)


def test_equal_similarities_give_zero(path):
    s = randn(2, 8, 5, 6)
    t = torch.cat([s, torch.zeros_like(s)], dim=1)  # other channel count, the same per-pixel cosines
    assert abs(pairwise_similarity_loss(s, t).item()) < 1e-6


class LargeTensors(TorchDispatchMode):
    """Records the shapes of every tensor of at least `limit` elements that an op returns while active."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.shapes = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(o) and o.numel() >= self.limit:
                self.shapes.append((str(func), tuple(o.shape)))
        return out


@pytest.mark.parametrize("mode", ["auto", "torch", "triton", "cuda"])
def test_never_allocates_an_n_by_n_tensor(monkeypatch, mode):
    if mode in ("triton", "cuda"):
        force_backend(mode, monkeypatch)
    else:
        monkeypatch.setenv("SEGKD_KERNELS", mode)
    b, cs, ct, h, w = 1, 6, 10, 12, 12  # N*N = 20736 elements; the largest legitimate tensor is B*C_t*N = 1440
    s, t = randn(b, cs, h, w).requires_grad_(), randn(b, ct, h, w).requires_grad_()
    n = h * w
    with LargeTensors(n * n // 4) as seen:
        pairwise_similarity_loss(s, t).backward()
    assert not seen.shapes, seen.shapes
    assert s.grad is not None and t.grad is not None
    with LargeTensors(n * n) as seen:  # the mode does see the naive form's matrices
        pairwise_similarity_reference(s, t)
    assert seen.shapes


def test_compiles_through_the_custom_op(path):
    s, t = randn(2, 7, 4, 5), randn(2, 9, 4, 5)
    fn = torch.compile(pairwise_similarity_loss, backend="aot_eager", fullgraph=True)
    sg = s.clone().requires_grad_()
    loss = fn(sg, t)
    loss.backward()
    want, ds, _ = naive64(s, t, go=1.0)
    big, gs_scale, _ = bounds(s, t, 1.0)  # the module docstring's bounds, as in check()
    assert abs(loss.item() - want.item()) <= 16 * EPS32 * big + 1e-5 * abs(want.item())
    torch.testing.assert_close(sg.grad.double(), ds, rtol=0, atol=16 * EPS32 * gs_scale)


@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids=str)
def test_layouts_are_read_in_place(fused, layouts):
    """Channels-last features (the trainer's) and mixed layouts: no copy, the gradient in the input's layout."""
    s = laid_out(randn(2, 19, 5, 7, scale=3), layouts[0])
    t = laid_out(randn(2, 21, 5, 7, scale=3), layouts[1])
    with layout_copies() as copies:
        check(s, t, grad_t=True)
    assert not copies, copies


def test_views_without_a_pixel_stride(fused):
    """A cropped map and a dense transposed one: each copied once by strided_bchw, then correct."""
    s = randn(2, 11, 6, 9, scale=3)[..., 1:8]  # cropped: H and W strides do not merge, copied once
    t = randn(2, 13, 7, 6, scale=3).transpose(2, 3)  # dense, but H and W do not merge either
    check(s, t, grad_t=True)


@pytest.mark.parametrize("grad_t", [False, True])
def test_a_channel_slice_is_read_and_written_through_its_own_strides(path, grad_t):
    """x[:, :k] of a larger map: non-dense, yet its H and W merge, so it is read in place (not copied); its
    gradient buffer is a fresh tensor with other strides, and must be written through those."""
    big_s, big_t = randn(2, 12, 4, 5, scale=3).requires_grad_(), randn(2, 9, 4, 5, scale=3).requires_grad_(grad_t)
    loss = pairwise_similarity_loss(big_s[:, :6], big_t[:, 2:7])
    (loss * GO).backward()
    want, ds, dt = naive64(big_s[:, :6].detach(), big_t[:, 2:7].detach(), GO, grad_t)
    big, gs_scale, gt_scale = bounds(big_s[:, :6].detach(), big_t[:, 2:7].detach(), GO)
    assert abs(loss.item() - want.item()) <= 16 * EPS32 * big + 1e-5 * abs(want.item())
    torch.testing.assert_close(big_s.grad[:, :6].double(), ds, rtol=0, atol=16 * EPS32 * gs_scale)
    assert torch.count_nonzero(big_s.grad[:, 6:]) == 0
    if grad_t:
        torch.testing.assert_close(big_t.grad[:, 2:7].double(), dt, rtol=0, atol=16 * EPS32 * gt_scale)
        assert torch.count_nonzero(big_t.grad[:, :2]) == 0 and torch.count_nonzero(big_t.grad[:, 7:]) == 0


def test_triton_and_gram_paths_agree_and_are_deterministic(fused, monkeypatch):
    s, t = realistic("near", torch.float32, cs=24, ct=40, h=9, w=11)
    runs = []
    for _ in range(2):
        sg = s.clone().requires_grad_()
        loss = pairwise_similarity_loss(sg, t)
        loss.backward()
        runs.append((loss.detach(), sg.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])  # bitwise
    monkeypatch.setenv("SEGKD_KERNELS", "torch")
    sg = s.clone().requires_grad_()
    pairwise_similarity_loss(sg, t).backward()
    # both within the docstring's bound of the float64 truth, so within twice it of each other
    torch.testing.assert_close(runs[0][1], sg.grad, rtol=0, atol=32 * EPS32 * bounds(s, t, 1.0)[1])


def test_shape_errors():
    with pytest.raises(ValueError, match="same B, h, w"):
        pairwise_similarity_loss(randn(2, 3, 4, 5), randn(2, 3, 4, 6))
    with pytest.raises(ValueError, match="same B, h, w"):
        pairwise_similarity_loss(randn(2, 3, 4, 5), randn(1, 3, 4, 5))
    with pytest.raises(ValueError):
        pairwise_similarity_loss(randn(3, 4, 5), randn(3, 4, 5))


def test_exported():
    assert kernels.pairwise_similarity_loss is pairwise_similarity_loss
