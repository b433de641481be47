"""Every Triton kernel compiles for an H100 (sm_90) without a GPU: catches what the interpreter forgives."""
import json
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


@pytest.mark.slow  # ~40 s: 40 kernel variants through the full Triton -> PTX -> cubin pipeline
def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, os.path.join(HERE, "aot_compile.py"), "--arch", "90"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    assert ", 0 failed" in out.stdout


# ---------------------------------------------------------------- prototype_kl at the workload (issue 12)
_PROTOTYPE_VARIANTS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import aot_compile as ac
from triton.backends.compiler import GPUTarget
calls = []
for name, obj in list(vars(ac.prototype).items()):
    if isinstance(obj, ac.JITFunction):
        setattr(ac.prototype, name, ac.Recorder(obj, calls))
ac.dispatch.INTERPRETED = False
b, d, k = 8, 512, int(sys.argv[2])  # APD at the workload: decoder features after the projector, 64 x 128 pixels
f = torch.empty(b, d, 64, 128)
ac.prototype.prototype_kl_forward(f, f, torch.randn(b, k, d), torch.randn(b, k, d),
                                  torch.ones(b, k, dtype=torch.bool), 0.1, True, True)
for fn, args, kw in calls:
    c = ac.compile_call(fn, args, dict(kw), GPUTarget("cuda", 90, 32))
    print(json.dumps({"kernel": fn.__name__, "ir": c.asm["ttir"] + c.asm["ttgir"],
                      "info": ac.ptxas_info(c.asm["ptx"], 90)}))
"""


def prototype_variants(k):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", _PROTOTYPE_VARIANTS, HERE, str(k)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow  # ~10 s: one K through Triton -> PTX -> cubin
@pytest.mark.parametrize("k", [19, pytest.param(150, marks=pytest.mark.xfail(
    strict=True, reason="K_PAD = 256 spills ~1 KB per thread with tf32x3 dots (issue 12, not yet tuned)"))])
def test_prototype_kl_is_deterministic_and_spill_free_at_the_workload(k):
    variants = prototype_variants(k)
    assert variants
    for v in variants:
        # dL/dA_hat is reduced in two stages: a reintroduced atomic makes the gradient non-deterministic.
        assert "atomic" not in v["ir"], v["kernel"]
        print(k, v["kernel"], v["info"])  # registers and spills, with -s
        spill = re.search(r"spill (\d+) B", v["info"])
        assert spill and int(spill.group(1)) == 0, (k, v["info"])
