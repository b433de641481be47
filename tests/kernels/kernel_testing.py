"""Shared helpers for the kernel tests: devices, dtypes, random inputs, the fused-vs-reference check, and the
float64 numpy building blocks of the checks against independent formulas."""
import contextlib
from unittest import mock

import numpy as np
import pytest
import torch

import kernels._dispatch as dispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GO = 0.37  # grad_output of a scalar loss: deliberately not 1


def force_backend(backend, monkeypatch):
    """SEGKD_KERNELS=backend for the test: "triton" (interpreted on CPU) or "cuda" (the C++ kernels of csrc/: their
    CPU twins on CPU), and every buffer a kernel must fill poisoned."""
    if backend == "triton":
        if not dispatch.HAS_TRITON:
            pytest.skip(f"triton cannot be imported: {dispatch.TRITON_ERROR!r}")
        if DEVICE == "cpu" and not dispatch.INTERPRETED:
            pytest.skip("no GPU and TRITON_INTERPRET was not set before triton was imported")
    else:
        from kernels import _cpp

        if _cpp.ops() is None:  # tests/kernels/test_kernels_cpp.py fails where a compiler is present
            pytest.skip(f"the C++ kernels (csrc/) cannot be built here: {_cpp.ERROR!r}")
    monkeypatch.setenv("SEGKD_KERNELS", backend)
    monkeypatch.setattr(dispatch, "POISON", True)


@pytest.fixture(params=["triton", "cuda"], name="fused")
def both_kernels(request, monkeypatch):
    """The `fused` fixture of the ops with a C++ kernel too (csrc/; import it into the op's test module): every test
    of the fused op runs on both kernels, Triton (interpreted on CPU) and C++ (its CPU twin here, its CUDA kernel on
    a GPU), against the same references and tolerances."""
    force_backend(request.param, monkeypatch)
    return request.param


def record_grad_outputs(monkeypatch, module, name="scale_grad"):
    """Spy on the gradient scaling that kernels.<module>'s backward calls (`name`): -> the list of the grad_output
    values it receives, the real scaling still done. (The package re-exports each op under its module's name, so
    the module is taken from sys.modules.)"""
    import sys

    mod = sys.modules[f"kernels.{module}"]
    seen, real = [], getattr(mod, name)
    monkeypatch.setattr(mod, name, lambda g, go: seen.append(float(go)) or real(g, go))
    return seen


def randn(*shape, dtype=torch.float32, scale=1.0, seed=None):
    """Fresh random values (never zeros) on the test device, rounded to `dtype`."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def present_mask(b, k, seed=0):
    """[b, k] bool on the test device: which classes an image holds (class 0 always, the others at random)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(b, k, generator=g) < 0.6
    p[:, 0] = True
    return p.to(DEVICE)


# Memory layouts a fused op must read in place: the trainer makes every model output channels-last.
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
# (student, teacher) layouts of two-input ops: both, and mixed
LAYOUT_PAIRS = [("nchw", "nchw"), ("cl", "cl"), ("cl", "nchw"), ("nchw", "cl")]


def laid_out(x, layout):
    """x in the memory format named by `layout` ("nchw" or "cl"), asserting that the strides really differ
    between the two (they coincide when C == 1 or H*W == 1)."""
    y = x.contiguous(memory_format=LAYOUTS[layout])
    assert layout == "nchw" or y.stride() != x.contiguous().stride(), f"{tuple(x.shape)}: layouts coincide"
    return y


