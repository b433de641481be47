"""bench/train_throughput.py: its CIRKD-style reference computes segkd's losses, and a --small run writes its table."""
import json
import os
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

import kernels
from engine.config import MethodConfig
from engine.methods import build_method
from engine.methods.base import segmentation_ce

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "bench"))

import cirkd_reference as ref  # noqa: E402


class Out(NamedTuple):  # the SegOutput contract: backbone, decoder, logits
    backbone: torch.Tensor
    decoder: torch.Tensor
    logits: torch.Tensor


K = 11
S_CH = {"backbone": 8, "decoder": 6, "logits": K}
T_CH = {"backbone": 12, "decoder": 10, "logits": K}
SHAPES = [(2, 11, 7, 9), (1, 19, 5, 13)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_cirkd_kd_and_cwd_equal_the_kernels(shape, temperature):
    s = torch.randn(*shape, dtype=torch.float64) * 3
    t = torch.randn(*shape, dtype=torch.float64) * 3
    kd = ref.CriterionKD(temperature)(s, t)
    assert kd.dtype == torch.float64 and kd > 0
    torch.testing.assert_close(kd.float(), kernels.pixel_kl(s, t, temperature), rtol=1e-5, atol=1e-7)
    c = shape[1]
    cwd = ref.CriterionCWD(c, c, temperature)(s, t)
    assert cwd > 0
    torch.testing.assert_close(cwd.float(), kernels.channel_kl(s, t, temperature), rtol=1e-5, atol=1e-7)


def outputs(ch, b=2, h=6, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Out(*(torch.randn(b, ch[k], h, w, generator=g, dtype=torch.float64).relu() if k != "logits" else
                 torch.randn(b, ch[k], h, w, generator=g, dtype=torch.float64) * 2
                 for k in ("backbone", "decoder", "logits")))


def labels(b=2, h=24, w=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, K - 3, (b, h, w), generator=g)  # some classes absent from every image
    lab[:, :3] = 255
    lab[1, 10:] = 4  # image 1: a few classes only
    return lab


@pytest.mark.parametrize("method", ["kd", "cad", "apd", "cwd"])
def test_reference_terms_equal_segkd_terms(method):
    """The same student/teacher outputs and method parameters give the same weighted terms in both loops.

    The reference runs in float64; segkd too, except APD, which computes in fp32 by design (it casts its
    features with .float()): there segkd's fp32 values are held to the float64 reference at fp32 accuracy.
    """
    torch.manual_seed(0)
    mcfg = MethodConfig(method=method)
    seg_dtype = torch.float32 if method == "apd" else torch.float64
    seg = build_method(mcfg, S_CH, T_CH, K).to(seg_dtype)
    crit = ref.build_criteria(method, mcfg, S_CH, T_CH, K).double()
    part = seg.parts[method]
    if method in ("cad", "apd"):
        # segkd's connector / projectors (random init, BN in train mode) copied into the reference's
        crit[method].load_state_dict(part.state_dict())
    s, t, lab = outputs(S_CH), outputs(T_CH, seed=1), labels()
    cast = lambda o: Out(*(v.to(seg_dtype) for v in o))  # noqa: E731
    want = {k.split("/", 1)[1]: v for k, v in seg(cast(s), cast(t), {"label": lab}).items()}
    got = ref.distill_losses(method, crit, mcfg, s, t, lab)
    assert set(got) == set(want)
    tol = dict(rtol=1e-4, atol=1e-5) if method == "apd" else dict(rtol=1e-5, atol=1e-6)
    for k in want:
        assert torch.isfinite(want[k]) and want[k] != 0, k
        torch.testing.assert_close(got[k].float(), want[k].float(), **tol, msg=k)
    # and the task loss: CIRKD's SegCrossEntropyLoss as copied (align_corners=False) is segkd's CE
    torch.testing.assert_close(ref.SegCrossEntropyLoss()(s.logits, lab).float(), segmentation_ce(s.logits, lab))


def test_reference_state_dicts_match_segkd_parts():
    """The copy above only means something if every parameter and buffer found its counterpart."""
    for method, name in (("cad", "cad"), ("apd", "apd")):
        mcfg = MethodConfig(method=method)
        seg = build_method(mcfg, S_CH, T_CH, K).parts[method].state_dict()
        mine = ref.build_criteria(method, mcfg, S_CH, T_CH, K)[name].state_dict()
        assert set(seg) == set(mine) and all(seg[k].shape == mine[k].shape for k in seg), method


def test_reference_loop_trains_and_syncs_every_step():
    """A few steps of the CIRKD-style loop on the built-in data: finite losses read every step, weights move."""
    from engine.config import OptimConfig
    from engine.data import build_dataset
    from engine.models import build_model

    ds = build_dataset("synthetic", "train", train=True, crop=(32, 32))
    torch.manual_seed(0)
    teacher, student = build_model("pspnet_tiny", ds.num_classes), build_model("pspnet_tiny", ds.num_classes)
    before = [p.detach().clone() for p in student.parameters()]
    loop = ref.ReferenceTrainer("apd", teacher, student, ds, batch_size=2, workers=0, device="cpu",
                                mcfg=MethodConfig(method="apd"), ocfg=OptimConfig(), max_iterations=10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: more threads only wait on each other when the host is busy
    try:
        stats = loop.train(warmup=1, steps=2)
    finally:
        torch.set_num_threads(threads)
    assert stats["step_ms"] > 0 and stats["img_s"] > 0
    assert len(loop.log) == 3 and set(loop.log[0]) == {"ce", "kd", "ob", "rec", "teacher_proj"}
    assert all(isinstance(v, float) and v == v for rec in loop.log for v in rec.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_small_run_writes_one_row_per_method(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_throughput.py"), "--small",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mds = list(tmp_path.glob("train_throughput_*_small.md"))
    jsons = list(tmp_path.glob("train_throughput_*_small.json"))
    assert len(mds) == 1 and len(jsons) == 1
    lines = mds[0].read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | segkd images/s"))
    end = next(i for i in range(start, len(lines) + 1) if i == len(lines) or not lines[i].startswith("|"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    assert "ratio segkd/reference" in header and "distillation overhead" in header
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2:end]]
    rows = {c[0]: dict(zip(header, c)) for c in cells}
    assert list(rows) == ["kd", "cad", "apd", "cwd"]
    for m in rows:
        r = rows[m]
        seg, rf, ratio = float(r["segkd images/s"]), float(r["reference images/s"]), float(r["ratio segkd/reference"])
        assert seg > 0 and rf > 0
        assert ratio == pytest.approx(seg / rf, rel=0.02, abs=0.01)
    data = json.loads(jsons[0].read_text())
    assert [r["method"] for r in data["rows"]] == ["kd", "cad", "apd", "cwd"]
    for r in data["rows"]:
        alone = data["student_alone"]["step_ms"]
        assert r["overhead"] == pytest.approx((r["segkd_ms"] - r["teacher_ms"] - alone) / alone)
        assert r["teacher_ms"] > 0 and all(v == v for v in r["ref_last_losses"].values())
    assert "PASS" not in mds[0].read_text() and "FAIL" not in mds[0].read_text()
