"""engine/models/cost.py: parameters and FLOPs against a count made by hand from every layer's output shape."""
import pytest
import torch
import torch.nn as nn

from engine.models import build_model, model_cost


@pytest.mark.parametrize("arch, size", [("pspnet_tiny", (64, 64)), ("deeplabv3_tiny", (40, 72)),
                                        ("pspnet_small", (48, 32))])
def test_flops_are_two_per_multiply_add_of_every_conv_and_linear(arch, size):
    model = build_model(arch, 8).eval()
    macs = []

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs.append(output.numel() * k)
        elif isinstance(module, nn.Linear):
            macs.append(output.numel() * module.in_features)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.randn(1, 3, *size))
    for h in hooks:
        h.remove()
    params, flops = model_cost(arch, 8, size)
    assert params == sum(p.numel() for p in model.parameters())
    assert flops == 2 * sum(macs)
