"""kernels/: what the ops share: the divergences are 0 when student == teacher; maps whose H and W strides do not
merge (a cropped view, a transposed map) get their gradients right."""
import pytest
import torch

import kernels
from kernel_testing import present_mask, randn
from kernels._dispatch import bchw_strides
from kernels.angular import angular_loss_reference
from kernels.channel_kl import channel_kl_reference
from kernels.pixel_kl import pixel_kl_reference
from kernels.prototype import prototype_kl_reference


def test_zero_when_student_equals_teacher():
    x = torch.randn(2, 7, 4, 5)
    assert kernels.pixel_kl(x, x.clone(), 2.0).abs().item() < 1e-6
    assert kernels.channel_kl(x, x.clone()).abs().item() < 1e-6
    for mode in ("layer", "channel", "point"):
        assert kernels.angular_loss(x, x.clone(), mode).abs().item() < 1e-6


def student_teacher_ops():
    """name -> (channels, fused op, float64 reference) of the ops that compare a student map with a teacher map;
    prototype_kl's prototypes and class mask are drawn here, once, for both of its paths."""
    ops = {"pixel_kl": (19, lambda s, t: kernels.pixel_kl(s, t, 2.0), lambda s, t: pixel_kl_reference(s, t, 2.0)),
           "channel_kl": (19, lambda s, t: kernels.channel_kl(s, t, 2.0), lambda s, t: channel_kl_reference(s, t, 2.0))}
    for m in ("layer", "channel", "point"):
        ops[f"angular_{m}"] = (19, lambda s, t, m=m: kernels.angular_loss(s, t, m),
                               lambda s, t, m=m: angular_loss_reference(s, t, m))
    ps, pt, present = randn(2, 19, 24), randn(2, 19, 24), present_mask(2, 19)
    ops["prototype_kl"] = (24, lambda s, t: kernels.prototype_kl(s, t, ps, pt, present, 0.1),
                           lambda s, t: prototype_kl_reference(s, t, ps.double(), pt.double(), present, 0.1))
    return ops


OPS = list(student_teacher_ops())


@pytest.mark.parametrize("op", OPS)
def test_a_cropped_view_is_copied_and_correct(op, fused):
    """A crop along W: H and W strides do not merge, so the launcher copies it (once); the gradient of the
    full tensor is exact, zero outside the crop."""
    c, fused_op, reference = student_teacher_ops()[op]
    s_full = randn(2, c, 5, 9).requires_grad_()
    t = randn(2, c, 5, 9)[..., 1:8]
    assert bchw_strides(s_full[..., :7]) is None
    fused_op(s_full[..., :7], t).backward()
    s_ref = s_full.detach().double().requires_grad_()
    reference(s_ref[..., :7], t.double()).backward()
    torch.testing.assert_close(s_full.grad, s_ref.grad.float(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("op", OPS)
def test_a_transposed_map_gets_its_gradient_right(op, fused):
    """A dense [B, C, H, W] whose H and W strides do not merge (x.transpose(2, 3) of a [B, C, W, H] map): the
    gradient buffer cannot keep its strides, so it is NCHW, and the kernel must write it with NCHW strides."""
    c, fused_op, reference = student_teacher_ops()[op]
    s = randn(2, c, 7, 5).transpose(2, 3).requires_grad_()  # [2, c, 5, 7], strides (35c, 35, 1, 5)
    t = randn(2, c, 5, 7)
    assert bchw_strides(s) is None
    s64 = s.detach().double().requires_grad_()
    fused_op(s, t).backward()
    reference(s64, t.double()).backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
