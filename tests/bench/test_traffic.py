"""bench/traffic.py: the counts add up over the phases, a fused op's bytes match the hand formula, channels-last
inputs cost no launcher copies, autocast follows CUDA's policy, segkd's step has no host sync while the
reference loop's has, and --small writes its tables."""
import json
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
from bench import traffic, traffic_model
from bench.traffic_model import traffic_model as counting

TINY = traffic.Setting("pspnet_tiny", "pspnet_tiny", (32, 32), 2)
SHAPE = (2, 19, 5, 7)  # H*W = 35: no block size divides it


@pytest.fixture(scope="module")
def kd():
    return traffic.count_segkd("kd", TINY)


@pytest.fixture(scope="module")
def cad():
    return traffic.count_segkd("cad", TINY)


def count_op(fn, make_inputs):
    """Count fn(*inputs), the inputs made uncounted; what fn returns and the inputs' .grad are kept (they outlive
    the region). -> (events, the loss-op rows)."""
    with counting() as (counter, ops):
        counter.recording = False
        inputs = make_inputs()
        counter.recording = True
        out = fn(*inputs)
        kept = [t for t in (out, *(x.grad for x in inputs)) if t is not None]
        count = traffic.Count("op", counter.events, {counter.key(t) for t in kept}, dict(ops.calls), [], "")
    return counter.events, traffic.loss_op_rows(count)


def test_phases_are_positive_and_sum_to_the_step(kd):
    *phases, total = traffic.phase_rows(kd, traffic.BANDWIDTH)
    names = [r["phase"] for r in phases]
    assert names[:2] == ["teacher forward", "student forward"] and names[-2:] == ["student backward", "optimizer"]
    assert {"loss forward: ce", "loss forward: kd/kd", "loss backward: ce", "loss backward: kd/kd"} <= set(names)
    # kd's backward moves only grad_output: pixel_kl's forward wrote the gradient already weighted (scale=kd_weight)
    # and the backward's grad_output is 1, so scale_grad reads that scalar and leaves the gradient alone
    kd_backward = phases[names.index("loss backward: kd/kd")]
    assert kd_backward["launches"] > 0 and (kd_backward["read"], kd_backward["written"]) == (4, 0)
    assert all(r["launches"] > 0 and r["read"] > 0 and r["written"] > 0 and r["minimum"] > 0 for r in phases
               if r is not kd_backward)
    assert total["launches"] == sum(r["launches"] for r in phases) == kd.launches
    assert total["read"] + total["written"] == sum(r["read"] + r["written"] for r in phases) == kd.bytes
    assert 0 < total["minimum"] < kd.bytes
    assert total["predicted_ms"] == pytest.approx(1e3 * kd.bytes / traffic.BANDWIDTH)
    # the teacher runs without autograd: no backward of its own; fused SGD is one launch over all parameters
    assert phases[names.index("optimizer")]["launches"] == 1


def test_pixel_kl_forward_bytes_equal_the_hand_formula():
    b, c, h, w = SHAPE
    n = b * c * h * w * 4  # fp32
    events, (op,) = count_op(lambda s, t: kernels.pixel_kl(s, t), lambda: (torch.randn(SHAPE), torch.randn(SHAPE)))
    (launch,) = [e for e in events if e.kernel == "_pixel_kl_fwd_kernel"]
    assert launch.read == 2 * n + 4  # student and teacher once, |V| (an fp32 scalar); no mask, no gradient
    assert op["op"] == "pixel_kl" and op["backward"] == 0
    assert op["minimum"] == 2 * n + 4  # each input read once, the loss written once
    assert not any("clone" in e.kernel or "copy" in e.kernel for e in events)  # contiguous inputs: no copy


def test_channels_last_inputs_are_read_without_copies():
    def counted(memory_format):
        def inputs():
            s = torch.randn(SHAPE).contiguous(memory_format=memory_format).requires_grad_()  # a leaf
            return s, torch.randn(SHAPE).contiguous(memory_format=memory_format)
        return count_op(lambda s, t: kernels.pixel_kl(s, t).backward(), inputs)

    dense_events, (dense,) = counted(torch.contiguous_format)
    cl_events, (cl,) = counted(torch.channels_last)
    assert cl["minimum"] == dense["minimum"]  # the same inputs, outputs and gradient
    # issue 12: the launcher reads channels-last logits through their strides, so no `.contiguous()` copy
    assert (cl["forward"], cl["backward"]) == (dense["forward"], dense["backward"])
    assert not any("contiguous" in e.kernel or "clone" in e.kernel for e in cl_events + dense_events)
    assert cl["ratio"] == dense["ratio"] == pytest.approx(1, abs=0.01)  # grad_output 1: the gradient is not rescaled


