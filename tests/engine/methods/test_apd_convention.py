"""--apd-convention: `code` against a float64 transcription of dvlab-research/APD tool/train.py's losses, `paper`
against the per-image formulas segkd has always computed; gradient routes in both; a short engine run."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from engine.config import MethodConfig, parse_config
from engine.methods import build_method
from engine.train import main

K = 6
S_CH = {"backbone": 8, "decoder": 7, "logits": K}
T_CH = {"backbone": 12, "decoder": 10, "logits": K}
B, H, W = 3, 6, 7            # feature resolution
LH, LW = 45, 53              # label resolution: not 8x the features, so the align_corners=True grid matters
ABSENT_CLASS, ONE_IMAGE_CLASS = 4, 3


def features(ch, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    dec = torch.randn(B, ch["decoder"], H, W, generator=g).relu()
    logits = torch.randn(B, ch["logits"], H, W, generator=g) * 2
    if grad:
        dec.requires_grad_(True), logits.requires_grad_(True)
    return type("Out", (), {"backbone": None, "decoder": dec, "logits": logits})()


def labels(seed=0):
    """Class 4 absent everywhere, class 3 in image 0 alone, ignore pixels in every image, classes 0-2 and 5
    spread unevenly (image 2 holds fewer classes than image 0)."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, K, (B, LH, LW), generator=g)
    lab[lab == ABSENT_CLASS] = 0
    lab[1:][lab[1:] == ONE_IMAGE_CLASS] = 1
    lab[2][lab[2] == 5] = 2
    lab[:, :5] = 255
    lab[1, :, :9] = 255
    return lab


def at_features(lab):
    return F.interpolate(lab[:, None].double(), size=(H, W), mode="nearest")[:, 0].long()


def test_the_batch_has_the_awkward_cases():
    lab = at_features(labels())
    assert not (lab == ABSENT_CLASS).any()
    assert (lab[0] == ONE_IMAGE_CLASS).any() and not (lab[1:] == ONE_IMAGE_CLASS).any()
    assert (lab == 255).any() and all((img == 255).any() for img in lab)
    per_image = [set(img.unique().tolist()) - {255} for img in lab]
    assert len(per_image[0]) > len(per_image[2])


def method(convention, unit="element", temperature=1.0, seed=0):
    torch.manual_seed(seed)
    cfg = MethodConfig(method="apd", apd_convention=convention, apd_kd_unit=unit, temperature=temperature)
    return build_method(cfg, S_CH, T_CH, K).parts["apd"]


def float64_projectors(m):
    """Float64 copies of the method's (P_s, P_t): same weights, gradients of their own."""
    return copy.deepcopy(m.student_proj).double(), copy.deepcopy(m.teacher_proj).double()


def projected(proj, s, t):
    p_s, p_t = proj
    return F.normalize(p_s(s.decoder.double()), dim=1), F.normalize(p_t(t.decoder.double()), dim=1)


def kl_div_mean(s_logits, t_logits):
    """torch.nn.KLDivLoss()(log_softmax(s), softmax(t)) as the code calls it: the mean over every element."""
    p_t = F.softmax(t_logits, 1)
    return (p_t * (p_t.log() - F.log_softmax(s_logits, 1))).mean()


def code_reference(proj, s, t, lab, tau=0.1, temperature=1.0, unit="element"):
    """tool/train.py's CriterionKmeansInterWhole and CriterionKD, written out in float64: for each class of the
    batch (ignore excluded) the mean of the normalised features over its pixels in every image, normalised;
    cosines to those N prototypes; a [B, K] class map with empty channels for the absent classes, upsampled
    with align_corners=True, x 1/tau, CE; KLDivLoss() (element mean) between the N-way observations;
    0.5 * mean(1 - cos) between the prototypes; KLDivLoss() * T^2 on the upsampled logits."""
    f_s, f_t = projected(proj, s, t)
    small = at_features(lab)
    c_s, c_t, classes = [], [], []
    for c in small.unique().tolist():
        if c == 255:
            continue
        where = (small == c).nonzero()  # [n, 3]: (b, y, x) over the whole batch
        c_s.append(F.normalize(f_s[where[:, 0], :, where[:, 1], where[:, 2]].mean(0), dim=0))
        c_t.append(F.normalize(f_t[where[:, 0], :, where[:, 1], where[:, 2]].mean(0), dim=0))
        classes.append(c)
    c_s, c_t = torch.stack(c_s), torch.stack(c_t)  # [N, d]
    pred_out = torch.einsum("nd,bdhw->bnhw", c_s, f_s)  # [B, N, h, w]
    soft_out = torch.einsum("nd,bdhw->bnhw", c_t, f_t)
    class_map = torch.zeros(B, K, H, W, dtype=torch.float64)
    for j, c in enumerate(classes):
        class_map[:, c] = soft_out[:, j]
    class_map = F.interpolate(class_map, size=lab.shape[-2:], mode="bilinear", align_corners=True) / tau
    l_t = F.cross_entropy(class_map, lab, ignore_index=255)
    l_ob = kl_div_mean(pred_out / tau, soft_out.detach() / tau)
    l_rec = 0.5 * (1 - (c_s * c_t.detach()).sum(1)).mean()

    def up(x):
        return F.interpolate(x.double(), size=lab.shape[-2:], mode="bilinear", align_corners=True)
    l_kd = kl_div_mean(up(s.logits) / temperature, up(t.logits) / temperature) * temperature ** 2
    if unit == "pixel":  # sums over classes, means over pixels: N (L_ob) and C (L_kd) times the element mean
        l_ob, l_kd = l_ob * len(classes), l_kd * K
    return {"teacher_proj": l_t, "ob": 10 * l_ob, "rec": 10 * l_rec, "kd": 10 * l_kd}


