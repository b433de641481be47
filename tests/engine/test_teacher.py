"""engine/teacher.py: the frozen teacher's forward (same outputs, usable as targets) and --teacher-cuda-graph."""
import pytest
import torch

import torch.nn as nn

from engine.models import MODELS, SegOutput, build_model
from engine.teacher import Frozen, TeacherForward, fold_batchnorm, lean_copy
from speed_testing import run, teacher  # noqa: F401  (fixture)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_teacher_forward_matches_the_model_and_its_outputs_can_be_saved_for_backward(dtype):
    torch.manual_seed(0)
    model = build_model("pspnet_tiny", 8)
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        want = Frozen(model)(x)
    out = TeacherForward(Frozen(model), torch.device("cpu"), dtype)(x)
    assert isinstance(out, SegOutput) and out.aux is None and want.aux is None  # eval mode: no auxiliary logits
    for w, o in zip(want[:3], out[:3]):
        assert not o.is_inference() and not o.requires_grad
        if dtype is None:  # folded BatchNorm: the same function, other rounding
            torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
        else:
            assert o.dtype == dtype
            rel = float((o.float() - w).norm() / w.norm())
            assert rel < 0.05, rel
    s = torch.randn_like(out.logits.float(), requires_grad=True)
    torch.nn.functional.mse_loss(s, out.logits.float()).backward()  # would fail on an inference tensor target
    torch.nn.functional.l1_loss(s, out.logits).backward()
    assert s.grad is not None


def test_teacher_cuda_graph_needs_cuda(teacher, tmp_path):
    with pytest.raises(ValueError, match="--teacher-cuda-graph needs CUDA"):
        run(tmp_path, "--method", "kd", "--teacher-ckpt", teacher, "--iters", "1", "--teacher-cuda-graph",
            "--out", str(tmp_path / "r"))


def randomised_bn(model, seed=0):
    """Every BatchNorm given non-trivial running statistics and affine parameters (a fresh model's are 0/1, which
    would hide a fold that forgets the mean, the variance or the shift)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_folded_teacher_equals_the_unfolded_one(name):
    """Every architecture: all its BatchNorms are folded (none left), the outputs equal the unfolded model's in
    fp32 within rounding, and the original model is untouched."""
    torch.manual_seed(0)
    model = randomised_bn(build_model(name, 7))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lean = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in lean.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        want, got = model(x), lean(x)
    for w, o in zip(want[:3], got[:3]):
        scale = w.abs().max().item()
        torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-5 * scale)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fused = lean_copy(model)  # folded, then conv + ReLU and conv + residual + ReLU as kernels.conv_bias_relu
    assert not any(type(m) is nn.ReLU for m in fused.modules())  # every ReLU fused (MobileNetV2's are ReLU6)
    with torch.no_grad():
        got = fused(x)
    for w, o in zip(want[:3], got[:3]):
        torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-5 * w.abs().max().item())


def test_the_step_teacher_runs_its_convolutions_through_the_fused_op(monkeypatch):
    """With a (stand-in) fused backend for CPU tensors, the lean teacher's forward calls it once per fused conv:
    every conv of a ResNet-18 PSPNet but the downsample ones and the classifier, each with its residual where it
    closes a block; the outputs are the model's."""
    from kernels import conv_act

    calls = []

    def backend(x, weight, bias, residual, *args):
        calls.append(residual is not None)
        return conv_act.conv_bias_relu_reference(x, weight, bias, residual, *args)

    monkeypatch.setitem(conv_act.BACKENDS, "cpu", backend)
    monkeypatch.setattr(conv_act, "_verdicts", {})
    torch.manual_seed(0)
    model = randomised_bn(build_model("pspnet_r18", 5))
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        want = model(x)
    out = TeacherForward(Frozen(model), torch.device("cpu"), None)(x)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    blocks = sum(type(m).__name__ == "BasicBlock" for m in model.modules())
    downsample = sum(1 for n, m in model.named_modules() if n.endswith("downsample.0"))
    fused_heads = 5  # the pyramid pooling's four 1x1 convs and the head's 3x3 (the classifier has no ReLU)
    assert len(calls) == 1 + 2 * blocks + fused_heads == convs - downsample - 1  # all but downsample and classifier
    assert sum(calls) == blocks  # conv2 of each block carries its residual
    for w, o in zip(want[:3], out[:3]):
        torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-5 * w.abs().max().item())


def test_a_batchnorm_after_no_convolution_is_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    lean = fold_batchnorm(randomised_bn(model))
    assert isinstance(lean[2], nn.BatchNorm2d) and isinstance(lean[4], nn.Identity)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(lean(x), model(x), rtol=1e-5, atol=1e-6)


def test_the_step_teacher_holds_its_weights_in_the_step_precision():
    model = build_model("pspnet_tiny", 5)
    fwd = TeacherForward(Frozen(model), torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in fwd.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the Frozen model: fp32, unfolded
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_distillation_with_the_lean_teacher_gives_the_same_weights():
    """Three kd steps from the same student: with the step's lean teacher (folded BatchNorm) and with the plain
    unfolded teacher, the student's weights agree within fp32 rounding."""
    from engine.config import OptimConfig
    from engine.methods import MethodConfig, build_method
    from engine.step import Distiller, TrainStep

    def train(lean):
        torch.manual_seed(0)
        teacher = randomised_bn(build_model("pspnet_tiny", 5))
        student = build_model("pspnet_tiny", 5)
        method = build_method(MethodConfig(method="kd"), student.channels, teacher.channels, 5, 255)
        frozen = Frozen(teacher)
        step = TrainStep.build(Distiller(student, method, 255), frozen, torch.device("cpu"),
                               optim=OptimConfig(iters=100))
        if not lean:  # the unfolded teacher itself, as the step ran it before
            step.teacher = lambda images: SegOutput(*frozen(images)[:3])
        g = torch.Generator().manual_seed(1)
        for i in range(3):
            batch = {"image": torch.randn(2, 3, 32, 40, generator=g),
                     "label": torch.randint(0, 5, (2, 32, 40), generator=g)}
            step(batch, i)
        return student.state_dict()

    lean, plain = train(True), train(False)
    for k, v in plain.items():
        if v.is_floating_point():
            torch.testing.assert_close(lean[k], v, rtol=1e-4, atol=1e-6, msg=k)
