"""Benchmark the SGD implementations of --optim-impl on a student's parameters: what `auto` is based on.

    python bench/bench_optim.py                        # pspnet_r18 + a CAD connector (the GPU target's student)
    python bench/bench_optim.py --student pspnet_tiny --small

One SGD step (momentum 0.9, weight decay 1e-4) of the optimizer a TrainStep builds (engine/step.py, as
the trainer builds it) over the student's and the method's trainable parameters, with random gradients;
median ms over --iters steps after --warmup, per implementation:
torch fused, torch foreach, the per-parameter loop, and apex's FusedSGD when apex is importable (CUDA).
Results: bench/results/optim_<device>.md / .json.
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.device import device_name, slug  # noqa: E402
from engine.config import MethodConfig, OptimConfig  # noqa: E402
from engine.methods import build_method  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.optim import apex_fused_sgd  # noqa: E402
from engine.step import Distiller, TrainStep  # noqa: E402


def time_step(opt, device, warmup, iters):
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="pspnet_r18")
    p.add_argument("--teacher", default="pspnet_r101", help="sets the connector's channels (method cad)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--small", action="store_true", help="3 timed steps: a smoke run")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.small:
        a.warmup, a.iters = 1, 3
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student, teacher = build_model(a.student, 19), build_model(a.teacher, 19)
    method = build_method(MethodConfig(method="cad"), student.channels, teacher.channels, 19)
    distiller = Distiller(student, method).to(device)
    impls = ["fused", "foreach", "plain"] + (["apex"] if apex_fused_sgd() and device.type == "cuda" else [])
    rows = {}
    for impl in impls:
        step = TrainStep.build(distiller, None, device, optim=OptimConfig(lr=1e-6, momentum=0.9, weight_decay=1e-4),
                               optim_impl=impl)
        params = [q for g in step.optimizer.param_groups for q in g["params"]]
        for q in params:
            q.grad = torch.randn_like(q)
        rows[impl] = time_step(step.optimizer, device, a.warmup, a.iters)
    n = sum(q.numel() for q in params)
    best = min(rows, key=rows.get)
    dev = device_name()
    lines = [f"# SGD implementations on {dev}", "",
             f"Parameters: {a.student} + CAD connector to {a.teacher} ({n / 1e6:.2f} M in {len(params)} tensors, fp32); "
             f"one step with momentum and weight decay; median of {a.iters} after {a.warmup} warm-up. torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads. apex: "
             f"{'importable' if apex_fused_sgd() else 'not importable'}. Host load (1-min average) at the end: "
             f"{os.getloadavg()[0]:.2f} (on a shared CPU, compare rows of one run only).", "",
             "| --optim-impl | ms/step | vs fused |", "| --- | ---: | ---: |"]
    for impl, ms in rows.items():
        lines.append(f"| {impl} | {ms:.2f} | {ms / rows['fused']:.2f}x |")
    lines += ["", f"Fastest: {best}."]
    text = "\n".join(lines)
    print(text)
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"optim_{slug(dev)}{'_small' if a.small else ''}")
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"device": dev, "student": a.student, "params": n, "ms": rows, "fastest": best}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
