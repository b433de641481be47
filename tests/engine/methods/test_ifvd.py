"""`ifvd` against a plain float64 transcription of the reference CriterionIFV (CIRKD losses/ifvd.py), by hand,
its gradient routes, both masked_avg_pool paths, autocast, and end to end through the CLI."""
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import kernels._dispatch as dispatch
from cli_testing import run, teacher  # noqa: F401  (fixture)
from engine.config import MethodConfig
from engine.methods import build_method
from kernels.ifvd import class_centre_similarity

ROOT = Path(__file__).resolve().parents[3]


class Out(NamedTuple):  # the SegOutput contract: backbone, decoder, logits
    backbone: torch.Tensor
    decoder: torch.Tensor
    logits: torch.Tensor


def reference_ifv(feat_s, feat_t, target, num_classes):
    """CriterionIFV's formula in float64, one image and one class at a time: the centre of every pixel starts as
    its own feature and is replaced, class by class, by the class's sum / (count + 1e-6); cosine along C;
    nn.MSELoss() over every pixel."""
    maps = []
    for feat in (feat_s.double(), feat_t.double()):
        size = feat_s.shape[-2:]  # the reference resizes the labels to the student's feature size
        tar = F.interpolate(target[:, None].double(), size=size, mode="nearest")[:, 0]  # nn.Upsample('nearest')
        sims = []
        for b in range(feat.shape[0]):
            centre = feat[b].clone()  # [C, h, w]
            for k in range(num_classes):
                mask = tar[b] == k  # [h, w]
                mean = feat[b][:, mask].sum(1) / (mask.sum() + 1e-6)  # [C]
                centre[:, mask] = mean[:, None]
            sims.append(F.cosine_similarity(feat[b], centre, dim=0))  # [h, w]
        maps.append(torch.stack(sims))
    return ((maps[0] - maps[1]) ** 2).mean()


def labels(b, h, w, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, k - 1, (b, h, w), generator=g)  # class k-1 only where placed below
    lab[torch.rand(b, h, w, generator=g) < 0.2] = 255
    lab[0, : h // 3, : w // 2] = k - 1  # a class present in the first image only
    return lab


def features(b, c, h, w, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(b, c, h, w, generator=g).relu()
    f[0, :, 0, 0] = 0  # an all-zero feature (ReLU can give one): cos is 0 there, on an ignored pixel or not
    f[-1, :, -1, -1] = 0
    return f.requires_grad_(grad)


def method(k, weight=1.0, position=""):
    return build_method(MethodConfig(method="ifvd", ifvd_weight=weight, position=position),
                        {"backbone": 8, "decoder": 6, "logits": k}, {"backbone": 12, "decoder": 10, "logits": k}, k)


# (B, C_s, C_t, h, w, K, label size): batch 1, differing widths, awkward class counts, labels at 8x and at 1x
CASES = [(2, 6, 10, 6, 7, 5, (48, 56)), (1, 11, 19, 5, 9, 19, (40, 72)), (3, 16, 16, 4, 4, 11, (4, 4)),
         (2, 21, 7, 3, 5, 150, (24, 40))]


@pytest.fixture(params=["torch", "triton"])
def kernel_path(request, monkeypatch):
    """Both implementations of the class centres: the torch reference and the fused kernel (interpreted on CPU)."""
    if request.param == "triton":
        if not dispatch.HAS_TRITON or (not torch.cuda.is_available() and not dispatch.INTERPRETED):
            pytest.skip("triton kernels cannot run here")
        monkeypatch.setattr(dispatch, "POISON", True)
    monkeypatch.setenv("SEGKD_KERNELS", request.param)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=str)
def test_loss_and_student_gradient_match_reference(case, kernel_path):
    b, c_s, c_t, h, w, k, size = case
    fs, ft, lab = features(b, c_s, h, w, 1, grad=True), features(b, c_t, h, w, 2), labels(b, *size, k)
    if size == (h, w):
        lab[0, 0, 0] = 255  # the all-zero feature on an ignored pixel: cos(0, 0) = 0 on the student side only
    fs64 = fs.detach().double().requires_grad_(True)
    want = reference_ifv(fs64, ft, lab, k)
    want.backward()
    got = method(k, weight=3.0)(Out(None, fs, None), Out(None, ft, None), {"label": lab})["ifvd/ifvd"]
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), 3.0 * want, rtol=1e-5, atol=1e-7)
    got.backward()
    torch.testing.assert_close(fs.grad.double(), 3.0 * fs64.grad, rtol=1e-4, atol=1e-7)