@contextlib.contextmanager
def layout_copies():
    """Records the shape of every `Tensor.contiguous()` call that copies (returns another storage) while active:
    a launcher that reads its inputs through their strides makes none."""
    copies = []
    original = torch.Tensor.contiguous

    def contiguous(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out.data_ptr() != self.data_ptr():
            copies.append(tuple(self.shape))
        return out

    with mock.patch.object(torch.Tensor, "contiguous", contiguous):
        yield copies


def _run(fn, inputs, grad_idx, upstream):
    xs = [x.detach().clone().requires_grad_(i in grad_idx) if torch.is_tensor(x) and x.is_floating_point() else x
          for i, x in enumerate(inputs)]
    out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    outs[0].backward(upstream(outs[0]).to(outs[0].dtype))
    return [o.detach() for o in outs], [xs[i].grad for i in grad_idx]


def _slack(dtype):
    """Allowance on top of twice torch's error, as a fraction of the largest reference magnitude.

    fp32: a few float32 roundings of the largest value. 16-bit gradients are rounded once by torch but twice
    by us (the forward stores dL/dx, backward scales it by grad_output): one ulp. triton 3.9's interpreter
    truncates fp32 -> bf16 instead of rounding to nearest (compiled kernels round), which can cost one more
    ulp under TRITON_INTERPRET.
    """
    if dtype == torch.float32:
        # Compiled kernels sum in other orders than the interpreter's numpy and feed tl.dot as tf32x3.
        return 2e-6 if dispatch.INTERPRETED else 1e-5
    ulps = 2 if (dtype == torch.bfloat16 and dispatch.INTERPRETED) else 1
    return ulps * torch.finfo(dtype).eps


def _check(name, ours, ref64, same, atol=0.0):
    """max|ours - ref64| <= 2 * max|same - ref64| + slack + atol: at most twice the error that the torch reference
    makes on the same (possibly 16-bit) inputs, plus the rounding allowance of `_slack`, plus `atol` for inputs
    whose own rounding bounds what any fp32 summation can reach (see compare)."""
    assert ours is not None, f"{name}: no gradient"
    assert ours.shape == ref64.shape and ours.dtype == same.dtype, \
        f"{name}: got {ours.dtype} {tuple(ours.shape)}, expected {same.dtype} {tuple(ref64.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values {ours}"
    err = (ours.double() - ref64).abs().max().item() if ours.numel() else 0.0
    err_torch = (same.double() - ref64).abs().max().item() if ours.numel() else 0.0
    scale = ref64.abs().max().item() if ours.numel() else 0.0
    slack = _slack(ours.dtype) * scale + 1e-12 + atol
    assert err <= 2 * err_torch + slack, f"{name}: max error {err:.3g} > 2 * torch's {err_torch:.3g} + {slack:.3g}"


def compare(fused, reference, inputs, grad_idx=(0,), go=GO, seed=0, atol=0.0):
    """Run `fused` (the public op, on the Triton path under the `fused` fixture) and `reference` (the plain
    torch function) on the same inputs; check every output and the gradients of `grad_idx` against the
    reference in float64. The first output is backpropagated with upstream gradient `go` (scalar outputs)
    or a fixed random tensor (other outputs).

    atol: an absolute allowance for ill-conditioned inputs, where torch's own fp32 error is itself a matter of
    luck (it ranged 2.5e-6 to 1.5e-4 over 12 draws of the bn_stat test with |x| ~ 1000), so that twice it is
    no bound."""
    def upstream(out):
        if out.dim() == 0:
            return torch.tensor(go, dtype=torch.float64, device=out.device)
        g = torch.Generator().manual_seed(seed + 1)
        return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)

    ours, ours_g = _run(fused, inputs, grad_idx, upstream)
    ref, ref_g = _run(reference, [x.double() if torch.is_tensor(x) and x.is_floating_point() else x
                                  for x in inputs], grad_idx, upstream)
    same, same_g = _run(reference, inputs, grad_idx, upstream)
    for i, (o, r, s) in enumerate(zip(ours, ref, same)):
        _check(f"output {i}", o, r, s, atol)
    for i, o, r, s in zip(grad_idx, ours_g, ref_g, same_g):
        _check(f"grad of input {i}", o, r, s, atol)
    return ours, ours_g


# ---------------------------------------------------------------- float64 numpy formulas
RNG = np.random.default_rng


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def unit(v):
    n = np.sqrt((v * v).sum())
    return v / max(n, 1e-6)


def t64(a):
    return torch.from_numpy(np.ascontiguousarray(a))


# the shapes of the random checks against the numpy formulas
NUMPY_SHAPES = [(2, 5, 3, 4), (1, 11, 5, 7), (3, 19, 2, 3)]
