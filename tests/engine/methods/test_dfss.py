"""engine/methods/dfss.py: the DFSS loss is the weighted mean of the per-image KD."""
import pytest
import torch
import torch.nn.functional as F

import kernels
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
