"""engine/datafree/bn_hooks.py: the batch BN-statistics prior against DeepInversion's formula."""
import pytest
import torch

from engine.datafree.bn_hooks import bn_inputs


def test_batch_bn_prior_matches_deepinversion_formula():
    from engine.datafree.bn_hooks import batch_prior

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 5, 3), torch.nn.BatchNorm2d(5))
    for m in net:
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(3, 3, 9, 11, requires_grad=True)
    with bn_inputs(net) as seen:
        net(x)
    got = batch_prior(seen, first_weight=10.0)
    want, h = 0.0, x.double()
    for i, m in enumerate(net):
        if isinstance(m, torch.nn.BatchNorm2d):
            flat = h.transpose(0, 1).reshape(h.shape[1], -1)
            r = (flat.mean(1) - m.running_mean.double()).norm() + (flat.var(1, unbiased=False)
                                                                    - m.running_var.double()).norm()
            want = want + (10.0 if i == 1 else 1.0) * r
        h = m.double()(h)
        m.float()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
