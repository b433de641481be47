"""kernels/bn_stat.py: the fused op against its torch reference and against float64 numpy formulas."""
import numpy as np
import pytest
import torch

import kernels
from kernel_testing import DEVICE, DTYPES, RNG, compare, laid_out, randn, t64
from kernel_testing import both_kernels  # noqa: F401  (the `fused` fixture: Triton and C++ kernels)
from kernels import bn_stat_distance
from kernels.bn_stat import bn_stat_distance_reference

SHAPES = [(2, 19, 5, 7), (1, 11, 3, 33), (3, 21, 4, 4), (1, 150, 3, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(fused, shape, dtype):
    b, c = shape[:2]
    x = (randn(*shape) * 2 + randn(1, c, 1, 1)).to(dtype)
    rm, rv = randn(c), randn(c).abs() + 0.5
    compare(bn_stat_distance, bn_stat_distance_reference, [x, rm, rv])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_split_across_programs(fused, row_tiles, dtype):
    x = (randn(2, 5, 9, 13) * 2 + 1).to(dtype)
    compare(bn_stat_distance, bn_stat_distance_reference, [x, randn(5), randn(5).abs()])


def test_large_mean_small_spread(fused, row_tiles):
    # |mean| >> std: a plain E[x^2] - E[x]^2 in fp32 would lose the variance; the shifted sums keep it.
    x = 1000 + 0.01 * randn(2, 8, 9, 11, dtype=torch.float64)
    x = x.float()
    rm, rv = torch.full((8,), 1000.0, device=DEVICE), torch.full((8,), 1e-4, device=DEVICE)
    # Any fp32 sum of values near 1000 carries their rounding (1000 * eps ~ 1.2e-4, four roundings allowed):
    # an error the float64 reference does not make, and torch's fp32 run makes only by luck of the draw. The
    # naive formula would miss by 1000^2 * eps ~ 0.1, three orders of magnitude more than d (~5e-3).
    atol = 4 * 1000 * torch.finfo(torch.float32).eps
    (d,), _ = compare(bn_stat_distance, bn_stat_distance_reference, [x, rm, rv], atol=atol)
    assert torch.isfinite(d).all()


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layouts_match_reference(fused, row_tiles, layout, dtype):
    """Channels-last activations (the trainer's layout): the C++ kernels read them in place, Triton copies."""
    x = laid_out(randn(2, 6, 5, 9, dtype=dtype, scale=2) + 1, layout)
    rm, rv = randn(6) * 0.5, randn(6).abs() + 0.5
    compare(bn_stat_distance, bn_stat_distance_reference, [x, rm, rv])


def test_zero_distance_gives_zero_gradient_not_nan(fused):
    # Constant channels equal to the running mean with zero running variance: both norms are 0.
    rm = randn(5)
    x = rm[None, :, None, None].expand(2, 5, 3, 4).contiguous().requires_grad_()
    d = bn_stat_distance(x, rm, torch.zeros(5, device=DEVICE))
    d.sum().backward()
    assert torch.equal(d.detach(), torch.zeros(2, device=DEVICE))
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_running_stats_requiring_grad_take_the_exact_reference(fused):
    compare(bn_stat_distance, bn_stat_distance_reference, [randn(2, 4, 3, 5), randn(4), randn(4).abs()],
            grad_idx=(0, 1))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_larger_shapes(fused, dtype):
    x = randn(4, 64, 65, 97, dtype=dtype)
    compare(bn_stat_distance, bn_stat_distance_reference, [x, randn(64), randn(64).abs()])


# ---------------------------------------------------------------- against float64 numpy formulas
def test_bn_stat_distance_random_and_by_hand():
    r = RNG(5)
    x = r.normal(1, 2, (3, 4, 5, 6))
    rm, rv = r.normal(0, 1, 4), r.random(4) + 0.5
    got = kernels.bn_stat_distance(t64(x).float(), t64(rm).float(), t64(rv).float())
    mean = x.mean((2, 3))
    var = ((x - mean[..., None, None]) ** 2).mean((2, 3))
    want = np.linalg.norm(mean - rm, axis=1) + np.linalg.norm(var - rv, axis=1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    # by hand: one channel, values 0 and 2 -> mean 1, biased var 1; running stats (0, 0) -> 1 + 1
    x1 = torch.tensor([0.0, 2.0]).reshape(1, 1, 1, 2)
    assert kernels.bn_stat_distance(x1, torch.zeros(1), torch.zeros(1)).item() == pytest.approx(2.0)
