"""kernels/: what the ops share: the divergences are 0 when student == teacher; a transposed map's gradient."""
import pytest
import torch

import kernels
from kernel_testing import randn
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


TRANSPOSED_OPS = {  # name -> (fused op, float64 reference)
    "pixel_kl": (lambda s, t: kernels.pixel_kl(s, t, 2.0), lambda s, t: pixel_kl_reference(s, t, 2.0)),
    "channel_kl": (kernels.channel_kl, channel_kl_reference),
    **{f"angular_{m}": (lambda s, t, m=m: kernels.angular_loss(s, t, m),
                        lambda s, t, m=m: angular_loss_reference(s, t, m)) for m in ("layer", "channel", "point")},
}


@pytest.mark.parametrize("op", list(TRANSPOSED_OPS) + ["prototype_kl"])
def test_a_transposed_map_gets_its_gradient_right(op, fused):
    """A dense [B, C, H, W] whose H and W strides do not merge (x.transpose(2, 3) of a [B, C, W, H] map): the
    gradient buffer cannot keep its strides, so it is NCHW, and the kernel must write it with NCHW strides."""
    s = randn(2, 19, 7, 5).transpose(2, 3).requires_grad_()  # [2, 19, 5, 7], strides (665, 35, 1, 5)
    t = randn(2, 19, 5, 7)
    assert bchw_strides(s) is None
    s64 = s.detach().double().requires_grad_()
    if op == "prototype_kl":
        present = torch.ones(2, 3, dtype=torch.bool, device=s.device)
        a_s, a_t = randn(2, 3, 19), randn(2, 3, 19)
        kernels.prototype_kl(s, t, a_s, a_t, present, 0.5).backward()
        prototype_kl_reference(s64, t.double(), a_s.double(), a_t.double(), present, 0.5).backward()
    else:
        fused_op, reference = TRANSPOSED_OPS[op]
        fused_op(s, t).backward()
        reference(s64, t.double()).backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
