"""bench/gpu_suite.py: the --dry-run plan (CPU, tiny shapes, Triton interpreted) runs every part end to end, writes
its files under the device's name and ends with the table of parts; GPU figures are not checked here."""
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
PARTS = ["workload", "tests", "training", "timings", "train"]


def test_dry_run_writes_every_part(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SEGKD_KERNELS")}
    env["OMP_NUM_THREADS"] = "1"
    # a budget well above the dry run's needs: a busy host must not turn a part "incomplete"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), "--dry-run", "--budget", "300", "--out",
           str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (js,) = tmp_path.glob("gpu_suite_*_dry-run.json")
    stem = js.name[:-len(".json")]
    res = json.loads(js.read_text())
    parts = res["parts"]
    assert list(parts) == PARTS
    assert all(parts[p]["status"] == "passed" for p in PARTS), {p: parts[p]["summary"] for p in PARTS}
    assert all(parts[p]["seconds"] > 0 and parts[p]["rows"] for p in PARTS)
    assert res["meta"]["kernels"].startswith("Triton, interpreted")

    # correctness: every fused op, each dtype and layout at least once, all within tolerance
    rows = parts["workload"]["rows"]
    assert {r["op"] for r in rows} == {"pixel_kl", "channel_kl", "angular_loss", "masked_avg_pool", "prototype_kl",
                                       "prototype_logits", "prototype_ce", "upsampled_pixel_kl",
                                       "bn_stat_distance", "pairwise_similarity_loss", "class_centre_mse",
                                       "upsampled_cross_entropy", "teacher conv_bias_relu"}
    (teacher,) = [r for r in rows if r["op"] == "teacher conv_bias_relu"]  # the lean teacher, fused and not
    assert teacher["ok"] and teacher["fused ms"] > 0 and teacher["unfused ms"] > 0
    assert {(r["dtype"], r["layout"]) for r in rows} == {(d, lay) for d in ("float32", "bfloat16", "float16")
                                                         for lay in ("contiguous", "channels_last")}
    assert all(r["ok"] and r["grad rel err"] <= r["grad bound"] for r in rows)
    assert sum(r["passed"] for r in parts["tests"]["rows"]) >= 2
    training = {r["method"]: r for r in parts["training"]["rows"]}
    assert list(training) == ["kd", "cad", "apd", "cwd", "dfss", "dfad"]
    assert all(r["ok"] for r in training.values())
    assert "angular" in training["cad"]["fused calls"] and "bn_stat" in training["dfss"]["fused calls"]

    # timings and the training step: measured figures, and what needs CUDA said to be skipped
    assert all(r["ms"] > 0 for r in parts["timings"]["rows"])
    if shutil.which("c++") and shutil.which("ninja"):  # the C++ backend beside ours, op by op
        assert {r["op"] for r in parts["timings"]["rows"] if r["provider"] == "cpp"} == {
            "pixel_kl", "channel_kl", "angular", "masked_avg_pool", "bn_stat", "upsampled_ce", "pairwise"}
    assert any("torch.compile: skipped: needs CUDA" in n for n in parts["timings"]["notes"])
    train = parts["train"]["rows"]
    assert {r["method"] for r in train if r["variant"] == "default"} == {"kd", "cad", "apd", "cwd"}
    assert all(r["segkd img/s"] > 0 and 0 < r["loss share"] < 1 for r in train)
    assert all(r["ratio"] > 0 for r in train if r["variant"] == "default")
    assert any("teacher CUDA graph kd: skipped: needs CUDA" in n for n in parts["train"]["notes"])

    for suffix in (".md", ".log", "_workload.csv", "_tests.csv", "_training.csv", "_timings.csv", "_train.csv"):
        assert (tmp_path / f"{stem}{suffix}").is_file(), suffix
    md = (tmp_path / f"{stem}.md").read_text()
    assert md.startswith("# GPU suite on CPU") and "| 1a fused ops vs float64, workload shapes | passed |" in md
    assert list(tmp_path.glob("kernels_*_dry-run.md"))
    # the table of parts comes last, one line per part
    tail = proc.stdout.strip().splitlines()[-8:]
    assert tail[0].startswith("== GPU suite on ") and tail[-1].startswith("results: ")
    assert [line.split()[0] for line in tail[2:-1]] == ["1a", "1b", "1c", "2", "3"]
