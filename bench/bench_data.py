"""Benchmark the training data paths: images/s of the DALI and torch loaders, and the share of a distillation
step spent waiting for data.

    python bench/bench_data.py                                   # CamVid (../shared/datasets/camvid), 512x512
    python bench/bench_data.py --dataset cityscapes --data-root DIR --crop 512,1024 --batch-size 8
    python bench/bench_data.py --small                           # tiny smoke run (what the test runs)

1. Throughput: each loader (`torch`: DataLoader worker processes; `dali`: DALI pipeline, `--workers` = its CPU
   threads and the threads of its Python source) streams training batches with the full augmentation (scale
   0.5-2, crop, flip, rotation up to each --rotate value); images/s over --iters batches after --warmup, per worker
   count. A batch counts once it is on the training device (host-to-device copy included).
2. Data wait: a real distillation step (frozen teacher forward, student forward/backward, method loss, SGD) of
   --teacher -> --student with --method, fed by each loader with the largest worker count. Per step, the time
   blocked on the loader (batch on the device) and the step's compute, with a device sync after each step so the
   two do not overlap; wait % = wait / (wait + compute). The compute-only time of the same step on one resident
   batch is the reference.

On a GPU, DALI decodes with nvJPEG (`mixed`) and augments on the GPU; the issue's target is a wait under 2% of a
PSPNet-R101 -> R18 step at batch 8 per GPU, 512x1024 crops (the GPU defaults). On the CPU both loaders and the
model share the same cores, so the figures compare the CPU paths only. Results: bench/results/data_<device>.md
and .json (with `_small` for --small).
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.device import device_name, slug  # noqa: E402
from engine.config import MethodConfig, OptimConfig, parse_size  # noqa: E402
from engine.data import DATASETS, build_dataset, build_train_loader  # noqa: E402
from engine.data.loader import dali_importable  # noqa: E402
from engine.methods import build_method, method_needs_teacher  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.step import Distiller, TrainStep  # noqa: E402
from engine.teacher import Frozen  # noqa: E402

CUDA = torch.cuda.is_available()
CAMVID = os.path.join(ROOT, "..", "shared", "datasets", "camvid")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="camvid", choices=sorted(DATASETS))
    p.add_argument("--data-root", default=None, help="dataset folder (default for camvid: ../shared/datasets/camvid)")
    p.add_argument("--crop", type=parse_size, default=None, help="training crop (default 512; 512,1024 on a GPU "
                   "for the step; 64 with --small)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 (2 with --small)")
    p.add_argument("--workers", default=None, help="worker counts to try, e.g. 1,2,4 (default 1..cores, "
                   "doubling; 1 with --small)")
    p.add_argument("--loaders", default=None, help="subset of dali,torch (default: both, dali when importable)")
    p.add_argument("--rotate", default="0,10", help="largest random rotation(s) in degrees to try, e.g. 0,10 (the "
                   "step measurement uses the last)")
    p.add_argument("--warmup", type=int, default=None, help="batches before timing (default 5; 1 with --small)")
    p.add_argument("--iters", type=int, default=None, help="timed batches (default 30; 3 with --small)")
    p.add_argument("--teacher", default=None, help="default pspnet_r101 on a GPU, pspnet_small on the CPU")
    p.add_argument("--student", default=None, help="default pspnet_r18 on a GPU, pspnet_tiny on the CPU")
    p.add_argument("--method", default="cad")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per loader (default 20 on a "
                   "GPU, 4 on the CPU, 2 with --small; 0 skips the step measurement)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast in the training step (CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of the training step (default: "
                   "1 on the CPU, where loader workers need the other cores; torch's default with CUDA)")
    p.add_argument("--small", action="store_true", help="tiny settings: a smoke run")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    a = p.parse_args(argv)
    small = a.small
    a.crop = a.crop or ((64, 64) if small else (512, 512))
    a.batch_size = a.batch_size or (2 if small else 8)
    a.warmup = 1 if small and a.warmup is None else (5 if a.warmup is None else a.warmup)
    a.iters = a.iters or (3 if small else 30)
    a.steps = (2 if small else 20 if CUDA else 4) if a.steps is None else a.steps
    a.teacher = a.teacher or ("pspnet_r101" if CUDA and not small else "pspnet_small")
    a.student = a.student or ("pspnet_r18" if CUDA and not small else "pspnet_tiny")
    if a.workers is None:
        counts, n = [], 1
        while n < (os.cpu_count() or 1):
            counts.append(n)
            n *= 2
        a.workers = "1" if small else ",".join(map(str, counts + [os.cpu_count() or 1]))
    a.workers = [int(w) for w in str(a.workers).split(",")]
    a.rotate = [float(r) for r in str(a.rotate).split(",")]
    if min(a.workers) < 1:
        p.error("--workers: counts must be >= 1")
    a.loaders = (a.loaders or ("dali,torch" if dali_importable() else "torch")).split(",")
    if set(a.loaders) - {"dali", "torch"}:
        p.error(f"--loaders: expected a subset of dali,torch, got {a.loaders}")
    if a.data_root is None:
        a.data_root = CAMVID if a.dataset == "camvid" else ""
    return a


DEVICE = torch.device("cuda" if CUDA else "cpu")


def sync():
    if CUDA:
        torch.cuda.synchronize()


def on_device(batch):
    return {k: v.to(DEVICE, non_blocking=True) for k, v in batch.items()}


def loader_for(ds, args, kind, workers):
    return build_train_loader(ds, args.batch_size, workers=workers, seed=0, loader=kind)


def throughput(ds, args, kind, workers):
    """Images per second of one loader, batches landed on the device."""
    loader = loader_for(ds, args, kind, workers)
    for _ in range(args.warmup):
        on_device(next(loader))
    sync()
    start = time.perf_counter()
    for _ in range(args.iters):
        on_device(next(loader))
    sync()
    seconds = time.perf_counter() - start
    if hasattr(loader, "close"):
        loader.close()
    return args.iters * args.batch_size / seconds


def build_step(args, num_classes, ignore_index):
    """One distillation training step: the trainer's own TrainStep (engine/step.py), at iteration 0 of a long
    schedule every time (the learning rate does not change what is timed)."""
    student = build_model(args.student, num_classes)
    teacher = None
    if method_needs_teacher(args.method):
        teacher = Frozen(build_model(args.teacher, num_classes)).to(DEVICE)  # random weights: timing only
    method = build_method(MethodConfig(method=args.method), student.channels,
                          teacher.channels if teacher else student.channels, num_classes, ignore_index)
    distiller = Distiller(student, method, ignore_index).to(DEVICE).train()
    step = TrainStep.build(distiller, teacher, DEVICE, optim=OptimConfig(lr=1e-3),
                           dtype=torch.bfloat16 if args.amp and CUDA else None)
    return lambda batch: step(batch, 0)


def data_wait(ds, args, kind, workers, step):
    """(step ms, wait ms, compute ms) per step, averaged over args.steps steps fed by `kind`."""
    loader = loader_for(ds, args, kind, workers)
    for _ in range(2):
        step(on_device(next(loader)))
    sync()
    wait = compute = 0.0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = on_device(next(loader))
        sync()
        t1 = time.perf_counter()
        step(batch)
        sync()
        t2 = time.perf_counter()
        wait, compute = wait + t1 - t0, compute + t2 - t1
    if hasattr(loader, "close"):
        loader.close()
    n = args.steps
    return 1e3 * (wait + compute) / n, 1e3 * wait / n, 1e3 * compute / n


def compute_only(ds, args, step):
    batch = on_device(next(loader_for(ds, args, "torch", 0)))
    step(batch)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(batch)
    sync()
    return 1e3 * (time.perf_counter() - start) / args.steps


def main(argv=None):
    args = parse_args(argv)
    if args.threads or not CUDA:
        torch.set_num_threads(args.threads or 1)
    sets = {r: build_dataset(args.dataset, "train", root=args.data_root, train=True, crop=args.crop, rotate=r)
            for r in args.rotate}
    ds = sets[args.rotate[-1]]
    device = device_name()
    meta = {"device": device, "dataset": f"{args.dataset} ({len(ds)} train images)", "crop": list(args.crop),
            "batch size": args.batch_size, "augmentation": "scale 0.5-2, crop, flip, rotation +-R degrees",
            "torch": torch.__version__, "torch threads": torch.get_num_threads(),
            "host load at start (1-min load average; other jobs share the cores above 0)": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "timing": f"{args.warmup} warm-up + {args.iters} timed batches; step: 2 warm-up + {args.steps} timed"}
    if "dali" in args.loaders:
        import nvidia.dali
        meta["dali"] = nvidia.dali.__version__
        meta["dali path"] = "GPU (mixed decode, GPU operators)" if CUDA else "CPU (device_id=None, CPU operators)"
    rows = []
    for rotate, data in sets.items():
        for kind in args.loaders:
            for workers in args.workers:
                ips = throughput(data, args, kind, workers)
                rows.append({"loader": kind, "workers": workers, "rotate": rotate, "images_per_s": ips})
                print(f"{kind:5s} workers={workers:2d} rotate={rotate:g}  {ips:8.1f} images/s", flush=True)
    steps = []
    if args.steps:
        step = build_step(args, ds.num_classes, ds.ignore_index)
        ref = compute_only(ds, args, step)
        for kind in args.loaders:
            total, wait, comp = data_wait(ds, args, kind, max(args.workers), step)
            steps.append({"loader": kind, "workers": max(args.workers), "rotate": args.rotate[-1],
                          "teacher": args.teacher,
                          "student": args.student, "method": args.method, "step_ms": total, "wait_ms": wait,
                          "compute_ms": comp, "wait_frac": wait / total, "compute_only_ms": ref})
            print(f"{kind:5s} step {total:8.1f} ms, waiting {wait:7.1f} ms ({100 * wait / total:.1f}%), "
                  f"compute-only {ref:.1f} ms", flush=True)
    write(args, meta, rows, steps, device)


def write(args, meta, rows, steps, device):
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"data_{slug(device)}" + ("_small" if args.small else ""))
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "throughput": rows, "steps": steps}, f, indent=2)
    lines = [f"# Data loading benchmark on {device}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "## Throughput (training batches on the device)", "",
              "| loader | workers | rotation R | images/s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['loader']} | {r['workers']} | {r['rotate']:g} | {r['images_per_s']:.1f} |" for r in rows]
    if steps:
        s0 = steps[0]
        lines += ["", f"## Data wait in a training step ({s0['teacher']} -> {s0['student']}, --method "
                      f"{s0['method']}, batch {args.batch_size}, crop {args.crop[0]}x{args.crop[1]}, rotation R "
                      f"{s0['rotate']:g})", "",
                  "| loader | workers | step ms | waiting for data ms | wait % | compute ms | compute-only ms |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {s['loader']} | {s['workers']} | {s['step_ms']:.1f} | {s['wait_ms']:.1f} | "
                  f"{100 * s['wait_frac']:.1f} | {s['compute_ms']:.1f} | {s['compute_only_ms']:.1f} |" for s in steps]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {base}.md and .json")


if __name__ == "__main__":
    main()
