"""Distillation methods on synthetic features: terms, weights, gradient routes, combinations, errors."""
from typing import NamedTuple

import pytest
import torch

import kernels
from engine.config import MethodConfig
from engine.methods import METHODS, Method, build_method, method_needs_teacher, parse_method


class Out(NamedTuple):  # the SegOutput contract: backbone, decoder, logits
    backbone: torch.Tensor
    decoder: torch.Tensor
    logits: torch.Tensor


K = 5
S_CH = {"backbone": 8, "decoder": 6, "logits": K}
T_CH = {"backbone": 12, "decoder": 10, "logits": K}


def outputs(ch, b=2, h=6, w=7, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    o = Out(*(torch.randn(b, ch[k], h, w, generator=g).relu() if k != "logits" else
              torch.randn(b, ch[k], h, w, generator=g) for k in ("backbone", "decoder", "logits")))
    if grad:
        for v in o:
            v.requires_grad_(True)
    return o


def batch(b=2, h=24, w=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, K, (b, h, w), generator=g)
    lab[:, :3] = 255
    return {"label": lab}


DISTILLING = [n for n in METHODS if n != "none"]


@pytest.mark.parametrize("name", DISTILLING)
def test_terms_finite_and_gradients_reach_student_and_method(name):
    torch.manual_seed(0)
    m = build_method(MethodConfig(method=name), S_CH, T_CH, K)
    s, t = outputs(S_CH, grad=True), outputs(T_CH, seed=1)
    terms = m(s, t, batch())
    assert terms and all(k.startswith(name + "/") for k in terms)
    for k, v in terms.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    sum(terms.values()).backward()
    assert any(v.grad is not None and v.grad.abs().sum() > 0 for v in s if v is not None), \
        "no gradient reached the student"
    trainable = [p for p in m.parameters() if p.requires_grad]
    # logit methods: equal class counts need no connector; ifvd and skd compare each network's own similarity
    # maps (no connector); data-free methods own no trainable part here (dfad's generator lives in its source)
    if name not in ("kd", "cwd", "ifvd", "skd") and METHODS[name].train_source is Method.train_source:  # not data-free
        assert trainable, f"{name} should own a connector or projectors here"
    for p in trainable:
        assert p.grad is not None, f"{name}: a method parameter got no gradient"
    # adv's discriminator: at initialisation its attention (mixing weight 0) and, under the hinge loss, its last
    # bias (+1 and -1 cancel) get exactly zero gradients, as in the reference code (test_adv.py checks them)
    if name != "adv":
        assert all(p.grad.abs().sum() > 0 for p in trainable), f"{name}: a method parameter got a zero gradient"


# adv: a critic's score, not a distance; cirkd: its memory terms compare a projection of the student with the
# teacher (the projector is not the identity)
@pytest.mark.parametrize("name", [n for n in DISTILLING if n not in ("adv", "cirkd")])
def test_zero_when_student_equals_teacher(name):
    torch.manual_seed(0)
    m = build_method(MethodConfig(method=name), S_CH, S_CH, K)  # equal channels: no connector
    if name == "apd":  # identical projectors make the two perspectives identical
        part = m.parts["apd"]
        with torch.no_grad():
            for ps, pt in zip(part.student_proj.parameters(), part.teacher_proj.parameters()):
                pt.copy_(ps)
    s = outputs(S_CH)
    terms = m(s, Out(*(v.clone() for v in s)), batch())
    for k, v in terms.items():
        if k.endswith("teacher_proj"):
            continue  # APD's L_t is a cross-entropy of the teacher's observations, not a discrepancy
        assert abs(v.item()) < 1e-5, (k, v.item())


def test_weights_scale_terms_and_match_kernels():
    s, t = outputs(S_CH), outputs(S_CH, seed=1)
    base = build_method(MethodConfig(method="cad"), S_CH, S_CH, K)(s, t, batch())
    double = build_method(MethodConfig(method="cad", ad_weight=20.0, ad_kd_weight=5.0), S_CH, S_CH, K)(s, t, batch())
    assert double["cad/ad"].item() == pytest.approx(2 * base["cad/ad"].item(), rel=1e-6)
    assert double["cad/kd"].item() == pytest.approx(0.5 * base["cad/kd"].item(), rel=1e-6)
    assert base["cad/ad"].item() == pytest.approx(10 * kernels.angular_loss(s.backbone, t.backbone, "channel").item(),
                                                  rel=1e-6)
    kd = build_method(MethodConfig(method="kd", temperature=2.0), S_CH, S_CH, K)(s, t, batch())
    assert kd["kd/kd"].item() == pytest.approx(kernels.pixel_kl(s.logits, t.logits, 2.0).item(), rel=1e-6)
    cwd = build_method(MethodConfig(method="cwd"), S_CH, S_CH, K)(s, t, batch())
    assert cwd["cwd/cwd"].item() == pytest.approx(3 * kernels.channel_kl(s.logits, t.logits, 4.0).item(), rel=1e-6)


def test_kd_unit_element_is_kldivloss_mean_and_pixel_is_c_times_it():
    """The KD term of lad/cad/pad and apd: `element` is torch.nn.KLDivLoss()'s default mean over B*C*H*W (the
    authors' code), `pixel` the mean over B*H*W (CIRKD's batchmean), C times larger. Float64 reference."""
    s, t = outputs(S_CH), outputs(S_CH, seed=1)
    t2 = 2.0
    p_t = torch.softmax(t.logits.double() / t2, 1)
    kl = p_t * (p_t.log() - torch.log_softmax(s.logits.double() / t2, 1))  # KLDivLoss()'s elements
    ref = kl.sum().item() / kl.numel() * t2 ** 2
    for unit, scale in (("element", 1), ("pixel", K)):
        for name in ("lad", "cad", "pad"):
            m = build_method(MethodConfig(method=name, ad_kd_unit=unit, temperature=t2), S_CH, S_CH, K)
            assert m(s, t, batch())[f"{name}/kd"].item() == pytest.approx(10 * scale * ref, rel=1e-5), (name, unit)
        apd = build_method(MethodConfig(method="apd", apd_kd_unit=unit, temperature=t2), S_CH, T_CH, K)
        assert apd(s, outputs(T_CH, seed=1)._replace(logits=t.logits), batch())["apd/kd"].item() == \
            pytest.approx(10 * scale * ref, rel=1e-5), unit
    assert MethodConfig().ad_kd_unit == MethodConfig().apd_kd_unit == "element"


def test_apd_observation_unit_divides_by_the_present_class_count():
    """L_ob in `element` units is the pixel mean divided by the mean number of classes present per image (the
    element mean over each image's [K_b, h, w] observation entries)."""
    torch.manual_seed(0)
    s, t, b = outputs(S_CH), outputs(T_CH, seed=1), batch()
    b["label"][1][b["label"][1] == 3] = 255  # the images hold different numbers of classes
    terms = {}
    for unit in ("element", "pixel"):
        torch.manual_seed(0)  # the same projector weights for both
        terms[unit] = build_method(MethodConfig(method="apd", apd_kd_unit=unit), S_CH, T_CH, K)(s, t, b)
    from engine.methods.base import labels_at
    lab = labels_at(b["label"], s.decoder.shape[-2:])
    k_b = torch.tensor([float(len(set(img.unique().tolist()) - {255})) for img in lab])
    assert k_b[0] != k_b[1]
    assert terms["pixel"]["apd/ob"].item() == pytest.approx(k_b.mean().item() * terms["element"]["apd/ob"].item(),
                                                             rel=1e-5)
    assert terms["pixel"]["apd/rec"].item() == pytest.approx(terms["element"]["apd/rec"].item(), rel=1e-6)

    # fewer present classes than images (two of three images all ignored, the third two classes): the element
    # mean divides by sum_b K_b = 2 entries per pixel over B = 3 images, i.e. the pixel mean times 3/2 (a mean
    # K_b of 2/3, not clamped to 1)
    s3, t3 = outputs(S_CH, b=3), outputs(T_CH, b=3, seed=1)
    b3 = {"label": torch.full((3, 24, 28), 255)}
    b3["label"][2, :, :14], b3["label"][2, :, 14:] = 1, 2
    ob = {}
    for unit in ("element", "pixel"):
        torch.manual_seed(0)
        ob[unit] = build_method(MethodConfig(method="apd", apd_kd_unit=unit), S_CH, T_CH, K)(s3, t3, b3)["apd/ob"]
    assert ob["pixel"].item() > 0
    assert ob["element"].item() == pytest.approx(1.5 * ob["pixel"].item(), rel=1e-5)


def test_md_and_fitnet_by_hand():
    ch = {"backbone": 2, "decoder": 2, "logits": K}
    fs = torch.zeros(1, 2, 1, 2)
    fs[0, 0, 0, 0] = 3.0  # ||F_s|| = 3
    ft = torch.zeros(1, 2, 1, 2)
    ft[0, 1, 0, 1] = 4.0  # ||F_t|| = 4
    logits = torch.zeros(1, K, 1, 2)
    s, t = Out(fs, fs, logits), Out(ft, ft, logits)
    md = build_method(MethodConfig(method="md"), ch, ch, K)(s, t, {"label": torch.zeros(1, 1, 2).long()})
    assert md["md/md"].item() == pytest.approx((4 - 3) ** 2 / 4)  # N = C*H*W = 4
    fit = build_method(MethodConfig(method="fitnet"), ch, ch, K)(s, t, {"label": torch.zeros(1, 1, 2).long()})
    assert fit["fitnet/fitnet"].item() == pytest.approx((9 + 16) / 4)


def test_position_selects_features():
    s, t = outputs(S_CH), outputs(S_CH, seed=1)
    for pos in ("backbone", "decoder", "logits"):
        m = build_method(MethodConfig(method="lad", position=pos, ad_kd_weight=0.0), S_CH, S_CH, K)
        want = 10 * kernels.angular_loss(getattr(s, pos), getattr(t, pos), "layer")
        assert m(s, t, batch())["lad/ad"].item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="--position"):
        build_method(MethodConfig(method="cad", position="neck"), S_CH, S_CH, K)
    with pytest.raises(ValueError, match="no effect"):
        build_method(MethodConfig(method="kd", position="backbone"), S_CH, S_CH, K)


