"""What the compression bought: a teacher and a student side by side.

    python engine/compare.py --teacher TEACHER.pt --student runs/camvid-pspnet_r18-cad/last.pt --size 360,480

For each model: parameters and GFLOPs of one image at --size (counted, engine/models/cost.py), latency on this
machine at batch 1 and batch 8 (median of --repeats timed forward passes after warm-up, in --precision), peak
memory of a batch-8 forward (CUDA: the allocator's peak, weights included; CPU: how far the resident memory of a
fresh process grows from building the model to the end of that forward, weights included, measured in a
process of its own so that nothing else the command holds is counted), and mIoU on --split of the student's
dataset (whole-image inference). The table ends with "student: N x fewer FLOPs, M x faster, -x.x mIoU" and is written to
compare.md and compare.json in the student's run directory (or --out).

The teacher may be a segkd checkpoint or a raw state dict of --teacher-arch (as --teacher-ckpt takes it).
"""
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python engine/compare.py`: import `engine` from the checkout, not engine/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402


def latency_ms(model, size, batch, device, dtype, repeats, warmup=2):
    """Median ms of one forward pass of `batch` random images of `size`."""
    from engine.precision import autocast

    x = torch.randn(batch, 3, *size, device=device)
    times = []
    with torch.inference_mode(), autocast(device, dtype):
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def peak_mb(model, size, device, dtype, arch, num_classes):
    if device.type != "cuda":
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(cpu_peak_mb, (arch, num_classes, size, dtype))
    from engine.precision import autocast

    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), autocast(device, dtype):
        model(torch.randn(8, 3, *size, device=device))
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _proc_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def cpu_peak_mb(arch, num_classes, size, dtype):
    """In a fresh process: MiB the resident set grows by (its peak, VmHWM) from before the model is built to the
    end of one batch-8 forward. The weights' values do not change the figure, so the model is built afresh."""
    import torch as _torch

    from engine.models import build_model
    from engine.precision import autocast

    _torch.set_num_threads(1)
    x = _torch.randn(8, 3, *size)
    before = _proc_kib("VmRSS")
    model = build_model(arch, num_classes).eval()
    with _torch.inference_mode(), autocast(_torch.device("cpu"), dtype):
        model(x)
    return (_proc_kib("VmHWM") - before) / 1024


def main(argv=None):
    from engine.checkpoint import load_checkpoint, load_model
    from engine.config import ArgumentParser, Config, parse_size
    from engine.data import build_dataset, build_val_loader
    from engine.dist import init_distributed
    from engine.evaluate import evaluate
    from engine.models import model_cost
    from engine.precision import resolve_precision
    from engine.teacher import load_teacher

    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="teacher checkpoint (segkd checkpoint or raw state dict)")
    p.add_argument("--teacher-arch", default="", help="architecture of a raw state dict given as --teacher")
    p.add_argument("--student", required=True, help="student checkpoint written by engine/train.py")
    p.add_argument("--size", type=parse_size, default=(512, 512), help="input HEIGHT,WIDTH of the FLOPs and latency")
    p.add_argument("--repeats", type=int, default=10, help="timed forward passes per model and batch size")
    p.add_argument("--split", default="val")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the student's)")
    p.add_argument("--val-size", type=int, default=0, help="score the first N images only (0: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="auto|fp32|bf16|fp16 of the latency and the mIoU")
    p.add_argument("--out", default="", help="folder for compare.md / compare.json (default: the student's)")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.val_size < 0:
        raise ValueError(f"--repeats must be >= 1 and --val-size >= 0, got {a.repeats} and {a.val_size}")
    env = init_distributed(a.device)
    dev, dtype = env.device, resolve_precision(a.precision, env.device)
    student, sckpt = load_model(a.student)
    k = sckpt["num_classes"]
    cfg = Config.from_dict(sckpt["config"])
    try:
        tckpt = load_checkpoint(a.teacher)
        teacher_arch = tckpt["arch"]
    except ValueError:
        tckpt, teacher_arch = None, a.teacher_arch
        if not teacher_arch:
            raise ValueError(f"--teacher {a.teacher} is not a segkd checkpoint: give its architecture with "
                             "--teacher-arch") from None
    teacher, teacher_arch = load_teacher(a.teacher, teacher_arch, k, cfg.data.dataset)
    ds = build_dataset(cfg.data.dataset, a.split, root=cfg.data.data_root if a.data_root is None else a.data_root)
    items = torch.utils.data.Subset(ds, range(min(a.val_size, len(ds)))) if a.val_size else ds
    loader = build_val_loader(items, 4, workers=0)
    rows = {}
    for role, arch, model in (("teacher", teacher_arch, teacher), ("student", sckpt["arch"], student)):
        model = model.to(dev).eval()
        params, flops = model_cost(arch, k, a.size)
        rows[role] = {"arch": arch, "params": params, "gflops": flops / 1e9,
                      "ms_batch1": latency_ms(model, a.size, 1, dev, dtype, a.repeats),
                      "ms_batch8": latency_ms(model, a.size, 8, dev, dtype, a.repeats),
                      "peak_mb_batch8": peak_mb(model, a.size, dev, dtype, arch, k),
                      "miou": evaluate(model, loader, k, dev, ignore_index=ds.ignore_index, dtype=dtype)["miou"]}
    t, s = rows["teacher"], rows["student"]
    verdict = (f"student: {t['gflops'] / s['gflops']:.1f}x fewer FLOPs, {t['params'] / s['params']:.1f}x fewer "
               f"parameters, {t['ms_batch8'] / s['ms_batch8']:.1f}x faster at batch 8, "
               f"{100 * (s['miou'] - t['miou']):+.1f} mIoU")
    where = f"{dev}, {'fp32' if dtype is None else str(dtype).split('.')[-1]}, {a.size[0]}x{a.size[1]}"
    lines = [f"# {t['arch']} -> {s['arch']} ({where}; mIoU on {cfg.data.dataset} {a.split}, {len(items)} images)",
             "", "| model | params (M) | GFLOPs | ms, batch 1 | ms, batch 8 | peak MiB, batch 8 | mIoU |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for role, r in rows.items():
        peak = f"{r['peak_mb_batch8']:.0f}"
        lines.append(f"| {role}: {r['arch']} | {r['params'] / 1e6:.2f} | {r['gflops']:.2f} | {r['ms_batch1']:.1f} | "
                     f"{r['ms_batch8']:.1f} | {peak} | {100 * r['miou']:.1f} |")
    lines += ["", verdict]
    text = "\n".join(lines)
    print(text)
    folder = Path(a.out) if a.out else Path(a.student).parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compare.md").write_text(text + "\n")
    (folder / "compare.json").write_text(json.dumps({"device": where, "rows": rows, "verdict": verdict}, indent=2))
    return rows


def cli(argv=None):
    """The command line: any failure ends in one line `segkd: error: ...` and its exit code (engine/errors.py)."""
    from engine.errors import run_cli

    run_cli(main, argv)


if __name__ == "__main__":
    cli()