def paper_reference(proj, s, t, lab, tau=0.1, temperature=1.0, unit="element"):
    """segkd's per-image form in float64: prototypes, observations and their classes per image, everything at
    feature resolution; element unit: L_ob over sum_b K_b * h*w entries, L_kd over B*C*h*w; pixel unit: both
    over B*h*w."""
    f_s, f_t = projected(proj, s, t)
    small = at_features(lab)
    ce, n_ce, cos, n_cos, kl, entries = 0.0, 0, 0.0, 0, 0.0, 0
    for b in range(B):
        classes = [c for c in small[b].unique().tolist() if c != 255]
        a_s = torch.stack([f_s[b][:, small[b] == c].mean(1) for c in classes])  # [K_b, d]
        a_t = torch.stack([f_t[b][:, small[b] == c].mean(1) for c in classes])
        o_s = F.normalize(a_s, dim=1) @ f_s[b].flatten(1) / tau  # [K_b, h*w]
        o_t = F.normalize(a_t, dim=1) @ f_t[b].flatten(1) / tau
        target = small[b].flatten()
        keep = target != 255
        idx = torch.tensor([classes.index(c) for c in target[keep].tolist()])
        ce = ce + F.cross_entropy(o_t[:, keep].T, idx, reduction="sum")
        n_ce += int(keep.sum())
        cos = cos + F.cosine_similarity(a_s, a_t.detach(), dim=1).sum()
        n_cos += len(classes)
        p_t = F.softmax(o_t.detach(), 0)
        kl = kl + (p_t * (p_t.log() - F.log_softmax(o_s, 0))).sum()
        entries += len(classes) * H * W
    p_t = F.softmax(t.logits.double() / temperature, 1)
    l_kd = (p_t * (p_t.log() - F.log_softmax(s.logits.double() / temperature, 1))).mean() * temperature ** 2
    l_ob = kl / entries
    if unit == "pixel":
        l_ob, l_kd = kl / (B * H * W), l_kd * K
    return {"teacher_proj": ce / n_ce, "ob": 10 * l_ob, "rec": 10 * (1 - cos / n_cos), "kd": 10 * l_kd}


def grads(*tensors):
    return [x.grad if x.grad is not None else torch.zeros_like(x) for x in tensors]


@pytest.mark.parametrize("unit", ["element", "pixel"])
@pytest.mark.parametrize("convention", ["code", "paper"])
@pytest.mark.parametrize("term", ["teacher_proj", "ob", "rec", "kd"])
def test_terms_and_gradients_match_the_float64_formulas(term, convention, unit):
    """Each term, and its gradient to the student's features and logits and to both projectors."""
    m = method(convention, unit, temperature=2.0)
    lab = labels()
    ref = code_reference if convention == "code" else paper_reference
    proj = float64_projectors(m)
    s, t = features(S_CH, 1, grad=True), features(T_CH, 2)
    s64 = type("Out", (), {"decoder": s.decoder.detach().double().requires_grad_(True),
                           "logits": s.logits.detach().double().requires_grad_(True)})()
    got = m(s, t, {"label": lab})[term]
    want = ref(proj, s64, t, lab, temperature=2.0, unit=unit)[term]
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=2e-5, abs=1e-7)
    got.backward()
    want.backward()
    mine = grads(s.decoder, s.logits, *m.student_proj.parameters(), *m.teacher_proj.parameters())
    theirs = grads(s64.decoder, s64.logits, *proj[0].parameters(), *proj[1].parameters())
    for i, (a, b) in enumerate(zip(mine, theirs)):  # fp32 sums of cancelling terms: atol relative to the largest
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item() + 1e-12,
                                   msg=lambda msg: f"gradient {i}: {msg}")


