"""bench/bench_kernels.py runs end to end (tiny shapes) and writes its table; GPU figures are not checked here."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _bench(tmp_path, *flags):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SEGKD_KERNELS")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_kernels.py"), "--small", "--reps", "1",
                          "--out", str(tmp_path), *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (md,) = tmp_path.glob("kernels_*_small.md")
    (js,) = tmp_path.glob("kernels_*_small.json")
    return md.read_text(), json.loads(js.read_text())


def test_bench_small_all_ops(tmp_path):
    md, res = _bench(tmp_path, "--providers", "eager,ours")  # no torch.compile: minutes of Inductor on a GPU
    ops = {r["op"] for r in res["rows"]}
    assert ops == {"pixel_kl", "channel_kl", "angular", "masked_avg_pool", "bn_stat", "prototype_kl", "prototype_logits",
                   "prototype_ce", "upsampled_ce", "pairwise"}
    for op in ops:
        for provider in ("eager", "ours"):
            for mode in ("fwd", "fwd+bwd"):
                assert any(r["op"] == op and r["provider"] == provider and r["pass"] == mode for r in res["rows"]), \
                    (op, provider, mode)
    assert all(r["ms"] > 0 and r["GB/s"] > 0 and r["copy_frac"] > 0 for r in res["rows"])
    assert float(res["meta"]["copy bandwidth (GB/s, measured)"]) > 0
    assert md.startswith("# Kernel benchmark on ") and "| pixel_kl |" in md


def test_bench_interpreted_triton_provider(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("--interpret is a CPU-only mode")
    md, res = _bench(tmp_path, "--interpret", "--op", "masked_avg_pool")
    assert res["meta"]["ours runs"] == "triton (interpreted)"
    assert {"eager", "ours"} <= {r["provider"] for r in res["rows"]} <= {"eager", "ours", "cpp"}  # cpp: csrc/