def test_apd_gradient_routes():
    """L_kd, L_rec, L_ob never reach P_t; L_t reaches P_t alone (not the student)."""
    torch.manual_seed(0)
    m = build_method(MethodConfig(method="apd"), S_CH, T_CH, K)
    apd = m.parts["apd"]
    for term in ("kd", "ob", "rec"):
        s = outputs(S_CH, grad=True)
        m.zero_grad(set_to_none=True)
        m(s, outputs(T_CH, seed=1), batch())[f"apd/{term}"].backward()
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in apd.teacher_proj.parameters()), term
    s = outputs(S_CH, grad=True)
    m.zero_grad(set_to_none=True)
    m(s, outputs(T_CH, seed=1), batch())["apd/teacher_proj"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in apd.teacher_proj.parameters())
    assert all(v.grad is None for v in s)
    assert all(p.grad is None for p in apd.student_proj.parameters())
    # P_t is trained by the method's own Adam, not the student's SGD
    owned = {id(p) for p in apd.teacher_proj.parameters()}
    assert not any(id(p) in owned for g in m.param_groups() for p in g["params"])
    (opt,) = m.optimizers()
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 1e-5
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)


def test_apd_l_rec_and_observation_match_formula():
    torch.manual_seed(0)
    cfg = MethodConfig(method="apd")
    m = build_method(cfg, S_CH, T_CH, K).parts["apd"]
    s, t, b = outputs(S_CH), outputs(T_CH, seed=1), batch()
    terms = m(s, t, b)
    f_s = torch.nn.functional.normalize(m.student_proj(s.decoder), dim=1)
    f_t = torch.nn.functional.normalize(m.teacher_proj(t.decoder), dim=1)
    lab = torch.nn.functional.interpolate(b["label"][:, None].float(), size=f_s.shape[-2:], mode="nearest")[:, 0].long()
    cos, n = 0.0, 0
    for i in range(2):
        for k in range(K):
            mask = lab[i] == k
            if mask.any():
                a_s, a_t = f_s[i][:, mask].mean(1), f_t[i][:, mask].mean(1)
                cos += torch.nn.functional.cosine_similarity(a_s, a_t, dim=0).item()
                n += 1
    assert terms["rec"].item() == pytest.approx(10 * (1 - cos / n), rel=1e-4)


def test_combined_sums_and_prefixes():
    s, t = outputs(S_CH), outputs(S_CH, seed=1)
    both = build_method(MethodConfig(method="cad+kd"), S_CH, S_CH, K)(s, t, batch())
    assert set(both) == {"cad/ad", "cad/kd", "kd/kd"}
    alone = build_method(MethodConfig(method="cad"), S_CH, S_CH, K)(s, t, batch())
    assert both["cad/ad"].item() == pytest.approx(alone["cad/ad"].item())


def test_method_name_errors():
    with pytest.raises(ValueError, match="valid methods: none, kd, fitnet"):
        parse_method("cad+bogus")
    with pytest.raises(ValueError, match="twice"):
        parse_method("kd+kd")
    with pytest.raises(ValueError, match="cannot be combined"):
        parse_method("none+kd")
    assert not method_needs_teacher("none") and method_needs_teacher("cad+kd")
