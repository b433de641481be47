"""engine/train.py with --method dfad / dfss end to end: ADS cache, bad input, accuracy, exact resume, torchrun."""
import json

import pytest
import torch

from datafree_testing import CROP, FAST, IN_POOL, ROOT, random_teacher, run  # noqa: F401  (fixture)
from engine.checkpoint import load_checkpoint
from engine.data import build_dataset, build_val_loader
from engine.datafree import ads
from engine.datafree.pool import list_images
from engine.evaluate import evaluate
from engine.models import build_model


def test_dfss_selection_cache_pictures_and_fallback(teacher, pool, tmp_path, capsys, monkeypatch):
    args = ["--method", "dfss", "--teacher-ckpt", teacher, "--aux-data", str(pool), "--iters", "2",
            "--ads-keep", str(IN_POOL)]
    run(tmp_path, *args, "--out", str(tmp_path / "a"))
    first = capsys.readouterr().out
    assert "ADS: scoring" in first and f"kept {IN_POOL} of" in first
    for name in ("ads_selection.png", "ads_scores.png", "ads_scores.json"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    record = json.loads((tmp_path / "a" / "ads_scores.json").read_text())
    assert sum(record["kept"]) == IN_POOL and len(record["files"]) == len(list_images(pool))
    cached = list((pool / ".segkd-ads").glob("*.json"))
    assert len(cached) == 1

    def no_rescoring(*a, **k):
        raise AssertionError("rescored although the scores are cached")

    monkeypatch.setattr(ads, "score_pool", no_rescoring)
    run(tmp_path, *args, "--out", str(tmp_path / "b"))
    assert f"using the scores of {len(record['files'])} pool images cached in {cached[0]}" in capsys.readouterr().out
    assert (json.loads((tmp_path / "b" / "ads_scores.json").read_text())["kept"] == record["kept"])
    monkeypatch.undo()

    # a pool that cannot be written: the cache goes to the cache dir, and is found there next time
    real_save = ads.save_cache

    def read_only_pool(candidates, payload):
        return real_save([c for c in candidates if pool not in c.parents], payload)

    monkeypatch.setattr(ads, "save_cache", read_only_pool)
    run(tmp_path, *args, "--ads-layers", "last-3", "--out", str(tmp_path / "c"))
    assert "ADS: scores cached in " + str(tmp_path / "cache" / "ads") in capsys.readouterr().out
    monkeypatch.setattr(ads, "score_pool", no_rescoring)
    run(tmp_path, *args, "--ads-layers", "last-3", "--out", str(tmp_path / "d"))
    assert "cached in " + str(tmp_path / "cache" / "ads") in capsys.readouterr().out


def test_data_free_bad_input(random_teacher, pool, tmp_path):
    base = ["--teacher-ckpt", random_teacher, "--teacher", "pspnet_tiny", "--iters", "1", "--out", str(tmp_path / "x")]
    with pytest.raises(ValueError, match="--method dfss needs --aux-data DIR"):
        run(tmp_path, "--method", "dfss", *base)
    with pytest.raises(FileNotFoundError, match="--aux-data .*nowhere"):
        run(tmp_path, "--method", "dfss", "--aux-data", str(tmp_path / "nowhere"), *base)
    with pytest.raises(ValueError, match="dfad and dfss each bring their own training inputs"):
        run(tmp_path, "--method", "dfad+dfss", "--aux-data", str(pool), *base)
    with pytest.raises(ValueError, match="--gen-size must be positive multiples of 16"):
        run(tmp_path, "--method", "dfad", "--gen-size", "30", *base)


def random_student_miou(n_val=24, num_classes=8):
    """mIoU of the student every run starts from (same seed, same architecture) on the first n_val val images."""
    torch.manual_seed(0)
    model = build_model("pspnet_tiny", num_classes)
    val = torch.utils.data.Subset(build_dataset("synthetic", "val"), range(n_val))
    return evaluate(model, build_val_loader(val, 4, workers=0), num_classes, torch.device("cpu"))["miou"]


def test_data_free_students_beat_a_random_one_end_to_end(teacher, pool, tmp_path):
    random_miou = random_student_miou()
    dfss = run(tmp_path, "--method", "dfss", "--teacher-ckpt", teacher, "--aux-data", str(pool), "--iters", "60",
               "--crop", str(CROP), "--out", str(tmp_path / "dfss"))
    # DFAD needs the BN prior to get past "background everywhere" this fast (without it: see the slow test)
    dfad = run(tmp_path, "--method", "dfad", "--teacher-ckpt", teacher, "--iters", "150", "--gen-size", str(CROP),
               "--gen-batch", "8", "--bn-weight", "0.1", "--out", str(tmp_path / "dfad"))
    assert dfss["teacher_miou"] > random_miou + 0.1
    for name, r in (("dfss", dfss), ("dfad", dfad)):
        assert r["miou"] > random_miou + 0.04, f"{name}: {r['miou']:.3f}, random {random_miou:.3f}"
    log = [json.loads(line) for line in (tmp_path / "dfad" / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["kind"] == "train"]
    assert set(train[0]["terms"]) == {"dfad/l1", "gen/l1", "gen/bn"}
    assert train[0]["loss"] == pytest.approx(train[0]["terms"]["dfad/l1"])  # generator terms are not the loss


@pytest.mark.slow
def test_data_free_students_get_close_to_the_teacher(teacher, pool, tmp_path):
    """Longer runs: DFSS (on a pool holding val images) and DFAD with the BN prior reach most of the
    teacher's mIoU, plain DFAD clearly beats a random student (about 3 minutes on 2 CPU cores)."""
    random_miou = random_student_miou(50)
    common = ["--teacher-ckpt", teacher, "--crop", str(CROP), "--batch-size", "8", "--val-size", "50"]
    dfss = run(tmp_path, "--method", "dfss", *common, "--aux-data", str(pool), "--iters", "300",
               "--out", str(tmp_path / "dfss"))
    gen = ["--method", "dfad", *common, "--iters", "1500", "--gen-size", str(CROP), "--gen-batch", "16"]
    dfad = run(tmp_path, *gen, "--out", str(tmp_path / "dfad"))
    dfad_bn = run(tmp_path, *gen, "--bn-weight", "0.1", "--out", str(tmp_path / "dfad_bn"))
    teacher_miou = dfss["teacher_miou"]
    assert dfss["miou"] > 0.8 * teacher_miou, (dfss["miou"], teacher_miou)
    assert dfad_bn["miou"] > 0.6 * teacher_miou, (dfad_bn["miou"], teacher_miou)
    assert dfad["miou"] > random_miou + 0.05, (dfad["miou"], random_miou)


@pytest.mark.parametrize("method", ["dfad", "dfss"])
def test_resume_is_exact(method, random_teacher, pool, tmp_path):
    """2N iterations straight == N, checkpoint, resume, N more: same student, generator / selection, Adam state."""
    common = ["--method", method, "--teacher-ckpt", random_teacher, "--teacher", "pspnet_tiny", "--iters", "6",
              "--ckpt-interval", "3", "--keep-ckpts", "5", "--gen-size", "32", "--gen-batch", "4", "--gen-every", "2",
              "--aux-data", str(pool), "--bn-weight", "0.05"]
    run(tmp_path, *common, "--out", str(tmp_path / "straight"))
    mid = tmp_path / "straight" / "ckpt_0000003.pt"
    run(tmp_path, *common, "--out", str(tmp_path / "resumed"), "--resume", str(mid))
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("straight", "resumed"))
    assert a["iteration"] == b["iteration"] == 6 and "source" in a
    for name, v in a["model"].items():
        assert torch.equal(v, b["model"][name]), f"student {name} differs after resume"

    def same(x, y, where):
        if torch.is_tensor(x):
            assert torch.equal(x, y), where
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x:
                same(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (p, q) in enumerate(zip(x, y)):
                same(p, q, f"{where}[{i}]")
        else:
            assert x == y, where

    same(a["source"], b["source"], "source")
    if method == "dfad":
        m = load_checkpoint(mid)["source"]["generator"]
        assert any(not torch.equal(m[k], a["source"]["generator"][k]) for k in m)  # it did train after resuming


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dfad", "dfss"])
def test_torchrun_two_gloo_processes(method, random_teacher, pool, tmp_path):
    """Both methods run under torchrun with 2 gloo processes (dfss: rank 0 scores and broadcasts the selection;
    dfad: the generator's gradients are averaged over the ranks) and rank 0 alone reports and saves."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "engine" / "train.py"), *FAST, "--method", method, "--teacher-ckpt", random_teacher,
           "--teacher", "pspnet_tiny", "--iters", "4", "--gen-size", "32", "--gen-batch", "4", "--gen-every", "2",
           "--aux-data", str(pool), "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.count("segkd summary") == 1
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["iteration"] == 4 and "source" in ckpt
