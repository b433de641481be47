"""engine/methods/dfad.py: DFAD's round (k student steps, then one generator step) and its generator loss."""
import numpy as np
import pytest
import torch

from datafree_testing import FAST, random_teacher  # noqa: F401  (fixture)
from engine.config import parse_config
from engine.dist import DistEnv
from engine.trainer import Trainer


def dfad_trainer(tmp_path, teacher, *extra):
    cfg = parse_config([*FAST, "--method", "dfad", "--teacher-ckpt", teacher, "--teacher", "pspnet_tiny",
                        "--gen-size", "32", "--gen-batch", "4",
                        "--iters", "10", "--out", str(tmp_path / "dfad"), *extra])
    return Trainer(cfg, DistEnv())


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return any(not torch.equal(v, module.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("bn_weight", ["0", "0.1"])
def test_dfad_round_k_student_steps_then_one_generator_step(random_teacher, tmp_path, bn_weight):
    k = 3
    tr = dfad_trainer(tmp_path, random_teacher, "--gen-every", str(k), "--bn-weight", bn_weight)
    src = tr.source
    assert tr.step.optimizer.param_groups[0]["weight_decay"] == 5e-4  # DFAD's student SGD, not the --lr default
    assert tr.step.optimizer.param_groups[0]["initial_lr"] == 0.1
    teacher0 = snapshot(tr.teacher)
    tr.step.model.train()
    batches = src.batches(0)
    gen_params = [p.detach().clone() for p in src.generator.parameters()]
    for round_ in range(2):
        for j in range(k):
            it = round_ * k + j
            student0 = snapshot(tr.student)
            batch = next(batches)
            assert batch["image"].shape == (4, 3, 32, 32) and "label" not in batch
            out = tr.step(batch, it)  # the student's step, then the source's own (the generator's every k-th)
            terms = {n: v for n, v in out.items() if n in tr.step.loss_names}
            side = {n: v for n, v in out.items() if n not in tr.step.loss_names}
            assert set(terms) == {"dfad/l1"} and set(side) == ({"gen/l1", "gen/bn"} if bn_weight != "0" else {"gen/l1"})
            assert changed(student0, tr.student), f"iteration {it}: no student update"
            now = list(src.generator.parameters())
            moved = any(not torch.equal(a, b) for a, b in zip(gen_params, now))
            assert moved == (j == k - 1), f"iteration {it}: generator moved={moved}"
            gen_params = [p.detach().clone() for p in now]
        assert int(src.optimizer.state_dict()["state"][0]["step"]) == round_ + 1  # one Adam step per round
    for name, v in tr.teacher.state_dict().items():
        assert torch.equal(v, teacher0[name]), f"teacher {name} changed (BN statistics included)"
    assert not any(m.training for m in tr.teacher.model.modules())
    assert all(p.grad is None for p in tr.teacher.parameters())


def test_generator_gradient_raises_the_discrepancy(random_teacher, tmp_path):
    """One generator step on a fixed z increases mean |S - T| on that z (same student, same dropout masks)."""
    tr = dfad_trainer(tmp_path, random_teacher, "--gen-lr", "1e-3")
    src = tr.source
    tr.step.model.train()
    z = src.latent(0, 1)

    def discrepancy():
        torch.manual_seed(123)
        with torch.no_grad():
            return src.generator_loss(z)[1].item()

    before = discrepancy()
    loss, l1, _ = src.generator_loss(z)
    grads = torch.autograd.grad(loss, list(src.generator.parameters()))
    assert loss.item() == pytest.approx(-np.log1p(l1.item()), rel=1e-6)
    with torch.no_grad():  # a small plain gradient-descent step on L_G
        for p, g in zip(src.generator.parameters(), grads):
            p -= 1e-3 * g / (torch.cat([x.flatten() for x in grads]).norm() + 1e-12)
    assert discrepancy() > before


@pytest.mark.parametrize("schedule", ["poly", "step"])
def test_step_schedule_decays_the_generator_with_the_student(random_teacher, tmp_path, schedule):
    """DFAD's --scheduler: StepLR on both optimizers. --schedule step multiplies the student's and the generator's
    learning rates by --step-gamma at each part of the run; poly decays the student's alone."""
    tr = dfad_trainer(tmp_path, random_teacher, "--gen-every", "2", "--schedule", schedule, "--step-parts", "2",
                      "--step-gamma", "0.3", "--gen-lr", "0.002")
    batches = tr.source.batches(0)
    tr.step.model.train()
    seen = []
    for it in (0, 4, 5, 9):  # iters 10 in two parts: 0..4 at x1, 5..9 at x0.3
        tr.step(next(batches), it)
        seen.append((tr.step.optimizer.param_groups[0]["lr"], tr.source.optimizer.param_groups[0]["lr"]))
    if schedule == "step":
        assert seen == [pytest.approx((0.1, 0.002)), pytest.approx((0.1, 0.002)), pytest.approx((0.03, 0.0006)),
                        pytest.approx((0.03, 0.0006))]
    else:
        assert [g for _, g in seen] == [0.002] * 4 and seen[1][0] == pytest.approx(0.1 * 0.6 ** 0.9)


def test_aux_head_needs_labels(random_teacher, tmp_path):
    with pytest.raises(ValueError, match=r"--aux-weight 0.4: --method dfad trains without labels"):
        dfad_trainer(tmp_path, random_teacher, "--aux-weight", "0.4")
