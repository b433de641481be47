"""Every fused op: its second outputs (saved gradients, statistics, counts) take no gradient, and backward must
not fill a full-size zero tensor for them (134 MB for prototype_kl at the workload)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernel_testing import DEVICE, randn
from kernels import (angular_loss, bn_stat_distance, channel_kl, masked_avg_pool, pixel_kl, prototype_kl,
                     prototype_logits, upsampled_pixel_kl)

ZEROS = {torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default, torch.ops.aten.new_zeros.default,
         torch.ops.aten.full.default, torch.ops.aten.full_like.default}


class ZeroFills(TorchDispatchMode):
    """Records the shapes of the zero-filled tensors made while it is active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in ZEROS and torch.is_tensor(out) and out.numel() > 1:
            self.shapes.append(tuple(out.shape))
        return out


def cases():
    s, t = randn(2, 11, 6, 5, seed=1), randn(2, 11, 6, 5, seed=2)
    labels = torch.randint(0, 4, (2, 6, 5), device=DEVICE)
    f_s = torch.nn.functional.normalize(randn(2, 7, 6, 5, seed=3), dim=1)
    f_t = torch.nn.functional.normalize(randn(2, 7, 6, 5, seed=4), dim=1)
    protos_s, _ = masked_avg_pool(f_s, labels, 4)
    protos_t, counts = masked_avg_pool(f_t, labels, 4)
    present = counts > 0
    mean, var = randn(11, seed=5), randn(11, seed=6).abs() + 0.5
    return {
        "pixel_kl": (lambda x: pixel_kl(x, t), s),
        "channel_kl": (lambda x: channel_kl(x, t, 4.0), s),
        "angular_loss": (lambda x: angular_loss(x, t, "channel"), s),
        "masked_avg_pool": (lambda x: masked_avg_pool(x, labels, 4)[0].square().sum(), f_s),
        "masked_avg_pool normalize": (lambda x: masked_avg_pool(x, labels, 4, normalize=True)[0].square().sum(), s),
        "prototype_logits": (lambda x: prototype_logits(x, protos_t.detach(), present, 0.1).square().sum(), f_t),
        "upsampled_pixel_kl": (lambda x: upsampled_pixel_kl(x, t, (13, 11), 2.0, align_corners=True), s),
        "prototype_kl": (lambda x: prototype_kl(x, f_t, protos_s.detach(), protos_t, present, 0.1), f_s),
        "bn_stat_distance": (lambda x: bn_stat_distance(x, mean, var).sum(), s),
    }


@pytest.mark.parametrize("op", list(cases()))
def test_backward_fills_no_zero_gradient_for_an_unused_output(fused, op):
    fn, x = cases()[op]
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x)
    with ZeroFills() as mode:
        loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert not mode.shapes, f"{op}: backward filled zero tensors of shapes {mode.shapes}"
