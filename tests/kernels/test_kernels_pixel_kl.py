"""kernels/pixel_kl.py: the fused op against its torch reference and against float64 numpy formulas."""
import math

import numpy as np
import pytest
import torch

import kernels
from kernel_testing import (DEVICE, DTYPES, GO, LAYOUT_PAIRS, NUMPY_SHAPES, RNG, compare, laid_out, layout_copies,
                            randn, record_grad_outputs, softmax, t64)
from kernel_testing import both_kernels  # noqa: F401  (the `fused` fixture: Triton and C++ kernels)
from kernels import pixel_kl
from kernels.pixel_kl import pixel_kl_reference


# C: the awkward class counts (CamVid 11, Cityscapes 19, VOC 21, ADE20K 150, COCO-Stuff 171) and 300, past the
# one-tile limit (the chunked online-softmax path); H*W never a multiple of a block; batch 1.
SHAPES = [(2, 19, 5, 7), (1, 11, 3, 33), (2, 21, 4, 4), (1, 150, 3, 5), (1, 171, 2, 9), (1, 300, 3, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(fused, shape, dtype):
    b, c, h, w = shape
    s, t = randn(*shape, dtype=dtype, scale=3), randn(*shape, dtype=dtype, scale=3)
    compare(lambda s, t: pixel_kl(s, t, 2.0), lambda s, t: pixel_kl_reference(s, t, 2.0), [s, t])
    valid = torch.rand(b, h, w, device=DEVICE) > 0.3
    compare(lambda s, t: pixel_kl(s, t, 1.0, valid), lambda s, t: pixel_kl_reference(s, t, 1.0, valid), [s, t])


def test_grad_output_one_leaves_forward_gradient(fused):
    s, t = randn(2, 19, 6, 5), randn(2, 19, 6, 5)
    compare(lambda s, t: pixel_kl(s, t, 4.0), lambda s, t: pixel_kl_reference(s, t, 4.0), [s, t], go=1.0)


def test_all_pixels_ignored_gives_zero_not_nan(fused):
    s = randn(2, 19, 4, 5).requires_grad_()
    loss = pixel_kl(s, randn(2, 19, 4, 5), 1.0, torch.zeros(2, 4, 5, dtype=torch.bool, device=DEVICE))
    loss.backward()
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_extreme_logits_finite(fused, dtype):
    # +-1e4: exp overflows without the max shift, and log p reaches -2e4 where p is exactly 0.
    sign = lambda seed: torch.where(randn(2, 19, 3, 7, seed=seed) > 0, 1.0, -1.0)
    s, t = (1e4 * sign(1)).to(dtype), (1e4 * sign(2)).to(dtype)
    (loss,), (grad,) = compare(pixel_kl, pixel_kl_reference, [s, t])
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all() and loss.item() > 1e3


def test_forward_only_writes_no_gradient(fused):
    s, t = randn(1, 19, 5, 7, dtype=torch.bfloat16), randn(1, 19, 5, 7, dtype=torch.bfloat16)
    with torch.no_grad():
        loss = pixel_kl(s.requires_grad_(), t)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, pixel_kl_reference(s.double(), t.double()).float(), rtol=1e-5, atol=1e-6)


def test_second_backward_through_scaled_gradient_raises(fused):
    # backward scales the forward-written gradient in place, so a retained graph must refuse a second pass.
    s = randn(1, 19, 3, 5).requires_grad_()
    loss = pixel_kl(s, randn(1, 19, 3, 5))
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        (2 * loss).backward()


def test_teacher_requiring_grad_takes_the_exact_reference(fused):
    s, t = randn(1, 19, 3, 5), randn(1, 19, 3, 5)
    compare(pixel_kl, pixel_kl_reference, [s, t], grad_idx=(0, 1))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="pixel_kl"):
        pixel_kl(randn(1, 19, 3, 5), randn(1, 11, 3, 5))
    with pytest.raises(ValueError, match="valid"):
        pixel_kl(randn(1, 19, 3, 5), randn(1, 19, 3, 5), valid=torch.ones(1, 3, 5, device=DEVICE))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [11, 19, 21, 150, 171, 1000])
