"""engine/compare.py: teacher and student side by side (cost counted, latency timed, mIoU as evaluate.py scores)."""
import json

import pytest
import torch

from engine import compare as compare_cli
from engine import evaluate as evaluate_cli
from engine.models import build_model, model_cost
from engine.train import main as train
from test_faults import FAST, USAGE, fails


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pair")
    common = [*FAST, "--cache-dir", str(tmp / "cache"), "--iters", "2"]
    train([*common, "--method", "none", "--student", "deeplabv3_tiny", "--out", str(tmp / "t")])
    train([*common, "--method", "kd", "--teacher", "deeplabv3_tiny", "--teacher-ckpt", str(tmp / "t" / "last.pt"),
           "--out", str(tmp / "s")])
    return tmp / "t" / "last.pt", tmp / "s" / "last.pt"


def test_the_table_counts_times_and_scores_both_models(pair, tmp_path, capsys):
    teacher, student = pair
    rows = compare_cli.main(["--teacher", str(teacher), "--student", str(student), "--size", "48,64",
                             "--repeats", "2", "--val-size", "4", "--out", str(tmp_path)])
    for role, arch in (("teacher", "deeplabv3_tiny"), ("student", "pspnet_tiny")):
        params, flops = model_cost(arch, 8, (48, 64))
        assert rows[role]["arch"] == arch and rows[role]["params"] == params
        assert rows[role]["gflops"] == pytest.approx(flops / 1e9)
        assert rows[role]["ms_batch1"] > 0 and rows[role]["ms_batch8"] > 0 and rows[role]["peak_mb_batch8"] > 0
    scored = evaluate_cli.main(["--ckpt", str(student), "--val-size", "4", "--workers", "0"])
    assert rows["student"]["miou"] == pytest.approx(scored["miou"])
    printed = capsys.readouterr().out
    ratio = rows["teacher"]["gflops"] / rows["student"]["gflops"]
    assert f"student: {ratio:.1f}x fewer FLOPs" in printed
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["verdict"] in (tmp_path / "compare.md").read_text()


def test_a_raw_teacher_needs_its_architecture(capfd, pair, tmp_path):
    teacher, student = pair
    raw = tmp_path / "raw.pt"
    torch.save(build_model("deeplabv3_tiny", 8).state_dict(), raw)
    fails(capfd, tmp_path, ["--teacher", str(raw), "--student", str(student)], USAGE,
          "is not a segkd checkpoint: give its architecture with --teacher-arch", command=compare_cli)
    rows = compare_cli.main(["--teacher", str(raw), "--teacher-arch", "deeplabv3_tiny", "--student", str(student),
                             "--size", "32", "--repeats", "1", "--val-size", "2", "--out", str(tmp_path)])
    assert rows["teacher"]["arch"] == "deeplabv3_tiny"


def test_cpu_peak_memory_grows_with_the_input():
    """The CPU figure is a fresh process's resident-set growth: 16x the pixels must cost clearly more."""
    small = compare_cli.peak_mb(None, (64, 64), torch.device("cpu"), None, "pspnet_small", 8)
    large = compare_cli.peak_mb(None, (256, 256), torch.device("cpu"), None, "pspnet_small", 8)
    assert 0 < small < large and large - small > 20, (small, large)
