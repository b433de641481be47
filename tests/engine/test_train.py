"""End to end through the CLI: every method, torchrun with 2 gloo processes, exact resume, teacher caching,
evaluation, and each bad input's error."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_testing import FAST, run, teacher  # noqa: F401  (fixture)
from engine.checkpoint import load_checkpoint
from engine.methods import METHODS, Method

ROOT = Path(__file__).resolve().parents[2]


# Data-free methods train on inputs of their own, without cross-entropy:
# tests/engine/datafree/test_datafree_runs.py runs them.
def brings_inputs(cls):
    """A data-free method: it trains on inputs of its own (a TrainSource), not on the labelled split."""
    return cls.train_source is not Method.train_source


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none" and not brings_inputs(METHODS[m])] + ["cad+kd"])
def test_every_method_trains_end_to_end(method, teacher, tmp_path):
    out = tmp_path / "run"
    result = run(tmp_path, "--method", method, "--teacher-ckpt", teacher, "--iters", "3", "--out", str(out))
    assert 0.0 <= result["miou"] <= 1.0 and 0.0 <= result["teacher_miou"] <= 1.0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(np.isfinite(r["loss"]) for r in train)
    terms = set(train[-1]["terms"])
    assert "ce" in terms and any(t.startswith(method.split("+")[0] + "/") for t in terms)
    assert [r for r in records if r["kind"] == "eval"]
    for name in ("results.json", "curves.png", "samples.png", "config.json", "last.pt"):
        assert (out / name).exists(), name
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["complete"] and ckpt["iteration"] == 3


def test_cli_subprocess_prints_summary(teacher, tmp_path):
    cmd = [sys.executable, str(ROOT / "engine" / "train.py"), *FAST, "--method", "kd", "--teacher-ckpt", teacher,
           "--iters", "2", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "segkd summary" in p.stdout and "pspnet_tiny + kd" in p.stdout and "teacher" in p.stdout


def test_torchrun_two_gloo_processes_and_evaluate_agree(teacher, tmp_path):
    """2-process DDP run; the mIoU it reports equals evaluate.py on 1 process and on 2."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd = [*torchrun, str(ROOT / "engine" / "train.py"), *FAST, "--val-size", "7", "--method", "cad",
           "--teacher-ckpt", teacher, "--iters", "3", "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.count("segkd summary") == 1  # rank 0 alone reports
    reported = json.loads((out / "results.json").read_text())["miou"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["val_size"] == 7
    # the saved model, scored by evaluate.py on 1 process and on 2, on the same 7 images
    ev = [str(ROOT / "engine" / "evaluate.py"), "--ckpt", str(out / "last.pt"), "--workers", "0", "--val-size", "7"]
    one = subprocess.run([sys.executable, *ev, "--json", str(tmp_path / "one.json")], capture_output=True,
                         text=True, timeout=300, env=env)
    two = subprocess.run([*torchrun, *ev, "--json", str(tmp_path / "two.json")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert r1["miou"] == pytest.approx(r2["miou"], abs=1e-12)
    assert r1["miou"] == pytest.approx(reported, abs=1e-12)  # ranks evaluated the model that was saved
    assert "mIoU" in one.stdout and "background" in one.stdout  # per-class table with class names
    assert 0.0 <= reported <= 1.0


def test_resume_is_exact(teacher, tmp_path):
    """2N iterations straight == N, then resume, then N more: identical weights (CPU)."""
    common = ["--method", "cad", "--teacher-ckpt", teacher, "--iters", "6", "--ckpt-interval", "3",
              "--keep-ckpts", "5"]
    run(tmp_path, *common, "--out", str(tmp_path / "straight"))
    mid = tmp_path / "straight" / "ckpt_0000003.pt"
    assert load_checkpoint(mid)["iteration"] == 3
    run(tmp_path, *common, "--out", str(tmp_path / "resumed"), "--resume", str(mid))
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["iteration"] == b["iteration"] == 6
    for key in ("model", "method_state"):
        for name, v in a[key].items():
            assert torch.equal(v, b[key][name]), f"{key}.{name} differs after resume"
    # and a resumed run did move on from the checkpoint
    m = load_checkpoint(mid)["model"]
    assert any(not torch.equal(m[k], a["model"][k]) for k in m if m[k].is_floating_point())


def test_resume_auto_finishes_a_complete_run_without_training(teacher, tmp_path):
    args = ["--method", "kd", "--teacher-ckpt", teacher, "--iters", "2", "--out", str(tmp_path / "r")]
    first = run(tmp_path, *args)
    mtime = (tmp_path / "r" / "last.pt").stat().st_mtime_ns
    second = run(tmp_path, *args)  # --resume auto is the default
    assert second["miou"] == pytest.approx(first["miou"])
    assert (tmp_path / "r" / "last.pt").stat().st_mtime_ns == mtime


def test_teacher_is_frozen(teacher, tmp_path):
    from engine.config import parse_config
    from engine.dist import DistEnv
    from engine.trainer import Trainer

    cfg = parse_config([*FAST, "--method", "cad", "--teacher-ckpt", teacher, "--iters", "2",
                        "--out", str(tmp_path / "f")])
    tr = Trainer(cfg, DistEnv())
    before = {k: v.clone() for k, v in tr.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in tr.student.state_dict().items()}
    tr.distiller.train()
    tr.teacher.train()  # must stay in eval mode
    assert not tr.teacher.training and not any(m.training for m in tr.teacher.modules())
    loader = iter(__import__("engine.data", fromlist=["x"]).build_train_loader(tr.train_set, 2, workers=0))
    for it in range(2):
        tr.step(next(loader), it)
    for k, v in tr.teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher {k} changed (BN statistics included)"
    assert all(p.grad is None and not p.requires_grad for p in tr.teacher.parameters())
    assert any(not torch.equal(v, student_before[k]) for k, v in tr.student.state_dict().items())


def test_default_teacher_is_trained_then_cached(tmp_path, capsys):
    args = ["--method", "kd", "--teacher-iters", "2", "--iters", "2", "--teacher", "pspnet_tiny"]
    run(tmp_path, *args, "--out", str(tmp_path / "a"))
    first = capsys.readouterr().out
    assert "no --teacher-ckpt given: training the teacher pspnet_tiny" in first
    run(tmp_path, *args, "--out", str(tmp_path / "b"), "--baseline")
    second = capsys.readouterr().out
    assert "using the cached teacher pspnet_tiny" in second and "training the teacher" not in second
    assert "pspnet_tiny alone" in second and "not cached" not in second  # --baseline trained it
    run(tmp_path, *args, "--out", str(tmp_path / "c"))
    assert "cached:" in capsys.readouterr().out  # the baseline is now cached for the closing table


# ------------------------------------------------------------------ bad input: a clear error, nothing lost
def test_unknown_method_and_model(tmp_path):
    with pytest.raises(ValueError, match="unknown --method 'bogus'.*valid methods: none, kd"):
        run(tmp_path, "--method", "bogus")
    with pytest.raises(ValueError, match="pspnet_r18"):
        run(tmp_path, "--method", "none", "--student", "resnet_bogus", "--out", str(tmp_path / "x"))


def test_teacher_with_other_class_count(tmp_path):
    from engine.models import build_model

    path = tmp_path / "t19.pt"
    torch.save(build_model("pspnet_tiny", 19).state_dict(), path)
    with pytest.raises(ValueError, match=r"t19\.pt predicts 19 classes but dataset synthetic has \d+"):
        run(tmp_path, "--method", "kd", "--teacher", "pspnet_tiny", "--teacher-ckpt", str(path),
            "--out", str(tmp_path / "x"))


def test_missing_data_root(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match="nowhere"):
        run(tmp_path, "--method", "none", "--dataset", "camvid", "--data-root", str(tmp_path / "nowhere"),
            "--out", str(tmp_path / "x"))


def test_bad_label_value_names_file_and_value(tmp_path):
    from PIL import Image

    root = tmp_path / "camvid"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(4):
            Image.fromarray(np.full((24, 32, 3), 100, np.uint8)).save(root / split / f"f{i}.png")
            lab = np.full((24, 32), 3, np.uint8)
            if split == "train" and i == 2:
                lab[5, 5] = 42
            Image.fromarray(lab).save(root / f"{split}annot" / f"f{i}.png")
    with pytest.raises(ValueError, match=r"f2\.png.*42"):
        run(tmp_path, "--method", "none", "--dataset", "camvid", "--data-root", str(root), "--iters", "4",
            "--out", str(tmp_path / "x"))


def test_non_finite_loss_names_iteration_and_term_and_keeps_checkpoint(teacher, tmp_path, monkeypatch):
    from engine.methods import kd as kd_module
    from engine.meter import NonFiniteLossError

    calls = {"n": 0}
    original = kd_module.KD.forward

    def poisoned(self, s, t, batch):
        calls["n"] += 1
        terms = original(self, s, t, batch)
        if calls["n"] == 5:  # the 5th iteration
            terms["kd"] = terms["kd"] * float("nan")
        return terms

    monkeypatch.setattr(kd_module.KD, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"iteration 5: term\(s\) kd/kd.*last good checkpoint"):
        run(tmp_path, "--method", "kd", "--teacher-ckpt", teacher, "--iters", "8", "--ckpt-interval", "4",
            "--log-interval", "3", "--out", str(out))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_resume_from_another_model_or_method(teacher, tmp_path):
    run(tmp_path, "--method", "kd", "--teacher-ckpt", teacher, "--iters", "2", "--out", str(tmp_path / "kd"))
    ckpt = str(tmp_path / "kd" / "last.pt")
    with pytest.raises(ValueError, match="method 'kd'.*this run trains method 'cad'"):
        run(tmp_path, "--method", "cad", "--teacher-ckpt", teacher, "--resume", ckpt, "--out", str(tmp_path / "y"))
    with pytest.raises(ValueError, match="model 'pspnet_tiny'.*this run trains model 'deeplabv3_tiny'"):
        run(tmp_path, "--method", "kd", "--student", "deeplabv3_tiny", "--teacher-ckpt", teacher, "--resume", ckpt,
            "--out", str(tmp_path / "z"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    for name, msg in (("junk.pt", "junk.pt could not be read"), ("foreign.pt", "foreign.pt is not a segkd checkpoint")):
        with pytest.raises(ValueError, match=msg):
            run(tmp_path, "--method", "kd", "--teacher-ckpt", teacher, "--resume", str(tmp_path / name),
                "--out", str(tmp_path / "w"))


def test_sync_bn_on_cpu_is_refused_clearly(teacher, tmp_path):
    from engine.config import parse_config
    from engine.dist import DistEnv
    from engine.trainer import Trainer

    cfg = parse_config([*FAST, "--method", "kd", "--teacher-ckpt", teacher, "--sync-bn", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--sync-bn needs CUDA"):
        Trainer(cfg, DistEnv(rank=0, world_size=2))


def test_skip_bad_samples_through_the_cli(tmp_path, monkeypatch):
    import tempfile

    from fake_datasets import make_camvid

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the skip logs go
    root = make_camvid(tmp_path / "data", splits=(("train", 6), ("val", 2)))
    bad = sorted((Path(root) / "train").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    args = ["--method", "none", "--dataset", "camvid", "--data-root", str(root), "--iters", "6",
            "--crop", "16", "--loader", "torch"]
    with pytest.raises(ValueError, match=bad.name):
        run(tmp_path, *args, "--out", str(tmp_path / "strict"))
    result = run(tmp_path, *args, "--skip-bad-samples", "--out", str(tmp_path / "skip"))
    assert result["skipped_files"] == 1


def test_val_split_chooses_what_the_trainer_evaluates(tmp_path, capsys):
    """--val-split test evaluates CamVid's test split (as DFAD reports): the run's mIoU is that split's, the
    closing lines name it; a split the dataset lacks is one line naming the flag."""
    from fake_datasets import make_camvid

    from engine.checkpoint import load_model
    from engine.data import build_dataset, build_val_loader
    from engine.evaluate import evaluate

    root = make_camvid(tmp_path / "data", splits=(("train", 4), ("val", 2), ("test", 3)), seed=11)
    args = ["--method", "none", "--dataset", "camvid", "--data-root", str(root), "--iters", "2", "--crop", "16",
            "--loader", "torch", "--val-size", "0"]
    result = run(tmp_path, *args, "--val-split", "test", "--out", str(tmp_path / "t"))
    out = capsys.readouterr().out
    assert "on camvid test:" in out and "segkd summary: camvid test" in out
    model, _ = load_model(tmp_path / "t" / "last.pt")
    split = {}
    for name in ("test", "val"):
        ds = build_dataset("camvid", name, root=str(root))
        split[name] = evaluate(model, build_val_loader(ds, 2, workers=0), ds.num_classes, torch.device("cpu"),
                               ignore_index=ds.ignore_index)["miou"]
    assert result["miou"] == pytest.approx(split["test"], abs=1e-6)
    assert split["test"] != pytest.approx(split["val"], abs=1e-6)  # the two splits do tell apart
    with pytest.raises(ValueError, match=r"--val-split 'holdout': camvid has splits"):
        run(tmp_path, *args, "--val-split", "holdout", "--out", str(tmp_path / "x"))


def test_val_resize_evaluates_resized_images_and_labels(tmp_path):
    """--val-resize 12: the run's mIoU is that of the val split with images and labels resized to a shorter side
    of 12 (and differs from the native-size evaluation); it does not shape the run, so a resume may change it."""
    from fake_datasets import make_camvid

    from engine.checkpoint import load_model
    from engine.data import build_dataset, build_val_loader
    from engine.evaluate import evaluate

    root = make_camvid(tmp_path / "data", splits=(("train", 4), ("val", 3)), seed=5)
    args = ["--method", "none", "--dataset", "camvid", "--data-root", str(root), "--iters", "2", "--crop", "16",
            "--loader", "torch", "--val-size", "0", "--out", str(tmp_path / "t")]
    result = run(tmp_path, *args, "--val-resize", "12")
    model, _ = load_model(tmp_path / "t" / "last.pt")
    got = {}
    for short in (12, 0):
        ds = build_dataset("camvid", "val", root=str(root))
        ds.eval_resize = short
        if short:
            assert min(ds[0]["label"].shape) == 12
        got[short] = evaluate(model, build_val_loader(ds, 2, workers=0), ds.num_classes, torch.device("cpu"),
                              ignore_index=ds.ignore_index)["miou"]
    assert result["miou"] == pytest.approx(got[12], abs=1e-6) and got[12] != pytest.approx(got[0], abs=1e-6)
    again = run(tmp_path, *args, "--val-resize", "0", "--iters", "3")  # resumes from iteration 2
    assert 0 <= again["miou"] <= 1


def test_val_resize_long_side_scores_at_the_labels_size(tmp_path):
    """--val-resize N --val-resize-side long (semseg's base_size): the image alone is resized to a longer side of
    N and the logits are scored against the label at its own size."""
    from fake_datasets import make_camvid

    from engine.checkpoint import load_model
    from engine.data import build_dataset
    from engine.evaluate import whole_logits
    from engine.metrics import ConfusionMatrix

    root = make_camvid(tmp_path / "data", splits=(("train", 4), ("val", 2)), seed=6)
    result = run(tmp_path, "--method", "none", "--dataset", "camvid", "--data-root", str(root), "--iters", "2",
                 "--crop", "16", "--loader", "torch", "--val-size", "0", "--batch-size", "2",
                 "--val-resize", "20", "--val-resize-side", "long", "--out", str(tmp_path / "t"))
    model, _ = load_model(tmp_path / "t" / "last.pt")
    ds = build_dataset("camvid", "val", root=str(root))
    cm = ConfusionMatrix(ds.num_classes, torch.device("cpu"), ds.ignore_index)
    for i in range(len(ds)):  # by hand: resize the image, upsample the logits to the native label
        _, rgb, label = ds.load_checked(i)
        h, w = rgb.shape[:2]
        size = (20, round(20 * w / h)) if h >= w else (round(20 * h / w), 20)
        ds.eval_resize, ds.eval_resize_side = 20, "long"
        small = ds[i]
        ds.eval_resize = 0
        assert small["image"].shape[-2:] == size and small["label"].shape == label.shape
        with torch.no_grad():
            logits = whole_logits(model, small["image"][None])
        logits = torch.nn.functional.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False)
        cm.update(logits.argmax(1), torch.from_numpy(label.astype(np.int64))[None])
    assert result["miou"] == pytest.approx(cm.compute()["miou"], abs=1e-6)
    from engine.evaluate import main as evaluate_main  # re-scored standalone: the checkpoint's resizing by default

    again = evaluate_main(["--ckpt", str(tmp_path / "t" / "last.pt"), "--workers", "0", "--device", "cpu"])
    assert again["miou"] == pytest.approx(result["miou"], abs=1e-6)


def test_settings_added_later_keep_the_cache_keys_at_their_defaults():
    """Cached teachers and baselines are found by settings_key: flags added since (--val-split, --val-resize,
    --schedule, --step-*, --head-lr-mult, --aux-weight) enter it only away from their defaults, so a cache made
    before them is still found. The reference is the key as it was computed before those flags."""
    import dataclasses
    import hashlib

    from engine.config import Config
    from engine.runs import LATER, settings_key

    cfg = Config()
    d, o = dataclasses.asdict(cfg.data), dataclasses.asdict(cfg.optim)
    old = {"arch": "pspnet_small", "iters": 5, "world": 1, "seed": 0, "root": "",
           "data": {k: v for k, v in d.items() if k not in ("data_root", "workers", *LATER)},
           "optim": {k: v for k, v in o.items() if k != "iters" and k not in LATER}, "pretrained": ""}
    want = hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert settings_key(cfg, "pspnet_small", 5, 1) == want
    for section, name, value in (("optim", "schedule", "step"), ("optim", "head_lr_mult", 10.0),
                                 ("data", "val_resize", 256), ("model", "aux_weight", 0.4)):
        changed = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
        assert settings_key(changed, "pspnet_small", 5, 1) != want, name
