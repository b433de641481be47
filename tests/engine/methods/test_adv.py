"""`adv`: the discriminator's loss and the student's term against a plain re-implementation of the reference
code (CIRKD losses/adv.py + utils/sagan.py, TorchDistiller's CriterionAdditionalGP), the gradient routes under
one backward of the summed terms, and CLI runs with an exact resume of D and its Adam."""
import json
import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from cli_testing import run, teacher  # noqa: F401  (fixture)
from engine.checkpoint import load_checkpoint
from engine.config import MethodConfig
from engine.methods import build_method
from engine.methods.adv import Discriminator, d_input

K = 5
CH = {"backbone": 8, "decoder": 8, "logits": K}


class Out(NamedTuple):
    backbone: torch.Tensor
    decoder: torch.Tensor
    logits: torch.Tensor


def small_method(**settings):
    """The adv method with a width-8 float64 D whose attention is switched on (gamma != 0)."""
    m = build_method(MethodConfig(method="adv", **settings), CH, CH, K)
    part = m.parts["adv"]
    part.discriminator = Discriminator(K, width=8).double()
    with torch.no_grad():
        part.discriminator.attn1.gamma.fill_(0.7)
        part.discriminator.attn2.gamma.fill_(-0.4)
    return m, part.discriminator


# ---------------------------------------------------------------- the reference code, written out plainly
def ref_sn_weight(p, uv, name):
    """utils/sagan.py SpectralNorm._update_u_v: v = n(W^T u), u = n(W v) (rebinding uv), W / (u . W v)."""
    w = p[f"{name}.weight"]
    h = w.shape[0]
    n = lambda x: x / (x.norm() + 1e-12)  # noqa: E731
    v = n(torch.mv(w.view(h, -1).detach().t(), uv[name][0]))
    u = n(torch.mv(w.view(h, -1).detach(), v))
    uv[name] = (u, v)
    return w / u.dot(w.view(h, -1).mv(v))


def ref_attn(p, name, x):
    """utils/sagan.py Self_Attn.forward."""
    b, c, width, height = x.size()
    conv = lambda y, part: F.conv2d(y, p[f"{name}.{part}.weight"], p[f"{name}.{part}.bias"])  # noqa: E731
    q = conv(x, "query").view(b, -1, width * height).permute(0, 2, 1)
    k = conv(x, "key").view(b, -1, width * height)
    attention = torch.softmax(torch.bmm(q, k), dim=-1)
    v = conv(x, "value").view(b, -1, width * height)
    out = torch.bmm(v, attention.permute(0, 2, 1)).view(b, c, width, height)
    return p[f"{name}.gamma"] * out + x


def ref_d(p, uv, x):
    """utils/sagan.py Discriminator.forward (preprocess_GAN_mode 1: BatchNorm2d in training mode)."""
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    x = (x - mean) / torch.sqrt(var + 1e-5) * p["preprocess.weight"].view(1, -1, 1, 1) + \
        p["preprocess.bias"].view(1, -1, 1, 1)
    for i in range(4):
        name = f"convs.{i}"
        x = F.leaky_relu(F.conv2d(x, ref_sn_weight(p, uv, name), p[f"{name}.bias"], 2, 1), 0.1)
        if i == 2:
            x = ref_attn(p, "attn1", x)
    x = ref_attn(p, "attn2", x)
    return F.conv2d(x, p["last.weight"], p["last.bias"])


