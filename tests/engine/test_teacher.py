"""engine/teacher.py: the frozen teacher's forward (same outputs, usable as targets) and --teacher-cuda-graph."""
import pytest
import torch

from engine.models import SegOutput, build_model
from engine.teacher import Frozen, TeacherForward
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
        if dtype is None:
            torch.testing.assert_close(o, w, rtol=0, atol=0)
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
