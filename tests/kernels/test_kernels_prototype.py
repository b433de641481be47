"""kernels/prototype.py: the fused op against its torch reference and against float64 numpy formulas."""
import importlib

import numpy as np
import pytest
import torch

import kernels
from kernel_testing import (DEVICE, DTYPES, GO, LAYOUT_PAIRS, RNG, compare, laid_out, layout_copies, present_mask,
                            randn, record_grad_outputs, softmax, t64, unit)
from kernels import prototype_ce, prototype_kl, prototype_logits
from kernels.prototype import prototype_ce_reference, prototype_kl_reference, prototype_logits_reference

# (B, D, H, W, K)
SHAPES = [(2, 24, 5, 7, 19), (1, 40, 3, 11, 11), (2, 16, 4, 4, 21), (1, 20, 3, 5, 150), (1, 18, 2, 9, 171)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(fused, shape, dtype):
    b, d, h, w, k = shape
    present = present_mask(b, k)
    inputs = [randn(b, d, h, w, dtype=dtype), randn(b, d, h, w, dtype=dtype), randn(b, k, d), randn(b, k, d)]
    compare(lambda fs, ft, ps, pt: prototype_kl(fs, ft, ps, pt, present, 0.1),
            lambda fs, ft, ps, pt: prototype_kl_reference(fs, ft, ps, pt, present, 0.1), inputs, grad_idx=(0, 2))


def test_no_class_present_and_zero_pixels(fused):
    # Image 1 has no class present (uniform observations, L_ob = 0 there); some pixels are exact zeros
    # (the norm clamps at EPS); one prototype is zero.
    b, d, h, w, k = 2, 24, 4, 5, 19
    present = present_mask(b, k)
    present[1] = False
    fs, ft = randn(b, d, h, w), randn(b, d, h, w)
    fs[0, :, 1, 1] = 0
    ft[0, :, 2, 2] = 0
    ps = randn(b, k, d)
    ps[0, 0] = 0
    (loss,), grads = compare(lambda fs, ft, ps, pt: prototype_kl(fs, ft, ps, pt, present, 0.1),
                             lambda fs, ft, ps, pt: prototype_kl_reference(fs, ft, ps, pt, present, 0.1),
                             [fs, ft, ps, randn(b, k, d)], grad_idx=(0, 2))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("grad_idx", [(0,), (2,)])
def test_gradient_for_one_student_input_only(fused, grad_idx):
    present = present_mask(2, 19)
    compare(lambda fs, ft, ps, pt: prototype_kl(fs, ft, ps, pt, present, 0.1),
            lambda fs, ft, ps, pt: prototype_kl_reference(fs, ft, ps, pt, present, 0.1),
            [randn(2, 24, 3, 5), randn(2, 24, 3, 5), randn(2, 19, 24), randn(2, 19, 24)], grad_idx=grad_idx)


def test_teacher_requiring_grad_takes_the_exact_reference(fused):
    present = present_mask(1, 19)
    compare(lambda fs, ft, ps, pt: prototype_kl(fs, ft, ps, pt, present, 0.1),
            lambda fs, ft, ps, pt: prototype_kl_reference(fs, ft, ps, pt, present, 0.1),
            [randn(1, 24, 3, 5), randn(1, 24, 3, 5), randn(1, 19, 24), randn(1, 19, 24)], grad_idx=(0, 1, 2, 3))


@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
def test_scale_multiplies_loss_and_both_gradients(fused, as_tensor):
    """scale = APD's lambda_kd times its element normalisation, inside the op: L_ob, dL/df_s and dL/dA_s scaled."""
    present = present_mask(2, 19)
    factor = torch.tensor(2.5, device=DEVICE) if as_tensor else 2.5
    compare(lambda fs, ft, ps, pt: prototype_kl(fs, ft, ps, pt, present, 0.1, scale=factor),
            lambda fs, ft, ps, pt: 2.5 * prototype_kl_reference(fs, ft, ps, pt, present, 0.1),
            [randn(2, 24, 3, 5), randn(2, 24, 3, 5), randn(2, 19, 24), randn(2, 19, 24)], grad_idx=(0, 2))


def test_scale_leaves_grad_output_one_unscaled(fused, monkeypatch):
    seen = record_grad_outputs(monkeypatch, "prototype", "scale_grad_")
    present = present_mask(2, 19)
    fs = randn(2, 24, 3, 5).requires_grad_()
    ft, ps, pt = randn(2, 24, 3, 5), randn(2, 19, 24), randn(2, 19, 24)
    prototype_kl(fs, ft, ps, pt, present, 0.1, scale=torch.tensor(3.0, device=DEVICE)).backward()
    fs64 = fs.detach().double().requires_grad_()
    (3.0 * prototype_kl_reference(fs64, ft.double(), ps.double(), pt.double(), present, 0.1)).backward()
    assert seen == [1.0]
    torch.testing.assert_close(fs.grad.double(), fs64.grad, rtol=1e-4, atol=1e-7)


def test_bad_present_mask_is_named():
    with pytest.raises(ValueError, match="present"):
        prototype_kl(randn(1, 8, 3, 3), randn(1, 8, 3, 3), randn(1, 19, 8), randn(1, 19, 8),
                     torch.ones(1, 19, device=DEVICE), 0.1)


# ---------------------------------------------------------------- memory layouts (issue 12)
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids="-".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layouts_match_reference(fused, dtype, layouts):
    b, d, h, w, k = 2, 24, 5, 7, 19
    present = present_mask(b, k)
    fs, ft = (laid_out(randn(b, d, h, w, dtype=dtype), lay) for lay in layouts)
    _, (g, _) = compare(lambda fs, ft, ps, pt: prototype_kl(fs, ft, ps, pt, present, 0.1),
                        lambda fs, ft, ps, pt: prototype_kl_reference(fs, ft, ps, pt, present, 0.1),
                        [fs, ft, randn(b, k, d), randn(b, k, d)], grad_idx=(0, 2))
    assert g.stride() == fs.stride()  # the gradient comes back in the student's memory format


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_layouts_are_read_in_place(fused, layout):
    fs = laid_out(randn(2, 24, 5, 7), layout).requires_grad_()
    ft = laid_out(randn(2, 24, 5, 7), layout)
    with layout_copies() as copies:
        (prototype_kl(fs, ft, randn(2, 19, 24), randn(2, 19, 24), present_mask(2, 19), 0.1) * GO).backward()
    assert fs.shape not in copies and fs.grad.stride() == fs.stride()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [19, 150])
