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


def test_step_schedule_cuts_the_run_into_equal_parts():
    # DFAD's --scheduler: StepLR(step 100) over 300 epochs, gamma 0.1 -> x1, x0.1, x0.01 on thirds of the run
    f = [optim.step_factor(it, 300, 3, 0.1) for it in range(300)]
    assert f[0] == f[99] == 1.0 and f[100] == f[199] == pytest.approx(0.1) and f[200] == f[299] == pytest.approx(0.01)
    assert optim.step_factor(10**6, 300, 3, 0.1) == pytest.approx(0.01)  # past the end: the last part's
    assert [optim.step_factor(it, 10, 1, 0.5) for it in (0, 9)] == [1.0, 1.0]  # one part: constant


def test_lr_factor_follows_the_schedule_flag():
    from engine.config import OptimConfig

    poly = OptimConfig(iters=100, poly_power=0.9)
    step = OptimConfig(iters=100, schedule="step", step_parts=4, step_gamma=0.3)
    assert optim.lr_factor(poly, 50) == pytest.approx(0.5 ** 0.9)
    assert optim.lr_factor(step, 50) == pytest.approx(0.3 ** 2)
    assert optim.lr_factor(step, 74) == pytest.approx(0.3 ** 2) and optim.lr_factor(step, 75) == pytest.approx(0.3 ** 3)


def test_head_lr_mult_gives_everything_outside_the_backbone_its_own_rate():
    """APD's / semseg's modules_new: decoder head, classifier, auxiliary head and the method's connectors at
    head_lr_mult x lr, the backbone at lr, each from its own base under the schedule. Every parameter is in
    exactly one group."""
    from engine.config import Config
    from engine.methods import build_method
    from engine.models import build_model
    from engine.step import Distiller, TrainStep

    cfg = Config()
    cfg.optim.lr, cfg.optim.head_lr_mult, cfg.optim.iters = 0.01, 10.0, 100
    student = build_model("pspnet_tiny", 5, aux=True)
    cfg.method.method = "fitnet"  # connectors
    method = build_method(cfg.method, student.channels, build_model("pspnet_small", 5).channels, 5)
    groups = optim.student_groups(student, method.param_groups(), 10.0)
    backbone = {id(p) for p in student.backbone.parameters()}
    head = {id(p) for p in student.parameters()} - backbone
    connectors = {id(p) for p in method.parameters()}
    assert connectors and {id(p) for p in student.aux.parameters()} <= head
    mult = {id(p): g["lr_mult"] for g in groups for p in g["params"]}
    assert len(mult) == sum(len(g["params"]) for g in groups)  # no parameter twice
    assert {mult[i] for i in backbone} == {1.0} and {mult[i] for i in head | connectors} == {10.0}
    assert len(optim.student_groups(student, [], 1.0)) == 1  # without a multiplier: one group, as before

    cfg.method.method = "none"
    step = TrainStep.build(Distiller(student, build_method(cfg.method, student.channels, student.channels, 5)),
                           None, torch.device("cpu"), optim=cfg.optim)
    batch = {"image": torch.randn(2, 3, 32, 32), "label": torch.randint(0, 5, (2, 32, 32))}
    step(batch, 50)
    lr = {id(p): g["lr"] for g in step.optimizer.param_groups for p in g["params"]}
    factor = optim.poly_factor(50, 100, 0.9)
    assert sorted({round(lr[i] / factor, 9) for i in backbone}) == [0.01]
    assert sorted({round(lr[i] / factor, 9) for i in head}) == [0.1]