def test_larger_shapes(fused, c, dtype):
    s, t = randn(2, c, 33, 65, dtype=dtype, scale=4), randn(2, c, 33, 65, dtype=dtype, scale=4)
    valid = torch.rand(2, 33, 65, device=DEVICE) > 0.1
    compare(lambda s, t: pixel_kl(s, t, 1.5, valid), lambda s, t: pixel_kl_reference(s, t, 1.5, valid), [s, t])


# ---------------------------------------------------------------- against float64 numpy formulas
def np_pixel_kl(s, t, T, valid=None):
    ps, pt = softmax(s / T, 1), softmax(t / T, 1)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(1)  # [B, H, W]
    if valid is None:
        return T * T * kl.mean()
    return T * T * kl[valid].sum() / max(valid.sum(), 1)


@pytest.mark.parametrize("shape", NUMPY_SHAPES)
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_pixel_kl_random(shape, T):
    r = RNG(sum(shape))
    s, t = r.normal(0, 3, shape), r.normal(0, 3, shape)
    valid = r.random((shape[0],) + shape[2:]) > 0.3
    got = kernels.pixel_kl(t64(s).float(), t64(t).float(), T)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(np_pixel_kl(s, t, T), rel=1e-4, abs=1e-6)
    got_v = kernels.pixel_kl(t64(s).float(), t64(t).float(), T, valid=t64(valid))
    assert got_v.item() == pytest.approx(np_pixel_kl(s, t, T, valid), rel=1e-4, abs=1e-6)


def test_pixel_kl_by_hand():
    # 2 classes, one pixel: p_t = (3/4, 1/4), p_s = (1/2, 1/2)
    s = torch.zeros(1, 2, 1, 1)
    t = torch.tensor([math.log(3.0), 0.0]).reshape(1, 2, 1, 1)
    want = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kernels.pixel_kl(s, t).item() == pytest.approx(want, rel=1e-6)
    # T = 2 scales logits by 1/2 and the result by 4
    p = 1 / (1 + math.exp(-math.log(3.0) / 2))
    want2 = 4 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))
    assert kernels.pixel_kl(s, t, 2.0).item() == pytest.approx(want2, rel=1e-6)


def test_pixel_kl_no_valid_pixel_is_zero():
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    out = kernels.pixel_kl(s, t, 1.0, valid=torch.zeros(2, 3, 3, dtype=torch.bool))
    assert out.item() == 0.0


# ---------------------------------------------------------------- HW not a multiple of 16 (issue 12)
@pytest.mark.parametrize("shape", [(2, 19, 45, 60), (2, 19, 3, 6), (1, 300, 4, 5)], ids=str)  # VEC 4, 2; chunked
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pixel_counts_with_a_vector_hint_match_reference(fused, shape, dtype):
    """HW = 2700 (CamVid's 45x60 features) or 18: the launcher passes HW and the strides / VEC and the kernel
    multiplies them back; with and without a mask, against float64."""
    b, c, h, w = shape
    s, t = randn(*shape, dtype=dtype, scale=3), randn(*shape, dtype=dtype, scale=3)
    compare(lambda s, t: pixel_kl(s, t, 2.0), lambda s, t: pixel_kl_reference(s, t, 2.0), [s, t])
    valid = torch.rand(b, h, w, device=DEVICE) > 0.3
    compare(lambda s, t: pixel_kl(s, t, 1.0, valid, scale=2.0),
            lambda s, t: 2.0 * pixel_kl_reference(s, t, 1.0, valid), [s, t])


def test_vector_hint_rule():
    from kernels._dispatch import pixel_vector_hint
    nchw = lambda c, hw: (c * hw, hw, 1)
    assert pixel_vector_hint(2700, *nchw(19, 2700), *nchw(19, 2700)) == (4, (12825, 675, 1, 12825, 675, 1), 675)
    assert pixel_vector_hint(18, *nchw(19, 18)) == (2, (171, 9, 1), 9)
    assert pixel_vector_hint(8192, *nchw(19, 8192)) == (1, nchw(19, 8192), 8192)  # the JIT's 16 already
    assert pixel_vector_hint(9409, *nchw(19, 9409)) == (1, nchw(19, 9409), 9409)  # odd: nothing to gain
    assert pixel_vector_hint(2700, 19 * 2700, 1, 19, *nchw(19, 2700))[0] == 1  # a channels-last operand: unchanged


