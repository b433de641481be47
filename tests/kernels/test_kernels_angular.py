"""kernels/angular.py: the fused op against its torch reference and against float64 numpy formulas."""
import numpy as np
import pytest
import torch

import kernels
from kernel_testing import (DTYPES, GO, LAYOUT_PAIRS, NUMPY_SHAPES, RNG, compare, laid_out, layout_copies,
                            randn, t64, unit)
from kernel_testing import both_kernels  # noqa: F401  (the `fused` fixture: Triton and C++ kernels)
from kernels import angular_loss
from kernels.angular import MODES, angular_loss_reference


SHAPES = [(2, 19, 5, 7), (1, 11, 3, 33), (2, 21, 4, 4), (1, 150, 3, 5), (1, 171, 2, 9)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(fused, shape, dtype, mode):
    s, t = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    compare(lambda s, t: angular_loss(s, t, mode), lambda s, t: angular_loss_reference(s, t, mode), [s, t])


@pytest.mark.parametrize("mode", ["layer", "channel"])
def test_split_rows(fused, row_tiles, mode):
    # Rows longer than a chunk: partial sums from several programs per row.
    s, t = randn(2, 6, 9, 11), randn(2, 6, 9, 11)
    compare(lambda s, t: angular_loss(s, t, mode), lambda s, t: angular_loss_reference(s, t, mode), [s, t])


@pytest.mark.parametrize("mode", MODES)
def test_zero_vectors_give_no_nan(fused, mode):
    # A zero channel, a zero pixel and an all-zero sample on the student side, a zero channel on the teacher's.
    s, t = randn(2, 19, 4, 5), randn(2, 19, 4, 5)
    s[0, 3] = 0
    s[0, :, 1, 2] = 0
    s[1] = 0
    t[0, 5] = 0
    (loss,), (grad,) = compare(lambda s, t: angular_loss(s, t, mode), lambda s, t: angular_loss_reference(s, t, mode),
                               [s, t])
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("mode", MODES)
def test_identical_features_give_zero(fused, mode):
    s = randn(2, 19, 4, 5)
    assert abs(angular_loss(s, s.clone(), mode).item()) < 1e-6


def test_teacher_requiring_grad_takes_the_exact_reference(fused):
    compare(lambda s, t: angular_loss(s, t, "channel"), lambda s, t: angular_loss_reference(s, t, "channel"),
            [randn(1, 19, 3, 5), randn(1, 19, 3, 5)], grad_idx=(0, 1))


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="'pixel'"):
        angular_loss(randn(1, 2, 3, 3), randn(1, 2, 3, 3), "pixel")


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_larger_shapes(fused, dtype, mode):
    s, t = randn(2, 96, 33, 65, dtype=dtype), randn(2, 96, 33, 65, dtype=dtype)
    compare(lambda s, t: angular_loss(s, t, mode), lambda s, t: angular_loss_reference(s, t, mode), [s, t])


# ---------------------------------------------------------------- memory layouts (issue 12)
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids="-".join)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layouts_match_reference(fused, row_tiles, dtype, mode, layouts):
    # 37 channels: the point mode's two channel blocks; row_tiles "small": rows split across programs
    s, t = (laid_out(randn(2, 37, 5, 7, dtype=dtype), lay) for lay in layouts)
    _, (g,) = compare(lambda s, t: angular_loss(s, t, mode), lambda s, t: angular_loss_reference(s, t, mode), [s, t])
    assert g.stride() == s.stride()  # the gradient comes back in the student's memory format


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_layouts_are_read_in_place(fused, mode, layout):
    s = laid_out(randn(2, 19, 5, 7), layout).requires_grad_()
    t = laid_out(randn(2, 19, 5, 7), layout)
    with layout_copies() as copies:  # forward and backward
        (angular_loss(s, t, mode) * GO).backward()
    assert copies == [] and s.grad.stride() == s.stride()


# ---------------------------------------------------------------- against float64 numpy formulas
def np_angular(s, t, mode):
    b, c, h, w = s.shape
    per = []
    for i in range(b):
        if mode == "layer":
            per.append(((unit(s[i].ravel()) - unit(t[i].ravel())) ** 2).sum())
        elif mode == "channel":
            per.append(sum(((unit(s[i, k].ravel()) - unit(t[i, k].ravel())) ** 2).sum() for k in range(c)) / c)
        else:
            per.append(sum(((unit(s[i, :, y, x]) - unit(t[i, :, y, x])) ** 2).sum()
                           for y in range(h) for x in range(w)) / (h * w))
    return np.mean(per)


@pytest.mark.parametrize("mode", ["layer", "channel", "point"])
@pytest.mark.parametrize("shape", NUMPY_SHAPES)
def test_angular_random(mode, shape):
    r = RNG(11 + sum(shape))
    s, t = r.normal(0, 1, shape), r.normal(0, 1, shape)
    got = kernels.angular_loss(t64(s).float(), t64(t).float(), mode)
    assert got.item() == pytest.approx(np_angular(s, t, mode), rel=1e-4)


def test_angular_by_hand():
    # one sample, C = 2, one pixel: s = (1, 0), t = (0, 1) -> ||e1 - e2||^2 = 2 in every mode where the vector
    # is the pixel (point, layer); per channel each 1-vector normalises to +-1 or 0.
    s = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)
    t = torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1)
    assert kernels.angular_loss(s, t, "point").item() == pytest.approx(2.0)
    assert kernels.angular_loss(s, t, "layer").item() == pytest.approx(2.0)
    # channel: c0: n(1)=1 vs n(0)=0 -> 1; c1: 0 vs 1 -> 1; mean over C -> 1
    assert kernels.angular_loss(s, t, "channel").item() == pytest.approx(1.0)
    # magnitude is ignored: scaling the student changes nothing
    assert kernels.angular_loss(5 * s + 0, s, "layer").item() == pytest.approx(0.0, abs=1e-7)


def test_angular_zero_norm_no_nan():
    s = torch.zeros(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4)
    for mode in ("layer", "channel", "point"):
        loss = kernels.angular_loss(s, t, mode)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
        s.grad = None
