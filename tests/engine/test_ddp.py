"""engine/trainer.py under DDP: every method, 2 gloo processes under torchrun (tests/engine/ddp_all_methods.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from speed_testing import teacher  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]


def test_every_method_under_two_gloo_processes(teacher, tmp_path):
    """One torchrun launch trains every method for 2 iterations (tests/engine/ddp_all_methods.py); each rank sees
    other batches, so identical weights on both ranks mean the gradients were averaged."""
    pool = tmp_path / "pool"
    pool.mkdir()
    from PIL import Image
    for i in range(4):
        Image.fromarray((torch.rand(24, 30, 3) * 255).byte().numpy()).save(pool / f"{i}.png")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "engine" / "ddp_all_methods.py"), str(tmp_path / "w"), teacher, str(pool)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    if p.returncode != 0 and "terminate called without an active exception" in p.stderr:
        # An intermittent C++ abort of a gloo rank (about 1 CI run in 5, never reproduced locally, undiagnosed):
        # one more launch; a real failure fails twice, and every check below still applies to the run that passed
        print("first launch aborted (std::terminate in a rank); launching once more:\n" + p.stderr[-2000:])
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
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
