"""engine/methods/skd.py: CIRKD's CriterionStructuralKD in float64 against the method, gradient routes, the CLI."""
import json
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli_testing import run, teacher  # noqa: F401  (fixture)
from engine.config import MethodConfig
from engine.methods import METHODS, build_method
from engine.methods.skd import SKD, SKDSettings


class Out(NamedTuple):  # the SegOutput contract
    backbone: torch.Tensor
    decoder: torch.Tensor
    logits: torch.Tensor


K = 5
S_CH = {"backbone": 8, "decoder": 6, "logits": K}
T_CH = {"backbone": 12, "decoder": 10, "logits": K}


def outputs(ch, b=2, h=7, w=9, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    o = Out(*(torch.randn(b, ch[k], h, w, generator=g).relu() for k in ("backbone", "decoder", "logits")))
    return Out(*(v.requires_grad_(grad) for v in o))


def cirkd_skd64(feat_s, feat_t):
    """winycg/CIRKD losses/skd.py CriterionStructuralKD.forward, verbatim but in float64."""
    feat_s, feat_t = feat_s.double(), feat_t.double()
    maxpool = nn.MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=0, ceil_mode=True)
    feat_s, feat_t = F.normalize(maxpool(feat_s), p=2, dim=1), F.normalize(maxpool(feat_t), p=2, dim=1)

    def sim(fea):
        b, c = fea.shape[:2]
        fea = fea.reshape(b, c, -1)
        return torch.bmm(fea.transpose(1, 2), fea)

    return ((sim(feat_s) - sim(feat_t)) ** 2).mean()


def test_defaults_are_cirkds():
    cfg = MethodConfig(method="skd")
    assert (cfg.skd_weight, cfg.skd_pool) == (10.0, 2) == (SKDSettings().skd_weight, SKDSettings().skd_pool)
    m = build_method(cfg, S_CH, T_CH, K).parts["skd"]
    assert isinstance(m, SKD) and m.position == "decoder" and not list(m.parameters())  # no connector
    assert METHODS["skd"] is SKD


@pytest.mark.parametrize("hw", [(7, 9), (8, 6), (1, 5)])  # odd sizes: ceil_mode keeps the last row/column
def test_loss_matches_cirkd_float64_and_gradients_reach_the_student_only(hw):
    m = build_method(MethodConfig(method="skd"), S_CH, T_CH, K)
    s, t = outputs(S_CH, h=hw[0], w=hw[1], grad=True), outputs(T_CH, h=hw[0], w=hw[1], seed=1)
    terms = m(s, t, {})
    assert list(terms) == ["skd/skd"]
    want = 10.0 * cirkd_skd64(s.decoder.detach(), t.decoder)
    assert terms["skd/skd"].item() == pytest.approx(want.item(), rel=1e-5)
    terms["skd/skd"].backward()
    d64 = s.decoder.detach().double().requires_grad_()
    (10.0 * cirkd_skd64(d64, t.decoder)).backward()
    torch.testing.assert_close(s.decoder.grad.double(), d64.grad, rtol=1e-4, atol=1e-7)
    assert s.decoder.grad.abs().sum() > 0
    assert s.backbone.grad is None and s.logits.grad is None and all(v.grad is None for v in t)


def test_pool_1_skips_pooling_and_position_and_weight_apply():
    cfg = MethodConfig(method="skd", skd_pool=1, skd_weight=3.0, position="backbone")
    m = build_method(cfg, S_CH, T_CH, K)
    s, t = outputs(S_CH), outputs(T_CH, seed=1)
    fs, ft = F.normalize(s.backbone.double().flatten(2), dim=1), F.normalize(t.backbone.double().flatten(2), dim=1)
    want = 3.0 * (fs.transpose(1, 2) @ fs - ft.transpose(1, 2) @ ft).square().mean()
    assert m(s, t, {})["skd/skd"].item() == pytest.approx(want.item(), rel=1e-5)


def test_zero_when_the_similarities_agree():
    m = build_method(MethodConfig(method="skd"), S_CH, S_CH, K)
    s = outputs(S_CH)
    t = Out(*(2.0 * v for v in s))  # per-pixel scaling leaves every cosine unchanged
    assert abs(m(s, t, {})["skd/skd"].item()) < 1e-5


def test_cli_kd_plus_skd_end_to_end(teacher, tmp_path):
    out = tmp_path / "run"
    result = run(tmp_path, "--method", "kd+skd", "--teacher-ckpt", teacher, "--iters", "3", "--out", str(out))
    assert 0.0 <= result["miou"] <= 1.0
    train = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert train and all(np.isfinite(r["loss"]) for r in train)
    assert {"ce", "kd/kd", "skd/skd"} <= set(train[-1]["terms"])
    assert all(np.isfinite(r["terms"]["skd/skd"]) and r["terms"]["skd/skd"] >= 0 for r in train)
