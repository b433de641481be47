"""The step's numeric precision: --precision resolved to an autocast dtype, the autocast region, loss scaling.

`auto` resolves from the device, and the resolved choice is printed at the start of a run (step.describe).
"""
import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision, device):
    """--precision -> autocast dtype or None (fp32). auto: bf16 on CUDA (tensor cores, no loss scaling
    needed), fp32 on CPU (CPU autocast to bf16 is slower than fp32 on most x86 cores without AMX). fp16 (for
    GPUs without bf16) runs with a GradScaler; it works on CPU too, which is how the tests check that path."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device, dtype, **kwargs):
    """Autocast to `dtype` on `device`, switched off when dtype is None (fp32): the one place that maps a
    resolved --precision to an autocast region (step, teacher, evaluation, dfad's generator step)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None, **kwargs)


def grad_scaler(dtype, device):
    """A GradScaler for fp16, None otherwise. torch's fused SGD takes the scale and the inf check inside its
    kernel, so even with loss scaling the step makes no host sync."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def precision_name(dtype):
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 + GradScaler"}[dtype]