def test_scale_grad_touches_the_gradient_only_when_grad_output_is_not_one(kd, cad):
    def scale(count):
        (e,) = [e for e in count.events if e.kernel == "_scale_grad_kernel"]
        return e

    assert (scale(kd).read, scale(kd).written) == (4, 0)  # kd: grad_output is 1, g is left alone
    assert (scale(cad).read, scale(cad).written) == (4, 0)  # cad's KD term: weight 10 / C passed as pixel_kl's scale
    n = 2 * 19 * 5 * 7 * 4  # the fp32 gradient

    def weighted_outside(s, t):  # a weight multiplied onto the loss: the backward rescales the gradient in place
        (0.5 * kernels.pixel_kl(s, t)).backward()

    events, _ = count_op(weighted_outside, lambda: (torch.randn(SHAPE).requires_grad_(), torch.randn(SHAPE)))
    (e,) = [e for e in events if e.kernel == "_scale_grad_kernel"]
    assert (e.read, e.written) == (n + 4, n)


def test_every_kernel_pointer_has_a_role():
    from triton.runtime.jit import KernelInterface

    found = {k.fn.__name__: traffic_model.kernel_roles(k.fn) for name, mod in list(sys.modules.items())
             if name.startswith("kernels.") for k in vars(mod).values() if isinstance(k, KernelInterface)}
    assert len(found) >= 10
    assert found["_pixel_kl_fwd_kernel"]["g_ptr"] == ("w", "WRITE_GRAD")
    assert found["_pixel_kl_fwd_kernel"]["valid_ptr"] == ("r", "HAS_VALID")
    assert found["_scale_grad_kernel"]["g_ptr"] == ("rw", None)
    assert found["_prototype_kl_fwd_kernel"]["ga_ptr"] == ("rw", "WRITE_GA")
    assert found["_masked_avg_pool_fwd_kernel"]["counts_ptr"] == ("w", None)


def test_autocast_follows_cudas_policy_and_is_restored():
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    with counting():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            xb = x.bfloat16()
            assert F.conv2d(x, w).dtype == torch.bfloat16
            assert F.interpolate(xb, size=(16, 16), mode="bilinear").dtype == torch.float32
            assert F.log_softmax(xb, 1).dtype == torch.float32 and xb.sum().dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the CPU's own policy again
        assert F.interpolate(x.bfloat16(), size=(16, 16), mode="bilinear").dtype == torch.bfloat16


def test_host_syncs_are_found_where_they_are(kd, cad):
    with counting() as (counter, _):
        x = torch.randn(4, 3)
        x.sum().item()
        x[x[:, 0] > 0]  # boolean-mask indexing: a nonzero on the host
    assert len([e for e in counter.events if e.sync]) == 2
    assert kd.syncs == [] and cad.syncs == []  # segkd: none in the step
    ref = traffic.count_reference("kd", TINY)  # CIRKD-style: .item() of ce and kd every step
    assert len(ref.syncs) == 2 and all("cirkd_reference.py" in e.sync for e in ref.syncs)


def test_small_run_writes_its_tables(tmp_path):
    out = traffic.main(["--small", "--methods", "kd,apd", "--out", str(tmp_path)])
    md = (tmp_path / "traffic_small.md").read_text()
    assert "MODEL counted on the CPU" in md.splitlines()[2] and "| apd | prototype_kl |" in md
    doc = json.loads((tmp_path / "traffic_small.json").read_text())
    assert set(doc["methods"]) == {"kd", "apd"}
    apd = doc["methods"]["apd"]
    assert 0 < apd["method_bytes"] < apd["bytes"] and apd["host_syncs"] == []
    assert len(apd["reference"]["host_syncs"]) > len(doc["methods"]["kd"]["reference"]["host_syncs"])  # nonzero
    assert any(v.startswith("apd: ") and "loss terms" in v for v in out["verdicts"])
