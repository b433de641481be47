"""kernels/: what the divergence ops share: pixel_kl, channel_kl and angular_loss are 0 when student == teacher."""
import torch

import kernels


def test_zero_when_student_equals_teacher():
    x = torch.randn(2, 7, 4, 5)
    assert kernels.pixel_kl(x, x.clone(), 2.0).abs().item() < 1e-6
    assert kernels.channel_kl(x, x.clone()).abs().item() < 1e-6
    for mode in ("layer", "channel", "point"):
        assert kernels.angular_loss(x, x.clone(), mode).abs().item() < 1e-6
