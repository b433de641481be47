"""Path selection (SEGKD_KERNELS, CPU vs CUDA, triton missing) and torch.compile tracing of the custom ops."""
import importlib
import os
import subprocess
import sys

import pytest
import torch

from kernel_testing import DEVICE, randn
from kernels import angular_loss, bn_stat_distance, channel_kl, masked_avg_pool, pixel_kl, prototype_kl

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _refuse(*args, **kwargs):
    raise AssertionError("the Triton launcher ran on a path that should use the torch reference")


@pytest.mark.parametrize("mode", [None, "torch"])
def test_cpu_tensors_use_the_reference_unless_forced(monkeypatch, mode):
    if mode is None:
        monkeypatch.delenv("SEGKD_KERNELS", raising=False)
    else:
        monkeypatch.setenv("SEGKD_KERNELS", mode)
    if mode is None and DEVICE == "cuda":
        pytest.skip("auto picks Triton for the CUDA tensors of this machine")
    mod = importlib.import_module("kernels.pixel_kl")
    monkeypatch.setattr(mod, "pixel_kl_forward", _refuse)
    s = randn(1, 19, 3, 5).requires_grad_()
    pixel_kl(s, randn(1, 19, 3, 5)).backward()
    assert s.grad is not None


def test_unknown_mode_is_named(monkeypatch):
    monkeypatch.setenv("SEGKD_KERNELS", "cudnn")
    with pytest.raises(ValueError, match="SEGKD_KERNELS='cudnn'"):
        pixel_kl(randn(1, 19, 3, 5), randn(1, 19, 3, 5))


def _python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SEGKD_KERNELS")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=120)


def test_import_without_triton_falls_back_to_the_reference():
    code = (
        "import sys, os, torch; sys.modules['triton'] = None\n"  # `import triton` now raises ImportError
        "import kernels, kernels._dispatch as d\n"
        "assert not d.HAS_TRITON\n"
        "from kernels.pixel_kl import pixel_kl_reference\n"
        "s, t = torch.randn(1, 19, 3, 5), torch.randn(1, 19, 3, 5)\n"
        "assert torch.equal(kernels.pixel_kl(s, t), pixel_kl_reference(s, t))\n"
        "os.environ['SEGKD_KERNELS'] = 'triton'\n"
        "try:\n    kernels.pixel_kl(s, t)\nexcept RuntimeError as e:\n    print('refused:', e)\n")
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert "refused: SEGKD_KERNELS=triton but triton cannot be imported" in out.stdout


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU tensors are only refused on a machine without a GPU")
def test_forcing_triton_on_cpu_without_interpreter_is_refused():
    code = ("import torch, kernels\n"
            "try:\n    kernels.pixel_kl(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2))\n"
            "except RuntimeError as e:\n    print('refused:', e)\n")
    out = _python(code, SEGKD_KERNELS="triton")
    assert out.returncode == 0, out.stderr
    assert "needs TRITON_INTERPRET=1" in out.stdout


def _ops():
    """(name, loss function of one student tensor, student shape) for every fused public op."""
    t19, f16 = randn(2, 19, 4, 5), randn(2, 16, 4, 5)
    lab = torch.randint(0, 19, (2, 4, 5), device=DEVICE)
    present = torch.rand(2, 19, device=DEVICE) > 0.3
    protos = randn(2, 19, 16)
    return [
        ("pixel_kl", lambda s: pixel_kl(s, t19, 2.0, lab != 3), (2, 19, 4, 5)),
        ("channel_kl", lambda s: channel_kl(s, t19), (2, 19, 4, 5)),
        ("angular_loss", lambda s: sum(angular_loss(s, f16, m) for m in ("layer", "channel", "point")), (2, 16, 4, 5)),
        ("bn_stat_distance", lambda s: bn_stat_distance(s, f16[0, :, 0, 0], f16[0, :, 1, 1].abs()).sum(),
         (2, 16, 4, 5)),
        ("masked_avg_pool", lambda s: masked_avg_pool(s, lab, 19)[0].square().sum(), (2, 16, 4, 5)),
        ("prototype_kl", lambda s: prototype_kl(s, f16, protos, protos.flip(0), present, 0.1), (2, 16, 4, 5)),
    ]


@pytest.mark.parametrize("case", range(6), ids=[op[0] for op in _ops()])
def test_torch_compile_traces_through_the_custom_op(fused, case):
    name, fn, shape = _ops()[case]
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    s = randn(*shape, seed=3)
    eager_s = s.clone().requires_grad_()
    eager = fn(eager_s)
    eager.backward()

    # fullgraph=True fails on any graph break; the recorded graph must call our op, not the reference.
    torch.compile(fn, backend=recording_backend, fullgraph=True)(s.clone())
    called = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any(c.startswith(f"segkd.{name}") for c in called), called

    # aot_eager also traces the backward (the in-place gradient scaling gets functionalised).
    comp_s = s.clone().requires_grad_()
    comp = torch.compile(fn, backend="aot_eager", fullgraph=True)(comp_s)
    comp.backward()
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comp_s.grad, eager_s.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronisation is only observable with a CUDA device")
@pytest.mark.parametrize("case", range(6), ids=[op[0] for op in _ops()])
def test_no_host_sync(fused, case):
    name, fn, shape = _ops()[case]
    s = randn(*shape).requires_grad_()
    fn(s).backward()  # first call: compilation and autotuning may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (0.5 * fn(s)).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