# ---------------------------------------------------------------- memory layouts (issue 12)
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids="-".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 19, 5, 7), (1, 300, 3, 3)], ids=str)  # one tile, and the chunked path
def test_layouts_match_reference(fused, shape, dtype, layouts):
    b, c, h, w = shape
    s, t = (laid_out(randn(*shape, dtype=dtype, scale=3), lay) for lay in layouts)
    valid = torch.rand(b, h, w, device=DEVICE) > 0.3
    _, (g,) = compare(lambda s, t: pixel_kl(s, t, 2.0, valid), lambda s, t: pixel_kl_reference(s, t, 2.0, valid),
                      [s, t])
    assert g.stride() == s.stride()  # the gradient comes back in the student's memory format


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_layouts_are_read_in_place(fused, layout):
    s = laid_out(randn(2, 19, 5, 7), layout).requires_grad_()
    t = laid_out(randn(2, 19, 5, 7), layout)
    with layout_copies() as copies:
        (pixel_kl(s, t) * GO).backward()
    assert copies == [] and s.grad.stride() == s.stride()


# ---------------------------------------------------------------- per-image weights (DFSS's weighted KD in one launch)
def np_pixel_kl_weighted(s, t, T, w, valid=None):
    """T^2 * sum_b w_b * mean over image b's valid pixels of KL(p_t || p_s); an image with none contributes 0."""
    ps, pt = softmax(s / T, 1), softmax(t / T, 1)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(1)  # [B, H, W]
    if valid is None:
        valid = np.ones(kl.shape, bool)
    per_image = np.where(valid, kl, 0.0).sum((1, 2)) / np.maximum(valid.sum((1, 2)), 1)
    return T * T * float((w * per_image).sum())


