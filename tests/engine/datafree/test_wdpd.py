"""engine/datafree/wdpd.py: WDPD weights (monotone, normalised, uniform from alpha * T) and the curriculum."""
import pytest
import torch

from engine.datafree import wdpd


def test_wdpd_weights_monotone_normalised_and_uniform_at_alpha_t():
    d = torch.tensor([0.3, 1.5, 0.7, 2.0, 0.3, 1.1], dtype=torch.float64)
    w0 = wdpd.reliability(d)
    assert w0.max() == 1 and w0.min() == 0
    torch.testing.assert_close(w0, 1 - (d - 0.3) / 1.7)
    total, alpha = 100, 0.4
    order = torch.argsort(d)
    for t in (0, 10, 25, 39):
        w = wdpd.weights_at(w0, t, total, alpha)
        assert (w[order].diff() <= 1e-12).all(), "weights must not increase with distance"
        nw = wdpd.normalise(w)
        assert nw.sum().item() == pytest.approx(1.0) and (nw >= 0).all()
    spread = [float(wdpd.weights_at(w0, t, total, alpha).std()) for t in (0, 10, 20, 30)]
    assert all(a > b for a, b in zip(spread, spread[1:]))  # moving towards uniform
    for t in (40, 41, 99):
        torch.testing.assert_close(wdpd.weights_at(w0, t, total, alpha), torch.ones_like(w0))
    torch.testing.assert_close(wdpd.weights_at(w0, 0, total, 0.0), torch.ones_like(w0))
    torch.testing.assert_close(wdpd.reliability(torch.full((3,), 2.0)), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(wdpd.normalise(torch.zeros(4)), torch.full((4,), 0.25))
    # threshold curriculum: admitted images grow from start * n to n at alpha * T, in order of distance
    n = [wdpd.admitted(20, t, total, alpha, 0.25, "threshold") for t in range(0, 60, 5)]
    assert n[0] == 5 and n[-1] == 20 and all(a <= b for a, b in zip(n, n[1:])) and n[8] == 20
    assert wdpd.admitted(20, 0, total, alpha, 0.25, "linear") == 20
    with pytest.raises(ValueError, match="--wdpd-schedule 'cosine'"):
        wdpd.check_schedule("cosine", 0.5, 0.25)