def test_code_differs_from_paper_and_paper_is_the_default():
    assert MethodConfig().apd_convention == "paper"
    s, t, lab = features(S_CH, 1), features(T_CH, 2), {"label": labels()}
    default = method("paper")(s, t, lab)
    explicit = build_method(MethodConfig(method="apd"), S_CH, T_CH, K).parts["apd"]
    explicit.load_state_dict(method("paper").state_dict())
    for k, v in explicit(s, t, lab).items():
        assert torch.equal(v, default[k]), k
    code = method("code")(s, t, lab)
    for k in ("teacher_proj", "ob", "rec", "kd"):
        assert abs(code[k].item() - default[k].item()) > 1e-4 * abs(default[k].item()), k


def test_code_terms_with_no_labelled_pixel_are_finite():
    """A batch with every pixel ignored: no prototype, L_t, L_rec and L_ob are 0, L_kd still counts."""
    m = method("code")
    s, t = features(S_CH, 1, grad=True), features(T_CH, 2)
    terms = m(s, t, {"label": torch.full((B, LH, LW), 255)})
    assert terms["teacher_proj"].item() == terms["rec"].item() == terms["ob"].item() == 0
    assert terms["kd"].item() > 0
    sum(terms.values()).backward()
    assert torch.isfinite(s.decoder.grad).all() and torch.isfinite(s.logits.grad).all()


@pytest.mark.parametrize("convention", ["code", "paper"])
def test_gradient_routes(convention):
    """L_t reaches P_t alone; L_kd, L_ob, L_rec never reach P_t, and L_ob, L_rec reach P_s."""
    m = method(convention)
    lab = {"label": labels()}
    for term in ("teacher_proj", "kd", "ob", "rec"):
        s, t = features(S_CH, 1, grad=True), features(T_CH, 2)
        m.zero_grad(set_to_none=True)
        m(s, t, lab)[term].backward()
        reached_t = any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.teacher_proj.parameters())
        reached_s = any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student_proj.parameters())
        reached_student = any(v.grad is not None and v.grad.abs().sum() > 0 for v in (s.decoder, s.logits))
        if term == "teacher_proj":
            assert reached_t and not reached_s and not reached_student
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.teacher_proj.parameters())
        else:
            assert not reached_t and reached_student, term
            assert reached_s == (term in ("ob", "rec")), term


def test_code_fused_path_matches_the_reference(monkeypatch):
    """masked_avg_pool and prototype_kl fused (the interpreter on CPU) with the expanded batch prototypes."""
    from kernels._dispatch import HAS_TRITON
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    import sys
    fused = []

    def spy(name, real):  # records which path each call of an op takes
        def use_triton(*tensors, **kwargs):
            fused.append((name, real(*tensors, **kwargs)))
            return fused[-1][1]
        return use_triton

    for name in ("masked_avg_pool", "prototype"):  # the op modules, not the functions
        mod = sys.modules[f"kernels.{name}"]
        monkeypatch.setattr(mod, "use_triton", spy(name, mod.use_triton))
    lab = {"label": labels()}
    runs = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("SEGKD_KERNELS", mode)
        m = method("code")
        s, t = features(S_CH, 1, grad=True), features(T_CH, 2)
        terms = m(s, t, lab)
        sum(terms.values()).backward()
        runs[mode] = (terms, s.decoder.grad, [p.grad for p in m.parameters()])
    assert {name for name, on in fused if on} == {"masked_avg_pool", "prototype"}, "the fused path was not taken"
    (ref, ref_g, ref_p), (got, got_g, got_p) = runs["torch"], runs["triton"]
    for k in ref:
        assert got[k].item() == pytest.approx(ref[k].item(), rel=1e-5, abs=1e-7), k
    torch.testing.assert_close(got_g, ref_g, rtol=1e-4, atol=1e-7)
    for a, b in zip(got_p, ref_p):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_flag_parses_and_names_a_bad_value():
    assert parse_config(["--method", "apd", "--apd-convention", "code"]).method.apd_convention == "code"
    with pytest.raises(ValueError, match="--apd-convention 'pap' is not one of paper, code"):
        parse_config(["--method", "apd", "--apd-convention", "pap"])


def test_engine_trains_with_the_code_convention(tmp_path):
    fast = ["--crop", "24", "--batch-size", "2", "--workers", "0", "--val-size", "2", "--log-interval", "1",
            "--cache-dir", str(tmp_path / "cache")]
    main([*fast, "--method", "none", "--student", "pspnet_small", "--iters", "1", "--out", str(tmp_path / "t")])
    out = tmp_path / "run"
    main([*fast, "--method", "apd", "--apd-convention", "code", "--teacher-ckpt", str(tmp_path / "t" / "last.pt"),
          "--iters", "3", "--out", str(out)])
    train = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert train and {"apd/kd", "apd/ob", "apd/rec", "apd/teacher_proj"} <= set(train[-1]["terms"])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert json.loads((out / "config.json").read_text())["method"]["apd_convention"] == "code"
