"""engine/step.py: each speed option trains the same weights; low-precision steps; fp16 scaler resume; bad flags."""
# Each speed option changes how the step runs, never what it computes: the tests train the same iterations
# with and without it and compare the weights.
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint
from speed_testing import FAST, run, teacher  # noqa: F401  (fixture)


def weights(out):
    return load_checkpoint(Path(out) / "last.pt")["model"]


def max_difference(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


# ------------------------------------------------------------------ options change how, not what
BASE = ["--method", "kd", "--iters", "3", "--precision", "fp32"]


@pytest.fixture(scope="module")
def baseline(teacher, tmp_path_factory):
    """3 iterations with every speed option off (fp32, NCHW, fused SGD, eager)."""
    tmp = tmp_path_factory.mktemp("base")
    run(tmp, *BASE, "--teacher-ckpt", teacher, "--channels-last", "off", "--optim-impl", "fused",
        "--out", str(tmp / "base"))
    return tmp / "base"


@pytest.mark.parametrize("option", [["--channels-last", "on"], ["--optim-impl", "foreach"], ["--optim-impl", "plain"],
                                    ["--compile"]])
def test_speed_options_train_the_same_weights(option, baseline, teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEGKD_COMPILE_BACKEND", "aot_eager")  # dynamo + AOT autograd, no inductor codegen
    common = [*BASE, "--teacher-ckpt", teacher]
    if option == ["--compile"]:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    capsys.readouterr()
    run(tmp_path, *common, *option, "--out", str(tmp_path / "other"))
    resolved = {"--channels-last": "channels-last on", "--optim-impl": f"SGD {option[-1]}", "--compile": "compile on"}
    assert resolved[option[0]] in capsys.readouterr().out  # the option took effect, not just the default
    if option == ["--compile"]:
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
        assert not breaks, breaks  # student and teacher each trace as one graph
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    diff = max_difference(weights(baseline), weights(tmp_path / "other"))
    assert diff < 1e-4, diff


def one_step_update(teacher, tmp, precision, init_scale=None):
    """The parameter update of the first training step (kd + cad) at `precision`, on the same batch."""
    from engine.config import parse_config
    from engine.dist import DistEnv
    from engine.trainer import Trainer

    cfg = parse_config([*FAST, "--method", "cad+kd", "--teacher-ckpt", teacher, "--precision", precision,
                        "--out", str(tmp / precision), "--resume", "none"])
    trainer = Trainer(cfg, DistEnv(), echo=lambda *a: None)
    if init_scale is not None:
        trainer.step.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    batch = next(trainer.batches(0))
    params = [p for g in trainer.step.optimizer.param_groups for p in g["params"]]
    before = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    terms = trainer.step(batch, 0)
    after = torch.cat([p.detach().reshape(-1) for p in params])
    return after - before, terms


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_step_updates_like_fp32(precision, teacher, tmp_path):
    ref, ref_terms = one_step_update(teacher, tmp_path, "fp32")
    # fp16: a unit loss scale keeps the first step from overflowing (a skipped step has no update to compare)
    upd, terms = one_step_update(teacher, tmp_path, precision, init_scale=1.0 if precision == "fp16" else None)
    # Low precision perturbs a gradient through this tiny model by ~15% (BN over 2 images of 4x4 features):
    # the same direction and size, not the same bits. A mis-wired path (loss scale left in, a step skipped or
    # applied twice, a term lost) fails by far more.
    cos = float(torch.nn.functional.cosine_similarity(ref, upd, dim=0))
    ratio = float(upd.norm() / ref.norm())
    assert cos > 0.95, cos
    assert 0.85 < ratio < 1.15, ratio
    for k in ref_terms:
        assert float(terms[k]) == pytest.approx(float(ref_terms[k]), rel=0.05), k


def test_fp16_checkpoints_its_loss_scale_and_resumes(teacher, tmp_path):
    common = ["--method", "kd", "--teacher-ckpt", teacher, "--precision", "fp16", "--out", str(tmp_path / "r")]
    run(tmp_path, *common, "--iters", "2")
    first = load_checkpoint(tmp_path / "r" / "last.pt")["scaler"]
    assert first["scale"] > 0 and first["_growth_tracker"] >= 0
    result = run(tmp_path, *common, "--iters", "4")  # resumes at iteration 2 with the saved scale
    assert 0.0 <= result["miou"] <= 1.0
    assert load_checkpoint(tmp_path / "r" / "last.pt")["iteration"] == 4


def test_bad_speed_flags_are_named(teacher, tmp_path):
    base = ["--method", "kd", "--teacher-ckpt", teacher, "--iters", "1", "--out", str(tmp_path / "r")]
    with pytest.raises(ValueError, match="--precision 'fp8' is not one of"):
        run(tmp_path, *base, "--precision", "fp8")
    with pytest.raises(ValueError, match="--channels-last 'yes' is not one of"):
        run(tmp_path, *base, "--channels-last", "yes")
    with pytest.raises(ValueError, match="--profile and --profile-warmup must be >= 0"):
        run(tmp_path, *base, "--profile", "-1")


def test_aux_term_is_the_weighted_cross_entropy_of_the_auxiliary_head():
    """--aux-weight w: the step's 'aux' term is w x the pixel-mean CE of the auxiliary logits upsampled to the
    labels (the same CE as the main term), computed in float64 here from the same forward."""
    import torch.nn.functional as F

    from engine.config import MethodConfig
    from engine.methods import build_method
    from engine.models import build_model
    from engine.step import Distiller

    torch.manual_seed(0)
    student = build_model("pspnet_tiny", 4, aux=True).train()
    method = build_method(MethodConfig(method="none"), student.channels, student.channels, 4)
    images, labels = torch.randn(2, 3, 40, 32), torch.randint(0, 4, (2, 40, 32))
    labels[0, :5] = 255
    torch.manual_seed(1)
    s, terms = Distiller(student, method, 255, aux_weight=0.4)(images, None, {"label": labels})
    assert set(terms) == {"ce", "aux"}
    up = F.interpolate(s.aux.double(), size=(40, 32), mode="bilinear", align_corners=False)
    logp = torch.log_softmax(up, 1)
    keep = labels != 255
    want = -logp.gather(1, labels.clamp_max(3)[:, None])[:, 0][keep].mean()
    torch.testing.assert_close(terms["aux"].double(), 0.4 * want, rtol=1e-5, atol=1e-6)
    _, no_labels = Distiller(student, method, 255, aux_weight=0.4)(images, None, {})
    assert "aux" not in no_labels
