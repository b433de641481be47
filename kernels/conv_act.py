"""relu(conv2d(x, W) + b [+ z]): a convolution with its bias, its residual add and its ReLU in one kernel, for
inference (the frozen teacher's lean copy, engine/teacher.py).

After BatchNorm folding, the teacher's non-convolution traffic is the ReLU after each conv (reads and writes the
conv's output once more) and the add + ReLU closing each residual block (reads two maps, writes one, then reads
and writes it again): 27.9 GB of a PSPNet-R101 forward at the workload, as much as its convolutions move
(bench/results/teacher_*.md, a traffic model). Fused, the epilogue runs on the conv's output tile before it is
stored: the output is written once, the residual read once.

    y = relu(conv2d(x, W, stride, padding, dilation, groups) + b + z)       (z, the residual, optional)

There is no Triton kernel: a convolution is cuDNN's (or oneDNN's) to run, and the fusion is its epilogue.

Backends, by the input's device:
  CUDA  cuDNN's fused convolution (torch.cudnn_convolution_relu / torch.cudnn_convolution_add_relu; with cuDNN 8+
        torch runs them as one cuDNN graph: conv -> add z -> add bias -> ReLU).
  CPU   the reference below. oneDNN's post-op fusion (mkldnn._convolution_pointwise) measured no faster on this
        project's CPU: the CPU forward is 86-97% convolution time (bench/results/teacher_*.md), so there is nothing
        for the epilogue to win there.
The first call of each configuration (device, dtype, shapes, strides, memory format, conv arguments, with or
without z) runs the fused backend and the reference on that call's input and compares them (one host sync, once
per configuration, so in the first step: a CUDA graph's warm-up calls make them before its capture). A backend
that raises (cuDNN has no fused engine for every configuration) or disagrees beyond its precision's rounding is
not used for that configuration again, with one warning per process; the reference runs instead.
SEGKD_KERNELS=torch always runs the reference.

No autograd formula: the op is for a frozen network. A call whose inputs need a gradient runs the reference
(differentiable torch ops) instead.
"""
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from kernels._dispatch import mode

# relative L2 error a fused result may have against the reference computed in the same precision: the fused
# epilogue rounds once where the unfused ops round after each of conv, add and ReLU (and TF32 may run both
# convolutions in fp32)
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def conv_bias_relu_reference(x, weight, bias=None, residual=None, stride=1, padding=0, dilation=1, groups=1):
    """relu(conv2d(x, weight, bias) [+ residual]): plain torch, the ground truth and the CPU path."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual if y.requires_grad else y.add_(residual)
    return F.relu(y) if y.requires_grad else y.relu_()


def _cudnn(x, weight, bias, residual, stride, padding, dilation, groups):
    if residual is None:
        return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
    return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, padding, dilation, groups)


# device type -> fused backend, same arguments as the op (tests swap an entry to check the self-check)
BACKENDS = {"cuda": _cudnn}

_verdicts = {}  # configuration -> True (the fused backend agrees) / False (it raised or disagreed: reference)
_warned = set()


def _configuration(x, weight, bias, residual, stride, padding, dilation, groups):
    def layout(t):
        return None if t is None else (tuple(t.shape), t.stride(), t.dtype)
    return (x.device, layout(x), layout(weight), layout(bias), layout(residual), tuple(stride), tuple(padding),
            tuple(dilation), groups)


def _warn_once(backend, why):
    if backend not in _warned:
        _warned.add(backend)
        warnings.warn(f"kernels.conv_bias_relu: the fused {backend} convolution {why}; that configuration runs "
                      "the unfused reference (conv, add, ReLU) instead", RuntimeWarning, stacklevel=3)


def _run(x, weight, bias, residual, stride, padding, dilation, groups):
    args = (x, weight, bias, residual, stride, padding, dilation, groups)
    fused = BACKENDS.get(x.device.type)
    if fused is None or mode() == "torch":
        return conv_bias_relu_reference(*args)
    key = _configuration(*args)
    verdict = _verdicts.get(key)
    if verdict is False:
        return conv_bias_relu_reference(*args)
    try:  # the first call of a configuration is checked against the reference on its input, below
        got = fused(*args)
    except Exception as err:  # no fused engine for this configuration, or no such backend in this build
        _verdicts[key] = False
        _warn_once(x.device.type, f"raised {type(err).__name__}: {str(err).splitlines()[0][:160]}")
        return conv_bias_relu_reference(*args)
    if verdict is True:
        return got
    want = conv_bias_relu_reference(*args)
    # relative error, with a 1e-6 RMS floor for an output the ReLU zeroes (almost) entirely
    err = float((got.float() - want.float()).norm() / (want.float().norm() + 1e-6 * want.numel() ** 0.5))
    _verdicts[key] = ok = (got.shape == want.shape and err <= TOLERANCE.get(x.dtype, 3e-2))
    if not ok:
        _warn_once(x.device.type, f"disagreed with the reference (relative error {err:.1e}, shape "
                                  f"{tuple(got.shape)} vs {tuple(want.shape)})")
    return got if ok else want


@torch.library.custom_op("segkd::conv_bias_relu", mutates_args=())
def _conv_bias_relu_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       residual: Optional[torch.Tensor], stride: list[int], padding: list[int],
                       dilation: list[int], groups: int) -> torch.Tensor:
    return _run(x, weight, bias, residual, stride, padding, dilation, groups)


@_conv_bias_relu_op.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # shape and memory format of the output


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def conv_bias_relu(x, weight, bias=None, residual=None, stride=1, padding=0, dilation=1, groups=1):
    """relu(conv2d(x, weight, bias, stride, padding, dilation, groups) [+ residual]) in one kernel where the device
    has a fused convolution (see the module docstring); x [B, C_in, H, W], weight [C_out, C_in / groups, kh, kw],
    bias [C_out] or None, residual of the output's shape or None. Forward only: inputs that need a gradient run
    the differentiable reference."""
    if padding == "same" or padding == "valid":
        raise ValueError(f"conv_bias_relu: padding={padding!r}: give the padding as numbers")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual))
    if needs_grad or x.device.type not in BACKENDS or mode() == "torch":
        # no fused backend: the plain ops, which torch.compile can see (and fuse) instead of an opaque op
        return conv_bias_relu_reference(x, weight, bias, residual, stride, padding, dilation, groups)
    return _conv_bias_relu_op(x, weight, bias, residual, stride, padding, dilation, groups)