def weights_for(b, seed=0):
    """Fresh positive weights [b] on the test device, not summing to 1, never all equal."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, generator=g) * 2 + 0.1).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(3, 19, 5, 7)], ids=str)
def test_weights_match_reference(fused, shape, dtype):
    b, c, h, w = shape
    s, t = randn(*shape, dtype=dtype, scale=3), randn(*shape, dtype=dtype, scale=3)
    wts = weights_for(b)
    compare(lambda s, t, w: pixel_kl(s, t, 2.0, weights=w), lambda s, t, w: pixel_kl_reference(s, t, 2.0, weights=w),
            [s, t, wts])
    valid = torch.rand(b, h, w, device=DEVICE) > 0.3
    valid[0] = False  # an image without a valid pixel contributes 0 and gets a zero gradient
    (_,), (g,) = compare(lambda s, t, w: pixel_kl(s, t, 1.0, valid, w),
                         lambda s, t, w: pixel_kl_reference(s, t, 1.0, valid, w), [s, t, wts])
    assert torch.equal(g[0], torch.zeros_like(g[0]))


@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids="-".join)
def test_weights_layouts_match_reference(fused, layouts):
    s, t = (laid_out(randn(2, 19, 5, 7, scale=3), lay) for lay in layouts)
    _, (g,) = compare(lambda s, t, w: pixel_kl(s, t, 2.0, weights=w),
                      lambda s, t, w: pixel_kl_reference(s, t, 2.0, weights=w), [s, t, weights_for(2)])
    assert g.stride() == s.stride()


def test_weights_grad_output_one_and_forward_only(fused):
    s, t, w = randn(3, 19, 6, 5), randn(3, 19, 6, 5), weights_for(3)
    compare(lambda s, t, w: pixel_kl(s, t, 4.0, weights=w), lambda s, t, w: pixel_kl_reference(s, t, 4.0, weights=w),
            [s, t, w], go=1.0)
    with torch.no_grad():
        loss = pixel_kl(s.requires_grad_(), t, 4.0, weights=w)
    assert loss.grad_fn is None
    want = pixel_kl_reference(s.double(), t.double(), 4.0, weights=w.double())
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_weights_are_the_sum_of_weighted_single_image_calls(fused):
    """One launch gives what DFSS computed before with one call per image: sum_b w_b * pixel_kl(image b)."""
    s, t, w = randn(4, 19, 5, 7, scale=3), randn(4, 19, 5, 7, scale=3), weights_for(4)
    loop = sum(w[i] * pixel_kl(s[i:i + 1], t[i:i + 1], 2.0) for i in range(4))
    torch.testing.assert_close(pixel_kl(s, t, 2.0, weights=w), loop, rtol=1e-6, atol=0)
    uniform = torch.full((4,), 0.25, device=DEVICE)
    torch.testing.assert_close(pixel_kl(s, t, 2.0, weights=uniform), pixel_kl(s, t, 2.0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("with_valid, with_weights", [(False, False), (True, False), (False, True), (True, True)])
def test_scale_multiplies_loss_and_gradient(fused, with_valid, with_weights):
    """scale = a method's loss weight inside the op: loss and the gradient written by the forward both scaled, against
    the reference times the scale (float64), with and without a valid mask and weights; grad_output != 1."""
    s, t = randn(3, 19, 5, 7, scale=3), randn(3, 19, 5, 7, scale=3)
    valid = (torch.rand(3, 5, 7, device=DEVICE) > 0.3) if with_valid else None
    w = weights_for(3) if with_weights else None
    _, (g,) = compare(lambda s, t: pixel_kl(s, t, 2.0, valid, w, scale=0.3),
                      lambda s, t: 0.3 * pixel_kl_reference(s, t, 2.0, valid, w if w is None else w.to(s.dtype)),
                      [s, t])
    assert torch.isfinite(g).all()


def test_scale_leaves_grad_output_one_unscaled(fused, monkeypatch):
    """With the weight inside the op, a plain backward (grad_output 1) never rescales the gradient."""
    seen = record_grad_outputs(monkeypatch, "pixel_kl")
    s = randn(2, 19, 4, 6, scale=3).requires_grad_()
    t = randn(2, 19, 4, 6, scale=3)
    pixel_kl(s, t, 1.0, scale=10.0).backward()
    s64 = s.detach().double().requires_grad_()
    (10.0 * pixel_kl_reference(s64, t.double())).backward()
    assert seen == [1.0]
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)


def test_weights_requiring_grad_take_the_exact_reference(fused):
    s, t, w = randn(2, 19, 3, 5), randn(2, 19, 3, 5), weights_for(2).requires_grad_()
    loss = pixel_kl(s, t, 2.0, weights=w)
    loss.backward()
    per_image = torch.stack([pixel_kl_reference(s[i:i + 1].double(), t[i:i + 1].double(), 2.0) for i in range(2)])
    torch.testing.assert_close(w.grad, per_image.float(), rtol=1e-5, atol=0)  # dL/dw_b = KL_b


def test_bad_weights_are_named():
    for bad in (torch.ones(2, device=DEVICE), torch.ones(1, 1, device=DEVICE), torch.ones(1, dtype=torch.long)):
        with pytest.raises(ValueError, match="weights"):
            pixel_kl(randn(1, 19, 3, 5), randn(1, 19, 3, 5), weights=bad)


@pytest.mark.parametrize("shape", NUMPY_SHAPES)
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_pixel_kl_weighted_random(shape, T):
    r = RNG(sum(shape) + 1)
    s, t = r.normal(0, 3, shape), r.normal(0, 3, shape)
    w = r.random(shape[0]) + 0.1
    valid = r.random((shape[0],) + shape[2:]) > 0.3
    got = kernels.pixel_kl(t64(s).float(), t64(t).float(), T, weights=t64(w).float())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(np_pixel_kl_weighted(s, t, T, w), rel=1e-4, abs=1e-6)
    got_v = kernels.pixel_kl(t64(s).float(), t64(t).float(), T, valid=t64(valid), weights=t64(w).float())
    assert got_v.item() == pytest.approx(np_pixel_kl_weighted(s, t, T, w, valid), rel=1e-4, abs=1e-6)