def ref_terms(d, z_s, z_t, kind, w_adv, w_d, w_gp):
    """CIRKD train_kd.py / TorchDistiller kd_model.py: lambda_adv * CriterionAdvForG(D(S)), then
    lambda_d * (CriterionAdv(D(S.detach()), D(T.detach())) [+ CriterionAdditionalGP(D, lambda_gp)])."""
    p = {n: v.detach().clone().requires_grad_(True) for n, v in d.named_parameters()}
    uv = {f"convs.{i}": (d.convs[i].u.clone(), d.convs[i].v.clone()) for i in range(4)}
    g = w_adv * -ref_d({n: v.detach() for n, v in p.items()}, uv, z_s).mean()
    out_s, out_t = ref_d(p, uv, z_s.detach()), ref_d(p, uv, z_t.detach())
    if kind == "hinge":
        loss = torch.relu(1.0 - out_t).mean() + torch.relu(1.0 + out_s).mean()
    else:
        loss = -torch.mean(out_t) + out_s.mean()
        alpha = torch.rand(z_t.size(0), 1, 1, 1, dtype=z_t.dtype).expand_as(z_t)
        interpolated = (alpha * z_t.data + (1 - alpha) * z_s.data).requires_grad_(True)
        out = ref_d(p, uv, interpolated)
        grad = torch.autograd.grad(out, interpolated, torch.ones(out.size(), dtype=out.dtype), retain_graph=True,
                                   create_graph=True, only_inputs=True)[0]
        grad_l2norm = torch.sqrt(torch.sum(grad.view(grad.size(0), -1) ** 2, dim=1))
        loss = loss + w_gp * torch.mean((grad_l2norm - 1) ** 2)
    return g, w_d * loss, p, uv


