"""engine/optim.py: the SGD implementations of --optim-impl."""
import pytest
import torch

from engine import optim


@pytest.mark.parametrize("impl", ["fused", "foreach", "plain", "auto"])
def test_sgd_implementations_follow_the_update_formula(impl):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ref = [p.detach().double().clone() for p in params]
    buf = [torch.zeros_like(r) for r in ref]
    lr, mom, wd = 0.1, 0.9, 1e-2
    opt, name = optim.build_sgd([{"params": params}], {"lr": lr, "momentum": mom, "weight_decay": wd}, impl,
                                torch.device("cpu"))
    assert name == ("fused" if impl == "auto" else impl)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):  # PyTorch SGD: d = g + wd p; b = mom b + d (b = d at the first step); p -= lr b
            d = g.double() + wd * ref[i]
            buf[i] = d if _ == 0 else mom * buf[i] + d
            ref[i] = ref[i] - lr * buf[i]
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().double(), r, atol=1e-6, rtol=1e-6)


def test_apex_is_optional_and_its_errors_are_clear(monkeypatch):
    groups, hyper, cpu = [{"params": [torch.nn.Parameter(torch.ones(2))]}], {"lr": 0.1}, torch.device("cpu")
    monkeypatch.setattr(optim, "apex_fused_sgd", lambda: None)
    with pytest.raises(ValueError, match="--optim-impl apex: apex is not importable"):
        optim.build_sgd(groups, hyper, "apex", cpu)
    monkeypatch.setattr(optim, "apex_fused_sgd", lambda: torch.optim.SGD)
    with pytest.raises(ValueError, match="--optim-impl apex needs CUDA"):
        optim.build_sgd(groups, hyper, "apex", cpu)
    with pytest.raises(ValueError, match="--optim-impl 'adamw' is not one of"):
        optim.build_sgd(groups, hyper, "adamw", cpu)