def test_larger_shapes(fused, dtype, k):
    present = present_mask(2, k)
    compare(lambda fs, ft, ps, pt: prototype_kl(fs, ft, ps, pt, present, 0.1),
            lambda fs, ft, ps, pt: prototype_kl_reference(fs, ft, ps, pt, present, 0.1),
            [randn(2, 128, 33, 41, dtype=dtype), randn(2, 128, 33, 41, dtype=dtype), randn(2, k, 128),
             randn(2, k, 128)], grad_idx=(0, 2))


# ---------------------------------------------------------------- against float64 numpy formulas
def test_prototype_observation_kl_matches_formula():
    r = RNG(9)
    b, d, h, w, k, tau = 2, 4, 3, 5, 4, 0.1
    fs, ft = r.normal(0, 1, (b, d, h, w)), r.normal(0, 1, (b, d, h, w))
    a_s, a_t = r.normal(0, 1, (b, k, d)), r.normal(0, 1, (b, k, d))
    present = np.array([[True, False, True, True], [False, True, True, False]])
    got = kernels.prototype_kl(t64(fs).float(), t64(ft).float(), t64(a_s).float(), t64(a_t).float(),
                               t64(present), tau)
    total = 0.0
    for i in range(b):
        idx = np.flatnonzero(present[i])
        for y in range(h):
            for x in range(w):
                def obs(f, a):
                    cos = np.array([unit(f[i, :, y, x]) @ unit(a[i, j]) for j in idx]) / tau
                    return softmax(cos, 0)
                pt, ps = obs(ft, a_t), obs(fs, a_s)
                total += (pt * (np.log(pt) - np.log(ps))).sum()
    assert got.item() == pytest.approx(total / (b * h * w), rel=1e-4)


# ---------------------------------------------------------------- two-stage dL/dA_hat reduction (issue 12)
@pytest.mark.parametrize("programs", [1, 5])  # all 12 pixel blocks in one program; 4 programs of 3 blocks
def test_prototype_gradient_summed_over_several_blocks_per_program(fused, monkeypatch, programs):
    monkeypatch.setattr(importlib.import_module("kernels.prototype"), "GA_PROGRAMS", programs)
    present = present_mask(1, 150)
    compare(lambda fs, ft, ps, pt: prototype_kl(fs, ft, ps, pt, present, 0.1),
            lambda fs, ft, ps, pt: prototype_kl_reference(fs, ft, ps, pt, present, 0.1),
            [randn(1, 20, 12, 15), randn(1, 20, 12, 15), randn(1, 150, 20), randn(1, 150, 20)], grad_idx=(0, 2))


