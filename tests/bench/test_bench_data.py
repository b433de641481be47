"""bench/bench_data.py: a --small run goes end to end through the DALI and torch loaders and writes its tables."""
from pathlib import Path

import pytest

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")  # the benchmark compares DALI to torch


def test_bench_data_small(tmp_path):
    """bench/bench_data.py runs end to end on tiny settings and writes its tables (figures not checked)."""
    import json
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, str(root / "bench" / "bench_data.py"), "--small", "--dataset", "synthetic",
                        "--steps", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (js,) = tmp_path.glob("data_*_small.json")
    (md,) = tmp_path.glob("data_*_small.md")
    res = json.loads(js.read_text())
    assert {(r["loader"], r["workers"], r["rotate"]) for r in res["throughput"]} == \
        {(k, 1, r) for k in ("dali", "torch") for r in (0.0, 10.0)}
    assert all(r["images_per_s"] > 0 for r in res["throughput"])
    assert {s["loader"] for s in res["steps"]} == {"dali", "torch"}
    assert all(0 <= s["wait_frac"] <= 1 and s["step_ms"] >= s["wait_ms"] for s in res["steps"])
    assert md.read_text().startswith("# Data loading benchmark on ") and "| dali | 1 | 10 |" in md.read_text()
