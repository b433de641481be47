"""kernels/channel_kl.py: the fused op against its torch reference and against float64 numpy formulas."""
import importlib
import math

import numpy as np
import pytest
import torch

import kernels
from kernel_testing import (DTYPES, GO, LAYOUT_PAIRS, NUMPY_SHAPES, RNG, compare, laid_out, layout_copies,
                            randn, record_grad_outputs, softmax, t64)
from kernel_testing import both_kernels  # noqa: F401  (the `fused` fixture: Triton and C++ kernels)
from kernels import channel_kl
from kernels.channel_kl import channel_kl_reference


SHAPES = [(2, 19, 5, 7), (1, 11, 9, 13), (2, 21, 4, 4), (1, 150, 3, 5), (1, 171, 2, 9)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(fused, shape, dtype):
    s, t = randn(*shape, dtype=dtype, scale=3), randn(*shape, dtype=dtype, scale=3)
    compare(lambda s, t: channel_kl(s, t, 4.0), lambda s, t: channel_kl_reference(s, t, 4.0), [s, t])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_split_across_programs(fused, row_tiles, dtype):
    # With the small tiling each row of 9*13 logits spans several loop steps and 4 splits.
    s, t = randn(2, 5, 9, 13, dtype=dtype, scale=3), randn(2, 5, 9, 13, dtype=dtype, scale=3)
    compare(lambda s, t: channel_kl(s, t, 2.0), lambda s, t: channel_kl_reference(s, t, 2.0), [s, t])


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("hw", [(64, 128), (65, 127)], ids=["one pass", "split"])
def test_workload_rows_one_pass_and_split(hw, layout, monkeypatch):
    """The workload's 64x128 rows (8192 logits: kernels._dispatch.ROW_CHUNK) go through the one-pass kernel, one
    launch holding each row in registers; a longer row through the two split passes. Both against float64."""
    from kernel_testing import force_backend

    force_backend("triton", monkeypatch)
    mod = importlib.import_module("kernels.channel_kl")
    launched = []
    for name in ("_channel_kl_row_kernel", "_channel_kl_stats_kernel", "_channel_kl_fwd_kernel"):
        kernel = getattr(mod, name)
        monkeypatch.setattr(mod, name, _Spy(kernel, name, launched))
    s, t = (laid_out(randn(1, 3, *hw, dtype=torch.bfloat16, scale=3, seed=i), layout) for i in (1, 2))
    _, (g,) = compare(lambda s, t: channel_kl(s, t, 4.0), lambda s, t: channel_kl_reference(s, t, 4.0), [s, t])
    one_pass = hw[0] * hw[1] <= 8192
    assert launched == (["_channel_kl_row_kernel"] if one_pass else ["_channel_kl_stats_kernel",
                                                                     "_channel_kl_fwd_kernel"])
    assert g.stride() == s.stride()


class _Spy:
    """A Triton kernel stand-in that records its name at each launch."""

    def __init__(self, kernel, name, launched):
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


def test_grad_output_one(fused):
    s, t = randn(2, 19, 6, 5), randn(2, 19, 6, 5)
    compare(lambda s, t: channel_kl(s, t, 1.0), lambda s, t: channel_kl_reference(s, t, 1.0), [s, t], go=1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_extreme_logits_finite(fused, row_tiles, dtype):
    sign = lambda seed: torch.where(randn(2, 5, 6, 7, seed=seed) > 0, 1.0, -1.0)
    s, t = (1e4 * sign(1)).to(dtype), (1e4 * sign(2)).to(dtype)
    (loss,), (grad,) = compare(lambda s, t: channel_kl(s, t, 1.0), lambda s, t: channel_kl_reference(s, t, 1.0),
                               [s, t])
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all() and loss.item() > 1e3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scale_multiplies_loss_and_gradient(fused, row_tiles, dtype):
    """scale = CWD's weight inside the op: loss and gradient scaled (float64 reference times the scale)."""
    s, t = randn(2, 5, 9, 13, dtype=dtype, scale=3), randn(2, 5, 9, 13, dtype=dtype, scale=3)
    compare(lambda s, t: channel_kl(s, t, 4.0, scale=3.0), lambda s, t: 3.0 * channel_kl_reference(s, t, 4.0), [s, t])


def test_scale_leaves_grad_output_one_unscaled(fused, monkeypatch):
    seen = record_grad_outputs(monkeypatch, "channel_kl")
    s, t = randn(2, 19, 4, 6, scale=3).requires_grad_(), randn(2, 19, 4, 6, scale=3)
    channel_kl(s, t, 4.0, scale=3.0).backward()
    s64 = s.detach().double().requires_grad_()
    (3.0 * channel_kl_reference(s64, t.double(), 4.0)).backward()
    assert seen == [1.0]
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)


def test_forward_only(fused):
    s, t = randn(1, 19, 5, 7), randn(1, 19, 5, 7)
    with torch.no_grad():
        loss = channel_kl(s.requires_grad_(), t)
    torch.testing.assert_close(loss, channel_kl_reference(s.double(), t.double()).float(), rtol=1e-5, atol=1e-6)


def test_teacher_requiring_grad_takes_the_exact_reference(fused):
    compare(channel_kl, channel_kl_reference, [randn(1, 19, 3, 5), randn(1, 19, 3, 5)], grad_idx=(0, 1))


# ---------------------------------------------------------------- memory layouts (issue 12)
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids="-".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layouts_match_reference(fused, row_tiles, dtype, layouts):
    s, t = (laid_out(randn(2, 19, 5, 9, dtype=dtype, scale=3), lay) for lay in layouts)
    _, (g,) = compare(lambda s, t: channel_kl(s, t, 4.0), lambda s, t: channel_kl_reference(s, t, 4.0), [s, t])
    assert g.stride() == s.stride()  # the gradient comes back in the student's memory format


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_layouts_are_read_in_place(fused, layout):
    s = laid_out(randn(2, 19, 5, 7), layout).requires_grad_()
    t = laid_out(randn(2, 19, 5, 7), layout)
    with layout_copies() as copies:
        (channel_kl(s, t) * GO).backward()
    assert copies == [] and s.grad.stride() == s.stride()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_larger_shapes(fused, dtype):
    s, t = randn(2, 19, 97, 129, dtype=dtype, scale=3), randn(2, 19, 97, 129, dtype=dtype, scale=3)
    compare(channel_kl, channel_kl_reference, [s, t])


# ---------------------------------------------------------------- against float64 numpy formulas
def np_channel_kl(s, t, T):
    b, c = s.shape[:2]
    qs, qt = softmax(s.reshape(b, c, -1) / T, 2), softmax(t.reshape(b, c, -1) / T, 2)
    return T * T * (qt * (np.log(qt) - np.log(qs))).sum() / (b * c)


@pytest.mark.parametrize("shape", NUMPY_SHAPES)
def test_channel_kl_random(shape):
    r = RNG(7 + sum(shape))
    s, t = r.normal(0, 2, shape), r.normal(0, 2, shape)
    got = kernels.channel_kl(t64(s).float(), t64(t).float(), 4.0)
    assert got.item() == pytest.approx(np_channel_kl(s, t, 4.0), rel=1e-4, abs=1e-7)


def test_channel_kl_by_hand():
    # one channel over 2 positions, T = 1: q_t = (3/4, 1/4), q_s uniform; B*C = 1
    s = torch.zeros(1, 1, 1, 2)
    t = torch.tensor([math.log(3.0), 0.0]).reshape(1, 1, 1, 2)
    want = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kernels.channel_kl(s, t, 1.0).item() == pytest.approx(want, rel=1e-6)