def test_gradients_are_bitwise_reproducible(fused):
    present = present_mask(2, 19)
    inputs = [randn(2, 24, 9, 15), randn(2, 24, 9, 15), randn(2, 19, 24), randn(2, 19, 24)]
    grads = []
    for _ in range(2):
        fs, ps = inputs[0].clone().requires_grad_(), inputs[2].clone().requires_grad_()
        (prototype_kl(fs, inputs[1], ps, inputs[3], present, 0.1) * GO).backward()
        grads.append((fs.grad, ps.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# ---------------------------------------------------------------- prototype_logits: fused, with its backward (issue 12)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_logits_match_reference(fused, shape, dtype):
    """Logits and both gradients (features and unnormalised prototypes) against float64, grad_output random."""
    b, d, h, w, k = shape
    present = present_mask(b, k)
    compare(lambda f, p: prototype_logits(f, p, present, 0.1), lambda f, p: prototype_logits_reference(f, p, present, 0.1),
            [randn(b, d, h, w, dtype=dtype, scale=2.0), randn(b, k, d)], grad_idx=(0, 1))


def test_logits_absent_classes_zero_pixels_and_one_side_gradients(fused):
    b, d, h, w, k = 2, 24, 4, 5, 19
    present = present_mask(b, k)
    present[1] = False
    f, p = randn(b, d, h, w), randn(b, k, d)
    f[0, :, 1, 1] = 0  # the norm clamps at EPS: logits 0 there, finite gradients
    p[0, 0] = 0
    (logits,), grads = compare(lambda f, p: prototype_logits(f, p, present, 0.1),
                               lambda f, p: prototype_logits_reference(f, p, present, 0.1), [f, p], grad_idx=(0, 1))
    assert torch.equal(logits[1], torch.full_like(logits[1], -1e4))  # ABSENT everywhere in image 1
    assert all(torch.isfinite(g).all() for g in grads)
    for idx in [(0,), (1,)]:
        compare(lambda f, p: prototype_logits(f, p, present, 0.1),
                lambda f, p: prototype_logits_reference(f, p, present, 0.1), [f, p], grad_idx=idx)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_layouts_match_reference_and_are_read_in_place(fused, dtype, layout):
    present = present_mask(2, 19)
    f = laid_out(randn(2, 24, 5, 7, dtype=dtype), layout)
    _, (g, _) = compare(lambda f, p: prototype_logits(f, p, present, 0.1),
                        lambda f, p: prototype_logits_reference(f, p, present, 0.1), [f, randn(2, 19, 24)],
                        grad_idx=(0, 1))
    assert g.stride() == f.stride()
    f = f.detach().requires_grad_()
    with layout_copies() as copies:
        (prototype_logits(f, randn(2, 19, 24), present, 0.1) * randn(2, 19, 5, 7)).sum().backward()
    assert f.shape not in copies and f.grad.stride() == f.stride()


@pytest.mark.parametrize("programs", [1, 5])
def test_logits_prototype_gradient_over_several_blocks_per_program(fused, monkeypatch, programs):
    monkeypatch.setattr(importlib.import_module("kernels.prototype"), "GA_PROGRAMS", programs)
    present = present_mask(1, 150)
    compare(lambda f, p: prototype_logits(f, p, present, 0.1), lambda f, p: prototype_logits_reference(f, p, present, 0.1),
            [randn(1, 20, 12, 15), randn(1, 150, 20)], grad_idx=(0, 1))


def test_logits_cross_entropy_gradient_matches_formula(fused):
    """APD's L_t through the fused logits, against the closed form in float64 numpy: for CE over the present
    classes, dL/do = (softmax(o) - onehot) / n_pixels, and do_k/df = (a_hat_k - cos_k f_hat) / (tau ||f||)."""
    r = RNG(11)
    b, d, h, w, k, tau = 1, 6, 3, 4, 5, 0.1
    f, a = r.normal(0, 1, (b, d, h, w)), r.normal(0, 1, (b, k, d))
    present = np.array([[True, True, False, True, True]])
    lab = r.choice(np.flatnonzero(present[0]), (b, h, w))
    ft = t64(f).float().requires_grad_()
    logits = prototype_logits(ft, t64(a).float(), t64(present), tau)
    torch.nn.functional.cross_entropy(logits, t64(lab)).backward()
    want = np.zeros_like(f)
    ah = np.stack([unit(a[0, j]) for j in range(k)])
    for y in range(h):
        for x in range(w):
            v = f[0, :, y, x]
            cos = ah @ unit(v)
            o = np.where(present[0], cos / tau, -1e4)
            p = softmax(o, 0)
            p[lab[0, y, x]] -= 1
            jac = (ah - cos[:, None] * unit(v)[None, :]) / (tau * np.linalg.norm(v))  # [K, D]
            want[0, :, y, x] = (p * present[0]) @ jac / (h * w)
    np.testing.assert_allclose(ft.grad.numpy(), want, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- prototype_ce: APD's L_t fused (issue 12)
def _labels(b, h, w, k, present, seed=0):
    """Labels of present classes, with ignored and out-of-range pixels."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.zeros(b, h, w, dtype=torch.long)
    for i in range(b):
        cls = torch.nonzero(present[i].cpu()).flatten()
        lab[i] = cls[torch.randint(0, len(cls), (h, w), generator=g)]
    lab[torch.rand(b, h, w, generator=g) < 0.2] = 255
    lab[0, 0, 0] = present.shape[1] + 3  # outside [0, K): not a valid pixel
    return lab.to(present.device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ce_matches_reference(fused, shape, dtype):
    b, d, h, w, k = shape
    present = present_mask(b, k)
    present[:, 0] = True
    lab = _labels(b, h, w, k, present)
    compare(lambda f, p: prototype_ce(f, p, present, lab, 0.1), lambda f, p: prototype_ce_reference(f, p, present, lab, 0.1),
            [randn(b, d, h, w, dtype=dtype, scale=2.0), randn(b, k, d)], grad_idx=(0, 1))


def test_ce_equals_cross_entropy_of_the_logits(fused):
    """prototype_ce = F.cross_entropy(prototype_logits(...)) over the valid pixels, in value and both gradients."""
    b, d, h, w, k = 2, 24, 5, 7, 19
    present = present_mask(b, k)
    present[:, 0] = True
    lab = _labels(b, h, w, k, present)
    lab[lab == k + 3] = 255

    def unfused(f, p):
        return torch.nn.functional.cross_entropy(prototype_logits(f, p, present, 0.1), lab, ignore_index=255)
    compare(lambda f, p: prototype_ce(f, p, present, lab, 0.1), unfused, [randn(b, d, h, w), randn(b, k, d)],
            grad_idx=(0, 1))


def test_ce_no_valid_pixel_is_zero_with_zero_gradients(fused):
    present = present_mask(1, 19)
    lab = torch.full((1, 3, 5), 255, dtype=torch.long, device=DEVICE)
    (loss,), (gf, gp) = compare(lambda f, p: prototype_ce(f, p, present, lab, 0.1),
                                lambda f, p: prototype_ce_reference(f, p, present, lab, 0.1),
                                [randn(1, 24, 3, 5), randn(1, 19, 24)], grad_idx=(0, 1))
    assert loss.item() == 0 and not gf.any() and not gp.any()


def test_ce_grad_output_one_leaves_the_gradient_alone(fused, monkeypatch):
    """A scalar loss: the forward writes the gradient, the backward at grad_output 1 does not touch it again."""
    seen = record_grad_outputs(monkeypatch, "prototype", "scale_grad_")
    present = present_mask(2, 19)
    present[:, 0] = True
    f = randn(2, 24, 3, 5).requires_grad_()
    prototype_ce(f, randn(2, 19, 24), present, _labels(2, 3, 5, 19, present), 0.1).backward()
    assert seen == [1.0] and torch.isfinite(f.grad).all()


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_ce_layouts_are_read_in_place(fused, layout):
    present = present_mask(2, 19)
    present[:, 0] = True
    lab = _labels(2, 5, 7, 19, present)
    f = laid_out(randn(2, 24, 5, 7, dtype=torch.bfloat16), layout)
    _, (g, _) = compare(lambda f, p: prototype_ce(f, p, present, lab, 0.1),
                        lambda f, p: prototype_ce_reference(f, p, present, lab, 0.1), [f, randn(2, 19, 24)],
                        grad_idx=(0, 1))
    assert g.stride() == f.stride()
    f = f.detach().requires_grad_()
    with layout_copies() as copies:
        prototype_ce(f, randn(2, 19, 24), present, lab, 0.1).backward()
    assert f.shape not in copies


def test_ce_bad_labels_are_named():
    with pytest.raises(ValueError, match="labels"):
        prototype_ce(randn(1, 8, 3, 3), randn(1, 19, 8), present_mask(1, 19), torch.zeros(1, 4, 4, dtype=torch.long),
                     0.1)
