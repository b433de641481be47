"""The fast step (engine/step.py and the modules it is built from), --profile (engine/profile.py) and DDP for every method.

Each speed option changes how the step runs, never what it computes: the tests train the same iterations
with and without it and compare the weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import optim
from engine.checkpoint import load_checkpoint
from engine.models import SegOutput, build_model
from engine.train import main
from engine.prefetch import DevicePrefetcher
from engine.teacher import Frozen, TeacherForward

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--crop", "32", "--batch-size", "2", "--workers", "0", "--val-size", "2", "--log-interval", "1",
        "--eval-interval", "0", "--teacher", "pspnet_tiny", "--student", "pspnet_tiny"]


def run(tmp, *args):
    return main([*FAST, "--cache-dir", str(tmp / "cache"), *args])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A randomly initialised teacher: these tests time and compare steps, they do not need a good one."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(1)
    torch.save(build_model("pspnet_tiny", 8).state_dict(), path)
    return str(path)


def weights(out):
    return load_checkpoint(Path(out) / "last.pt")["model"]


def max_difference(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


# ------------------------------------------------------------------ optimizer implementations
@pytest.mark.parametrize("impl", ["fused", "foreach", "plain", "auto"])
def test_sgd_implementations_follow_the_update_formula(impl):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ref = [p.detach().double().clone() for p in params]
    buf = [torch.zeros_like(r) for r in ref]
    lr, mom, wd = 0.1, 0.9, 1e-2
    opt, name = optim.build_sgd([{"params": params}], {"lr": lr, "momentum": mom, "weight_decay": wd}, impl,
                                torch.device("cpu"))
    assert name == ("fused" if impl == "auto" else impl)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):  # PyTorch SGD: d = g + wd p; b = mom b + d (b = d at the first step); p -= lr b
            d = g.double() + wd * ref[i]
            buf[i] = d if _ == 0 else mom * buf[i] + d
            ref[i] = ref[i] - lr * buf[i]
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().double(), r, atol=1e-6, rtol=1e-6)


def test_apex_is_optional_and_its_errors_are_clear(monkeypatch):
    groups, hyper, cpu = [{"params": [torch.nn.Parameter(torch.ones(2))]}], {"lr": 0.1}, torch.device("cpu")
    monkeypatch.setattr(optim, "apex_fused_sgd", lambda: None)
    with pytest.raises(ValueError, match="--optim-impl apex: apex is not importable"):
        optim.build_sgd(groups, hyper, "apex", cpu)
    monkeypatch.setattr(optim, "apex_fused_sgd", lambda: torch.optim.SGD)
    with pytest.raises(ValueError, match="--optim-impl apex needs CUDA"):
        optim.build_sgd(groups, hyper, "apex", cpu)
    with pytest.raises(ValueError, match="--optim-impl 'adamw' is not one of"):
        optim.build_sgd(groups, hyper, "adamw", cpu)


# ------------------------------------------------------------------ the teacher's forward
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_teacher_forward_matches_the_model_and_its_outputs_can_be_saved_for_backward(dtype):
    torch.manual_seed(0)
    model = build_model("pspnet_tiny", 8)
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        want = Frozen(model)(x)
    out = TeacherForward(Frozen(model), torch.device("cpu"), dtype)(x)
    assert isinstance(out, SegOutput)
    for w, o in zip(want, out):
        assert not o.is_inference() and not o.requires_grad
        if dtype is None:
            torch.testing.assert_close(o, w, rtol=0, atol=0)
        else:
            assert o.dtype == dtype
            rel = float((o.float() - w).norm() / w.norm())
            assert rel < 0.05, rel
    s = torch.randn_like(out.logits.float(), requires_grad=True)
    torch.nn.functional.mse_loss(s, out.logits.float()).backward()  # would fail on an inference tensor target
    torch.nn.functional.l1_loss(s, out.logits).backward()
    assert s.grad is not None


def test_teacher_cuda_graph_needs_cuda(teacher, tmp_path):
    with pytest.raises(ValueError, match="--teacher-cuda-graph needs CUDA"):
        run(tmp_path, "--method", "kd", "--teacher-ckpt", teacher, "--iters", "1", "--teacher-cuda-graph",
            "--out", str(tmp_path / "r"))


# ------------------------------------------------------------------ prefetching
class Counting:
    def __init__(self, n):
        self.n, self.taken = n, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.taken == self.n:
            raise StopIteration
        self.taken += 1
        return {"image": torch.full((1, 3, 2, 2), float(self.taken)), "index": self.taken}


@pytest.mark.parametrize("ahead", [True, False])
def test_prefetcher_keeps_order_and_reads_ahead_only_when_asked(ahead):
    source = Counting(4)
    pre = DevicePrefetcher(source, torch.device("cpu"), channels_last=True, ahead=ahead)
    first = next(pre)
    assert source.taken == (2 if ahead else 1)
    assert first["index"] == 1 and first["image"].is_contiguous(memory_format=torch.channels_last)
    assert [b["index"] for b in pre] == [2, 3, 4]


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


# ------------------------------------------------------------------ --profile
PHASES = ["data", "teacher forward", "student forward", "loss", "backward", "optimizer"]


def test_profile_prints_phases_writes_a_trace_and_trains_nothing(teacher, tmp_path, capsys):
    out = tmp_path / "prof"
    stats = run(tmp_path, "--method", "cad", "--teacher-ckpt", teacher, "--profile", "2", "--profile-warmup", "1",
                "--out", str(out))
    assert list(stats["phases"]) == PHASES
    assert all(v > 0 for v in stats["phases"].values())
    assert stats["phase_step_ms"] == pytest.approx(sum(stats["phases"].values()))
    assert stats["step_ms"] > 0 and stats["img_s"] == pytest.approx(2 * 1000 / stats["step_ms"])
    assert stats["peak_mem_mb"] > 0
    printed = capsys.readouterr().out
    for name in PHASES + ["images/s per process", "peak resident memory"]:
        assert name in printed
    assert json.loads((out / "profile" / "profile.json").read_text())["phases"].keys() == set(PHASES)
    trace = json.loads(Path(stats["trace"]).read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"segkd/teacher forward", "segkd/backward", "segkd/optimizer"} <= names
    assert not list(out.glob("*.pt")) and not (out / "log.jsonl").exists()


def test_profile_without_a_teacher_checkpoint_uses_a_random_teacher(tmp_path, capsys):
    stats = run(tmp_path, "--method", "kd", "--profile", "1", "--profile-warmup", "0", "--out", str(tmp_path / "p"))
    assert "teacher forward" in stats["phases"]
    assert "randomly initialised pspnet_tiny" in capsys.readouterr().out
    assert not (tmp_path / "cache" / "teachers").exists()  # no teacher was trained


def test_profile_of_the_data_free_methods(teacher, tmp_path):
    dfad = run(tmp_path, "--method", "dfad", "--teacher-ckpt", teacher, "--profile", "2", "--profile-warmup", "0",
               "--gen-size", "32", "--gen-batch", "2", "--gen-every", "1", "--out", str(tmp_path / "dfad"))
    assert dfad["phases"]["generator step"] > 0 and "dfad" in dfad["notes"]
    pool = tmp_path / "pool"
    pool.mkdir()
    from PIL import Image
    for i in range(4):
        Image.fromarray((torch.rand(24, 30, 3) * 255).byte().numpy()).save(pool / f"{i}.png")
    dfss = run(tmp_path, "--method", "dfss", "--teacher-ckpt", teacher, "--profile", "1", "--profile-warmup", "0",
               "--aux-data", str(pool), "--ads-batch", "2", "--out", str(tmp_path / "dfss"))
    assert "images/s" in dfss["notes"]["ADS scoring"]
    assert "ce" not in dfss["phases"] and dfss["phases"]["loss"] > 0


# ------------------------------------------------------------------ DDP: every method, 2 gloo processes
def test_every_method_under_two_gloo_processes(teacher, tmp_path):
    """One torchrun launch trains every method for 2 iterations (tests/ddp_all_methods.py); each rank sees other
    batches, so identical weights on both ranks mean the gradients were averaged."""
    pool = tmp_path / "pool"
    pool.mkdir()
    from PIL import Image
    for i in range(4):
        Image.fromarray((torch.rand(24, 30, 3) * 255).byte().numpy()).save(pool / f"{i}.png")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "ddp_all_methods.py"), str(tmp_path / "w"), teacher, str(pool)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-4000:]
    report = json.loads((tmp_path / "w" / "ddp_methods.json").read_text())
    from engine.methods import METHODS
    assert set(report) == set(METHODS) | {"cad+kd", "dfss+cad"}
    for method, r in report.items():
        assert r["ranks_see_other_batches"], (method, r)  # else equal weights would prove nothing
        assert r["max_rank_difference"] == 0.0, (method, r)
        assert r["student_change"] > 0, (method, r)
        assert r["static_graph"], method
        assert r.get("generator_rank_difference", 0.0) == 0.0, (method, r)


def test_optimizer_benchmark_runs_every_torch_implementation(tmp_path):
    from bench import bench_optim

    rows = bench_optim.main(["--small", "--student", "pspnet_tiny", "--teacher", "pspnet_tiny", "--out", str(tmp_path)])
    assert set(rows) >= {"fused", "foreach", "plain"} and all(ms > 0 for ms in rows.values())
    assert "| fused |" in next(tmp_path.glob("optim_*_small.md")).read_text()
