"""engine/methods/dfss.py: the DFSS loss is the weighted mean of the per-image KD."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from engine.datafree import wdpd
from engine.methods import build_method


def test_dfss_loss_is_the_weighted_mean_of_per_image_kd():
    from engine.config import MethodConfig

    torch.manual_seed(0)
    b, k = 4, 5
    s = torch.randn(b, k, 6, 7, dtype=torch.float64)
    t = torch.randn(b, k, 6, 7, dtype=torch.float64)
    out = type("Out", (), {})

    def seg(logits):
        o = out()
        o.logits = logits.float()
        return o

    m = build_method(MethodConfig(method="dfss", temperature=2.0, kd_weight=3.0), {}, {}, k)
    w = torch.tensor([1.0, 0.5, 0.0, 0.25])
    got = m(seg(s), seg(t), {"weight": w})["dfss/kd"]
    p_t, log_p_s = F.softmax(t / 2, 1), F.log_softmax(s / 2, 1)
    per = (p_t * (torch.log(p_t) - log_p_s)).sum(1).mean((1, 2)) * 4  # T^2 * pixel mean, [B]
    assert got.item() == pytest.approx(3.0 * float((w.double() / w.sum() * per).sum()), rel=1e-5)
    uniform = m(seg(s), seg(t), {})["dfss/kd"]
    assert uniform.item() == pytest.approx(3.0 * per.mean().item(), rel=1e-5)
    assert uniform.item() == pytest.approx(3.0 * kernels.pixel_kl(s.float(), t.float(), 2.0).item(), rel=1e-5)


def _old_per_image_loop(s, t, w, temperature, kd_weight):
    """DFSS's KD term as it was computed before pixel_kl took weights: one pixel_kl call per image."""
    per_image = torch.stack([kernels.pixel_kl(s[i:i + 1], t[i:i + 1], temperature) for i in range(s.shape[0])])
    return kd_weight * (wdpd.normalise(w) * per_image).sum()


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_dfss_one_launch_equals_the_old_per_image_loop(path, monkeypatch):
    """Loss and student gradient of the one-launch KD term against the per-image loop, on both kernel paths."""
    import kernels._dispatch as dispatch
    from engine.config import MethodConfig

    if path == "triton" and not (dispatch.HAS_TRITON and (torch.cuda.is_available() or dispatch.INTERPRETED)):
        pytest.skip("no compiled or interpreted triton")
    monkeypatch.setenv("SEGKD_KERNELS", path)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    b, k = 4, 19
    m = build_method(MethodConfig(method="dfss", temperature=2.0, kd_weight=3.0), {}, {}, k)
    out = type("Out", (), {})
    for w in (torch.tensor([1.0, 0.5, 0.0, 0.25]), torch.zeros(4), None):  # weighted, all-zero (uniform), absent
        s0, t = torch.randn(b, k, 6, 7, device=dev) * 3, torch.randn(b, k, 6, 7, device=dev) * 3
        s_new, s_old = s0.clone().requires_grad_(), s0.clone().requires_grad_()
        o_s, o_t = out(), out()
        o_s.logits, o_t.logits = s_new, t
        new = m(o_s, o_t, {} if w is None else {"weight": w})["dfss/kd"]
        old = _old_per_image_loop(s_old, t, torch.ones(b, device=dev) if w is None else w.to(dev), 2.0, 3.0)
        torch.testing.assert_close(new, old, rtol=1e-6, atol=0)
        (0.37 * new).backward()
        (0.37 * old).backward()
        torch.testing.assert_close(s_new.grad, s_old.grad, rtol=1e-5, atol=1e-9)
