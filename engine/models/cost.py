"""What a model costs: parameters and FLOPs of one forward pass, counted, not estimated.

FLOPs are counted by torch.utils.flop_counter on the meta device (shapes only: no memory, no compute), for one
image at the given size: 2 per multiply-add of every convolution and matrix product, as FlopCounterMode counts
them; elementwise work (BatchNorm, ReLU, interpolation) is not counted.
"""
import torch
from torch.utils.flop_counter import FlopCounterMode

from .segmentor import build_model


def model_cost(arch, num_classes, size):
    """-> (parameters, FLOPs of one forward pass of one image of `size` = (H, W))."""
    with torch.device("meta"):
        model = build_model(arch, num_classes).eval()
        x = torch.empty(1, 3, *size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()