@pytest.mark.parametrize("kind", ["hinge", "wgan-gp"])
def test_terms_and_gradients_match_reference_code(kind):
    torch.manual_seed(0)
    w = {"adv_weight": 0.3, "adv_d_weight": 0.7, "adv_gp_weight": 2.0}
    m, d = small_method(adv_loss=kind, **w)
    z_s = torch.randn(3, K, 64, 72, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(3, K, 64, 72, dtype=torch.float64) * 2 + 0.5
    torch.manual_seed(1)
    g_ref, d_ref, p_ref, uv_ref = ref_terms(d, z_s, z_t, kind, w["adv_weight"], w["adv_d_weight"],
                                            w["adv_gp_weight"])
    (gs_ref,) = torch.autograd.grad(g_ref, z_s)
    d_ref.backward()

    torch.manual_seed(1)  # the same alpha for the gradient penalty
    terms = m(Out(None, None, z_s), Out(None, None, z_t), {})
    assert set(terms) == {"adv/adv", "adv/disc"}
    torch.testing.assert_close(terms["adv/adv"], g_ref.detach(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(terms["adv/disc"], d_ref.detach(), rtol=1e-10, atol=1e-14)
    sum(terms.values()).backward()  # one backward of the sum, as the trainer does
    torch.testing.assert_close(z_s.grad, gs_ref, rtol=1e-9, atol=1e-14)
    for name, p in d.named_parameters():
        torch.testing.assert_close(p.grad, p_ref[name].grad, rtol=1e-9, atol=1e-13, msg=lambda m: f"{name}: {m}")
    for i in range(4):  # u, v advanced once per call: 3 calls (hinge) or 4 (wgan-gp)
        torch.testing.assert_close(d.convs[i].u, uv_ref[f"convs.{i}"][0])
        torch.testing.assert_close(d.convs[i].v, uv_ref[f"convs.{i}"][1])


@pytest.mark.parametrize("kind", ["hinge", "wgan-gp"])
def test_gradient_routes(kind):
    """L_adv reaches the student alone, L_D reaches D alone: zero one weight and the other side gets nothing."""
    def grads(**settings):
        torch.manual_seed(0)
        m, d = small_method(adv_loss=kind, **settings)
        z_s = torch.randn(2, K, 8, 9, requires_grad=True)
        terms = m(Out(None, None, z_s), Out(None, None, torch.randn(2, K, 8, 9)), {})
        sum(terms.values()).backward()
        return z_s.grad, [p.grad for p in d.parameters()], terms, d

    s_grad, d_grads, _, _ = grads(adv_weight=0.0)
    assert s_grad is None or not s_grad.any(), "the discriminator's loss reached the student"
    assert any(g is not None and g.any() for g in d_grads)
    s_grad, d_grads, _, _ = grads(adv_d_weight=0.0)
    assert s_grad is not None and s_grad.any()
    assert all(g is None or not g.any() for g in d_grads), "the student's term reached D"

    # each term alone: the other side's .grad is never even created
    torch.manual_seed(0)
    m, d = small_method(adv_loss=kind)
    z_s = torch.randn(2, K, 8, 9, requires_grad=True)
    m(Out(None, None, z_s), Out(None, None, torch.randn(2, K, 8, 9)), {})["adv/adv"].backward()
    assert all(p.grad is None for p in d.parameters()) and z_s.grad is not None
    z_s = torch.randn(2, K, 8, 9, requires_grad=True)
    m(Out(None, None, z_s), Out(None, None, torch.randn(2, K, 8, 9)), {})["adv/disc"].backward()
    assert z_s.grad is None and any(p.grad is not None for p in d.parameters())


def test_discriminator_has_its_own_adam_and_stays_out_of_the_student_sgd():
    m = build_method(MethodConfig(method="adv"), CH, CH, K)
    d = m.parts["adv"].discriminator
    owned = {id(p) for p in d.parameters()}
    assert not any(id(p) in owned for g in m.param_groups() for p in g["params"])
    (opt,) = m.optimizers()
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == 4e-4 and opt.param_groups[0]["betas"] == (0.9, 0.99)
    assert {id(p) for p in opt.param_groups[0]["params"]} == owned
    assert "discriminator.convs.0.u" in m.parts["adv"].state_dict()  # power-iteration state is checkpointed


def test_penalty_works_without_autograd_outside():
    m, _ = small_method(adv_loss="wgan-gp")
    with torch.no_grad():
        terms = m(Out(None, None, torch.randn(2, K, 8, 9)), Out(None, None, torch.randn(2, K, 8, 9)), {})
    assert all(torch.isfinite(v) for v in terms.values())


@pytest.mark.parametrize("hw, expected", [((4, 5), (64, 80)), ((45, 60), (64, 86)), ((64, 128), (64, 128)),
                                          ((65, 65), (65, 65))])
def test_small_maps_are_upsampled_to_what_d_can_score(hw, expected):
    z = torch.randn(2, K, *hw, dtype=torch.bfloat16)
    out = d_input(z)
    assert out.dtype == torch.float32 and tuple(out.shape[-2:]) == expected
    assert math.isclose(expected[1] / expected[0], hw[1] / hw[0], rel_tol=0.05)
    assert Discriminator(K, width=8)(out).shape[1:] == (1, expected[0] // 16 - 3, expected[1] // 16 - 3)


# ---------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("method", ["adv", "kd+adv", "kd+skd+adv"])
def test_cli_trains(method, teacher, tmp_path):
    """adv alone and in sums; kd+skd+adv is SKD's full objective (pixel-wise, pair-wise, holistic)."""
    out = tmp_path / "run"
    result = run(tmp_path, "--method", method, "--teacher-ckpt", teacher, "--iters", "3", "--out", str(out))
    assert 0.0 <= result["miou"] <= 1.0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["complete"] and ckpt["iteration"] == 3
    assert len(ckpt["method_optimizers"]) == 1 and ckpt["method_optimizers"][0]["state"]  # D's Adam stepped
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    terms = set(next(r for r in records if r["kind"] == "train")["terms"])
    assert {f"{m}/" for m in method.split("+")} <= {t.split("/")[0] + "/" for t in terms}


def test_resume_restores_discriminator_and_its_adam(teacher, tmp_path):
    common = ["--method", "adv", "--adv-loss", "wgan-gp", "--teacher-ckpt", teacher, "--iters", "4",
              "--ckpt-interval", "2", "--keep-ckpts", "5"]
    run(tmp_path, *common, "--out", str(tmp_path / "straight"))
    mid = tmp_path / "straight" / "ckpt_0000002.pt"
    run(tmp_path, *common, "--out", str(tmp_path / "resumed"), "--resume", str(mid))
    a, b = (load_checkpoint(tmp_path / r / "last.pt") for r in ("straight", "resumed"))
    assert a["iteration"] == b["iteration"] == 4
    for key in ("model", "method_state"):
        for name, v in a[key].items():
            assert torch.equal(v, b[key][name]), f"{key}.{name} differs after resume"
    (sa,), (sb,) = a["method_optimizers"], b["method_optimizers"]
    for i, st in sa["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][i][k])), (i, k)
    m = load_checkpoint(mid)["method_state"]
    d = [k for k in m if k.startswith("parts.adv.discriminator") and m[k].is_floating_point()]
    assert any(not torch.equal(m[k], a["method_state"][k]) for k in d), "D did not train after the checkpoint"