def test_by_hand():
    """One image, C = 2, three pixels labelled 0, 0, ignore.
    student (1,0), (0,1), (3,4): centre of class 0 (1/2, 1/2), cos 1/sqrt2 twice; the ignored pixel: 1.
    teacher (1,0), (2,0), (0,5): centre (3/2, 0), cos 1 twice; the ignored pixel: 1.
    L = 2 * (1 - 1/sqrt2)^2 / 3."""
    fs = torch.tensor([[[[1.0, 0.0, 3.0]], [[0.0, 1.0, 4.0]]]])  # [1, 2, 1, 3]
    ft = torch.tensor([[[[1.0, 2.0, 0.0]], [[0.0, 0.0, 5.0]]]])
    lab = torch.tensor([[[0, 0, 255]]])
    assert class_centre_similarity(fs, lab, 2).flatten().tolist() == pytest.approx([2 ** -0.5, 2 ** -0.5, 1.0])
    assert class_centre_similarity(ft, lab, 2).flatten().tolist() == pytest.approx([1.0, 1.0, 1.0])
    loss = method(2, weight=1.0)(Out(None, fs, None), Out(None, ft, None), {"label": lab})["ifvd/ifvd"]
    assert loss.item() == pytest.approx(2 * (1 - 2 ** -0.5) ** 2 / 3, rel=1e-6)
    assert loss.item() == pytest.approx(reference_ifv(fs, ft, lab, 2).item(), rel=1e-6)


def test_gradients_reach_student_never_teacher():
    k = 5
    m = method(k)
    assert not [p for p in m.parameters()], "ifvd compares each network with itself: no connector"
    s = Out(*(torch.randn(2, c, 6, 7).requires_grad_(True) for c in (8, 6, k)))
    t = Out(*(torch.randn(2, c, 6, 7).requires_grad_(True) for c in (12, 10, k)))
    m(s, t, {"label": labels(2, 48, 56, k)})["ifvd/ifvd"].backward()
    assert s.decoder.grad is not None and s.decoder.grad.abs().sum() > 0
    assert s.backbone.grad is None and s.logits.grad is None  # default position: decoder
    assert all(v.grad is None for v in t)


def test_position_and_teacher_resize():
    """--position picks the features; a teacher map of another size is resized to the student's."""
    k = 5
    fs, ft, lab = features(2, 8, 6, 7, 1), features(2, 12, 6, 7, 2), labels(2, 48, 56, k)
    loss = method(k, position="backbone")(Out(fs, None, None), Out(ft, None, None), {"label": lab})["ifvd/ifvd"]
    torch.testing.assert_close(loss.double(), reference_ifv(fs, ft, lab, k), rtol=1e-5, atol=1e-7)
    big = F.interpolate(ft, size=(12, 14), mode="nearest")  # bilinear back to 6 x 7 averages 2x2 equal pixels
    loss2 = method(k, position="backbone")(Out(fs, None, None), Out(big, None, None), {"label": lab})["ifvd/ifvd"]
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-7)


def test_autocast_and_low_precision_features():
    """Under bf16 autocast the cosines are still fp32; bf16 features stay close to the float64 reference."""
    k, lab = 19, labels(2, 40, 72, 19)
    fs, ft = features(2, 11, 5, 9, 1), features(2, 19, 5, 9, 2)
    m = method(k)
    plain = m(Out(None, fs, None), Out(None, ft, None), {"label": lab})["ifvd/ifvd"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = m(Out(None, fs, None), Out(None, ft, None), {"label": lab})["ifvd/ifvd"]
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=1e-6, atol=1e-8)
    low = m(Out(None, fs.bfloat16(), None), Out(None, ft.bfloat16(), None), {"label": lab})["ifvd/ifvd"]
    want = reference_ifv(fs.bfloat16().float(), ft.bfloat16().float(), lab, k)
    torch.testing.assert_close(low.double(), want, rtol=1e-4, atol=1e-7)


def test_no_loss_without_labelled_pixels():
    fs, ft = torch.rand(2, 6, 4, 4) + 0.1, torch.rand(2, 10, 4, 4) + 0.1  # every pixel compared with itself: 1
    loss = method(5)(Out(None, fs, None), Out(None, ft, None), {"label": torch.full((2, 4, 4), 255)})["ifvd/ifvd"]
    assert loss.item() == 0.0




@pytest.mark.parametrize("spec", ["ifvd", "kd+ifvd"])
def test_cli_trains_end_to_end(spec, teacher, tmp_path):
    out = tmp_path / "run"
    result = run(tmp_path, "--method", spec, "--teacher-ckpt", teacher, "--iters", "3", "--out", str(out))
    assert 0.0 <= result["miou"] <= 1.0
    train = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert train and all(math.isfinite(r["loss"]) for r in train)
    assert "ifvd/ifvd" in train[-1]["terms"] and ("kd/kd" in train[-1]["terms"]) == (spec == "kd+ifvd")
    assert json.loads((out / "config.json").read_text())["method"]["ifvd_weight"] == 20.0


def test_flag_in_help():
    p = subprocess.run([sys.executable, str(ROOT / "engine" / "train.py"), "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0 and "--ifvd-weight" in p.stdout and "ifvd" in p.stdout
