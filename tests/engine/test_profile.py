"""engine/profile.py: --profile prints phase times, writes a trace and trains nothing; random and data-free cases."""
import json
from pathlib import Path

import pytest
import torch

from speed_testing import run, teacher  # noqa: F401  (fixture)


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
