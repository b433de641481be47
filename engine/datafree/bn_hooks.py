"""The inputs of a teacher's BatchNorm layers, captured by forward hooks, and what data-free methods make of them.

A BN layer in eval mode holds running estimates (mu, sigma^2) of the per-channel mean and variance of its
input over the teacher's training data. How far an input's statistics are from them says how far that input
is from the training distribution, without looking at the teacher's predictions:

- per image (DFSS's Approximate Distribution Sampling): sum over layers l of
      d_l(b) = ||mean_hw(x_l,b) - mu_l||_2 + ||var_hw(x_l,b) - sigma_l^2||_2        (kernels.bn_stat_distance)
  computed inside each layer's forward hook (`bn_distances`), so that only [B] per layer outlives the layer:
  holding every BN input of a segmentation teacher until the forward ends costs tens of GiB (28.7 GiB fp32
  for a ResNet-101 PSPNet at batch 16, 512x1024)
- per batch (DeepInversion's feature prior, Yin et al., CVPR 2020, used by DFAD's optional --bn-weight term):
      R = sum_l c_l (||mean_bhw(x_l) - mu_l||_2 + ||var_bhw(x_l) - sigma_l^2||_2),   c_1 = first-layer weight, else 1
"""
import re
from contextlib import contextmanager

import torch
import torch.nn as nn

import kernels
from kernels._dispatch import use_cpp, use_triton


def bn_layers(model):
    """The BatchNorm2d modules of `model` (SyncBatchNorm included) in registration order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextmanager
def bn_inputs(model):
    """Within the block, every forward of `model` appends (bn module, its input [B, C, H, W]) to the yielded
    list, in execution order; clear the list between forwards. The inputs keep their autograd graph."""
    seen = []
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0]))) for m in bn_layers(model)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def parse_layers(spec):
    """'all' | 'first' | 'last-K' -> a function picking from the execution-ordered list of BN inputs."""
    spec = str(spec).strip()
    if spec == "all":
        return lambda seen: seen
    if spec == "first":
        return lambda seen: seen[:1]
    m = re.fullmatch(r"last-(\d+)", spec)
    if m and int(m.group(1)) > 0:
        k = int(m.group(1))
        return lambda seen: seen[-k:]
    raise ValueError(f"--ads-layers {spec!r}: expected all, first or last-K with K >= 1 (e.g. last-3)")


def layer_distance(x, running_mean, running_var):
    """d_l(b) of the module docstring for one BN input x [B, C, H, W] -> [B] float32, reading x once and never
    making an fp32 copy of a 16-bit x.

    Where the fused kernels run (CUDA tensors, SEGKD_KERNELS=triton, or the C++ kernels under SEGKD_KERNELS=cuda):
    kernels.bn_stat_distance (its fused kernel reads x once, summing in fp32 registers; the Triton launcher makes a
    channels-last x contiguous, a same-dtype copy of the one layer; the C++ kernels read it in place). Elsewhere
    (the CPU, SEGKD_KERNELS=torch) torch.var_mean over H, W (one Welford pass in x's dtype) for fp32/fp64 x.
    torch.var_mean has no dtype argument and returns 16-bit statistics of a 16-bit x, and on CPU a reduction's
    `dtype=` converts the whole input first, so a 16-bit x is upcast one image at a time there: the fp32
    temporary is 1/B of the layer.
    """
    if use_triton(x, op="bn_stat_distance") or use_cpp("bn_stat_distance", x):
        return kernels.bn_stat_distance(x, running_mean, running_var)
    if x.dtype in (torch.float32, torch.float64):
        var, mean = torch.var_mean(x, dim=(2, 3), unbiased=False)                     # [B, C] each
    else:
        rows = [torch.var_mean(xb.float(), dim=(1, 2), unbiased=False) for xb in x]   # B x ([C], [C])
        var, mean = torch.stack([v for v, _ in rows]), torch.stack([m for _, m in rows])
    rm, rv = running_mean.to(mean.dtype), running_var.to(var.dtype)
    return ((mean - rm).norm(dim=1) + (var - rv).norm(dim=1)).float()


@contextmanager
def bn_distances(model):
    """Within the block, every forward of `model` appends each BN layer's per-image distance d_l [B] float32
    (`layer_distance`) to the yielded list, in execution order; clear the list between forwards.

    The distance is computed inside the layer's forward hook and the input is not kept, so a no-grad forward
    frees each BN input as soon as the network is done with it (`bn_inputs` keeps them all until the list is
    cleared). Scoring only: the distances carry no gradient to the inputs under no_grad.
    """
    rows = []

    def hook(mod, args, out):
        rows.append(layer_distance(args[0], mod.running_mean, mod.running_var))

    handles = [m.register_forward_hook(hook) for m in bn_layers(model)]
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()


def batch_prior(seen, first_weight=10.0):
    """DeepInversion's R (see the module docstring): statistics over the whole batch, differentiable in x.

    Plain torch rather than kernels.bn_stat_distance: the kernel is per image and this term needs the gradient
    with respect to the generator's images; a batch has one mean and variance per channel, [C] each.
    """
    total = 0.0
    for i, (mod, x) in enumerate(seen):
        x = x.float()
        mean = x.mean(dim=(0, 2, 3))                                     # [C]
        var = x.var(dim=(0, 2, 3), unbiased=False)                       # [C]
        r = (mean - mod.running_mean).norm() + (var - mod.running_var).norm()
        total = total + (first_weight if i == 0 else 1.0) * r
    return total
