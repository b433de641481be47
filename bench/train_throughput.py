"""Training throughput: segkd's trainer against the loop research code runs today, in one process and one run.

    python bench/train_throughput.py                        # GPU: PSPNet-R101 -> R18, 512x1024, batch 8
    python bench/train_throughput.py --dataset cityscapes --data-root DIR
    python bench/train_throughput.py                        # CPU: pspnet_small -> pspnet_tiny, 128x128, 1 thread
    python bench/train_throughput.py --small                # tiny smoke run (what the test runs)

For each method (kd, cad, apd, cwd by default) the same configuration (teacher, student, data, crop, batch,
SGD + poly LR, method weights of engine.config.MethodConfig) is trained two ways:

  segkd      the TrainStep of engine.trainer.Trainer (engine/step.py) on its own batches, timed by
             engine.profile.profile(phases=True): `steps` consecutive hot-loop
             steps with one device sync at the end (the headline), then as many again with each phase timed
             (CUDA events on a GPU, wall time on the CPU) for the teacher-forward time and the per-phase table
  reference  bench/cirkd_reference.py: CIRKD's train_kd.py loop (fp32, DataLoader, permute-based KD loss,
             `.item()` of every loss term every step), with criteria that compute the same loss values

Both include loading the data; each is timed --repeats times, interleaved (3 on the CPU, where a shared host
makes single runs noisy), and the run of median step time counts. The teacher is a randomly initialised model
of the chosen architecture (saved to a temporary checkpoint): throughput does not depend on what it learnt.

Figures: ms/step and images/s of each loop, ratio = segkd images/s / reference images/s, and the
distillation overhead of segkd,

    overhead = (distillation step - teacher forward - student-alone step) / student-alone step

with the student-alone step measured by the same trainer with `--method none` in the same run and the teacher
forward taken from segkd's per-phase profile of that method. Results: bench/results/train_throughput_<device>.md
and .json (`_small` with --small). The issue's targets (segkd >= 1.5x the reference's images/s; overhead
<= 5% for kd and cad) are judged, PASS/FAIL, only on a GPU with the issue's settings; a ratio measured on
the CPU compares the CPU paths only.
"""
import argparse
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench.device import device_name, slug  # noqa: E402
from cirkd_reference import ReferenceTrainer  # noqa: E402
from engine.config import Config, MethodConfig, OptimConfig, RunConfig, parse_size  # noqa: E402
from engine.data import DATASETS, LOADERS, build_dataset, resolve_loader  # noqa: E402
from engine.dist import init_distributed  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.profile import profile  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

CUDA = torch.cuda.is_available()
METHODS = ("kd", "cad", "apd", "cwd")
ISSUE = {"teacher": "pspnet_r101", "student": "pspnet_r18", "crop": (512, 1024), "batch_size": 8}
TARGET_RATIO, TARGET_OVERHEAD, OVERHEAD_METHODS = 1.5, 0.05, ("kd", "cad")
# RunConfig fields of the fast step that this bench passes through to segkd's trainer when given
RUN_FLAGS = ("precision", "channels_last", "compile", "optim_impl", "teacher_cuda_graph")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of kd,cad,apd,cwd")
    p.add_argument("--teacher", default=None, help="default pspnet_r101 on a GPU, pspnet_small on the CPU, "
                   "pspnet_tiny with --small")
    p.add_argument("--student", default=None, help="default pspnet_r18 on a GPU, pspnet_tiny on the CPU")
    p.add_argument("--dataset", default="synthetic", choices=sorted(DATASETS))
    p.add_argument("--data-root", default="", help="dataset folder (not needed for synthetic)")
    p.add_argument("--crop", type=parse_size, default=None, help="training crop (default 512,1024 on a GPU, 128 on "
                   "the CPU, 32 with --small)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 on a GPU, 4 on the CPU, 2 with --small")
    p.add_argument("--workers", type=int, default=None, help="data workers of both loops (default 8 on a GPU, "
                   "capped at the cores; 0 on the CPU, where a worker process would take cores from the step)")
    p.add_argument("--loader", default="auto", choices=LOADERS, help="segkd's --loader; the reference always uses "
                   "a DataLoader")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on a GPU, 3 on the "
                   "CPU, 1 with --small)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 2 with --small)")
    p.add_argument("--repeats", type=int, default=None, help="runs of warmup + steps per loop and method, "
                   "interleaved; the run of median step time counts (default 1 on a GPU, 3 on the CPU, 1 with "
                   "--small)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's with CUDA; 1 on "
                   "the CPU, where OpenMP threads that share busy cores stall each other)")
    p.add_argument("--ref-log-every", type=int, default=1, help="reference loop: steps between the `.item()` "
                   "reads of its loss terms (1: every step, the issue's baseline; CIRKD's --log-iter is 10)")
    p.add_argument("--precision", default=None, help="segkd --precision (default: the trainer's, auto)")
    p.add_argument("--channels-last", default=None, help="segkd --channels-last (default: the trainer's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="segkd --compile")
    p.add_argument("--optim-impl", default=None, help="segkd --optim-impl (default: the trainer's)")
    p.add_argument("--teacher-cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="segkd --teacher-cuda-graph")
    p.add_argument("--small", action="store_true", help="tiny settings: a smoke run")
    p.add_argument("--verbose", action="store_true", help="show the trainer's own messages")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"), help="directory for the results")
    a = p.parse_args(argv)
    gpu = CUDA and not a.small
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown or not a.methods:
        p.error(f"--methods: unknown {unknown}; expected a subset of {','.join(METHODS)}")
    a.teacher = a.teacher or ("pspnet_r101" if gpu else "pspnet_tiny" if a.small else "pspnet_small")
    a.student = a.student or ("pspnet_r18" if gpu else "pspnet_tiny")
    a.crop = a.crop or ((512, 1024) if gpu else (32, 32) if a.small else (128, 128))
    a.batch_size = a.batch_size or (8 if gpu else 2 if a.small else 4)
    cores = os.cpu_count() or 1
    a.workers = (min(8, cores) if gpu else 0) if a.workers is None else a.workers
    a.warmup = (5 if gpu else 1 if a.small else 3) if a.warmup is None else a.warmup
    a.steps = (2 if a.small else 20) if a.steps is None else a.steps
    a.repeats = (1 if gpu or a.small else 3) if a.repeats is None else a.repeats
    if min(a.steps, a.repeats, a.batch_size, a.ref_log_every) < 1 or min(a.warmup, a.workers) < 0:
        p.error(f"need --steps, --repeats, --batch-size, --ref-log-every >= 1 and --warmup, --workers >= 0; got "
                f"{a.steps}, {a.repeats}, {a.batch_size}, {a.ref_log_every}, {a.warmup}, {a.workers}")
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if a.dataset != "synthetic" and not a.data_root:
        p.error(f"--dataset {a.dataset} needs --data-root")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    a.run_overrides = {k: getattr(a, k) for k in RUN_FLAGS if getattr(a, k) is not None}
    missing = sorted(set(a.run_overrides) - known)
    if missing:  # setattr on the dataclass would otherwise pass silently
        p.error(f"engine.config.RunConfig has no field(s) {missing}: this trainer does not take those flags")
    return a


def issue_settings(args):
    return CUDA and not args.small and all(
        (tuple(args.crop) if k == "crop" else getattr(args, k)) == v for k, v in ISSUE.items())


def release():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


@contextlib.contextmanager
def pytorch_default_backends():
    """The reference runs under PyTorch's default backend flags (cudnn.benchmark off, as CIRKD sets it; TF32 for
    convolutions but not matmuls), whatever segkd's trainer set for itself earlier in the process."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = False, True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved[:3]
        torch.set_float32_matmul_precision(saved[3])


def segkd_config(args, method, teacher_ckpt, out):
    cfg = Config()
    cfg.model.teacher, cfg.model.student = args.teacher, args.student
    cfg.model.teacher_ckpt = teacher_ckpt if method != "none" else ""
    d = cfg.data
    d.dataset, d.data_root, d.crop, d.batch_size = args.dataset, args.data_root, tuple(args.crop), args.batch_size
    d.workers, d.loader = args.workers, args.loader
    cfg.method.method = method
    cfg.optim.iters = 10 * (args.warmup + 2 * args.steps) + 100  # the poly LR stays above 0 while timing
    cfg.run.out, cfg.run.resume, cfg.run.eval_interval = out, "none", 0
    for k, v in args.run_overrides.items():
        setattr(cfg.run, k, v)
    return cfg


def run_segkd(args, env, method, teacher_ckpt, tmp):
    """-> (profile stats of the trainer's step for `method`, a description of the step's settings)."""
    cfg = segkd_config(args, method, teacher_ckpt, os.path.join(tmp, f"segkd-{method}"))
    echo = print if args.verbose else (lambda *a, **k: None)
    trainer = Trainer(cfg, env, echo=echo)
    # phases=True: the plain hot loop (step_ms, img_s), then the same number of steps with each phase timed
    stats = profile(trainer.step, trainer.batches(0), device=env.device, iters=cfg.optim.iters, warmup=args.warmup,
                    steps=args.steps, phases=True, world_size=env.world_size, rank=env.rank)
    settings = trainer.step.description  # how the step ran: precision, memory format, SGD, compile
    del trainer
    release()
    return stats, settings


def median_run(runs):
    """The run of median step time (the upper one of an even count), with the per-phase medians over all runs
    and the largest peak memory."""
    ordered = sorted(runs, key=lambda r: r["step_ms"])
    mid = dict(ordered[len(ordered) // 2])
    if mid.get("phases"):
        mid["phases"] = {k: statistics.median(r["phases"][k] for r in runs) for k in mid["phases"]}
    mid["peak_mem_mb"] = max(r["peak_mem_mb"] for r in runs)
    return mid


def run_reference(args, method, teacher_state, dataset, device):
    teacher = build_model(args.teacher, dataset.num_classes)
    teacher.load_state_dict(teacher_state)
    torch.manual_seed(0)
    student = build_model(args.student, dataset.num_classes)
    with pytorch_default_backends():
        ref = ReferenceTrainer(method, teacher, student, dataset, batch_size=args.batch_size, workers=args.workers,
                               device=device, mcfg=MethodConfig(method=method), ocfg=OptimConfig(),
                               max_iterations=10 * (args.warmup + args.steps) + 100, log_every=args.ref_log_every)
        stats = ref.train(args.warmup, args.steps)
    del ref, teacher, student
    release()
    return stats


def main(argv=None):
    args = parse_args(argv)
    env = init_distributed("auto")  # before set_num_threads: on the CPU it sets the thread count itself
    if env.distributed:
        raise SystemExit("bench/train_throughput.py runs in one process (python, not torchrun)")
    if not CUDA:  # OpenMP threads that share cores with other work stall each other: never oversubscribe
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    device = device_name()
    dataset = build_dataset(args.dataset, "train", root=args.data_root, train=True, crop=tuple(args.crop))
    k = dataset.num_classes
    meta = {"device": device, "teacher -> student": f"{args.teacher} -> {args.student}",
            "dataset": f"{args.dataset} ({len(dataset)} train images, {k} classes)",
            "crop": "x".join(map(str, args.crop)), "batch size": args.batch_size, "data workers": args.workers,
            "timing": f"{args.warmup} warm-up + {args.steps} timed steps per loop, data loading included; median of "
                      f"{args.repeats} such run(s)",
            "reference": f"CIRKD-style loop (bench/cirkd_reference.py), fp32, DataLoader, .item() of every loss "
                         f"term every {args.ref_log_every} step(s)",
            "peak memory": "CUDA memory allocated, per loop" if CUDA else "not measured on the CPU",
            "torch": torch.__version__, "torch threads": torch.get_num_threads(),
            "host load at start (1-min load average)": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"{device}: {meta['teacher -> student']}, crop {meta['crop']}, batch {args.batch_size}, "
          f"{args.warmup}+{args.steps} steps, {torch.get_num_threads()} threads, {args.workers} workers", flush=True)

    seg_runs, ref_runs = {m: [] for m in ["none"] + args.methods}, {m: [] for m in args.methods}
    with tempfile.TemporaryDirectory(prefix="segkd-throughput-") as tmp:
        torch.manual_seed(0)
        teacher_state = build_model(args.teacher, k).state_dict()  # random weights: timing only
        teacher_ckpt = os.path.join(tmp, "teacher.pt")
        torch.save(teacher_state, teacher_ckpt)
        # repeats interleave the loops (and rebuild them), so that a slow spell of the host hits all of them
        for r in range(args.repeats):
            for method in ["none"] + args.methods:
                stats, settings = run_segkd(args, env, method, teacher_ckpt, tmp)
                seg_runs[method].append(stats)
                line = f"run {r + 1}/{args.repeats} {method:4s} segkd {stats['step_ms']:8.1f} ms/step"
                if method != "none":
                    stats = run_reference(args, method, teacher_state, dataset, env.device)
                    ref_runs[method].append(stats)
                    line += f" | reference {stats['step_ms']:8.1f} ms/step"
                print(line, flush=True)
        meta["segkd"] = f"engine.step.TrainStep, loader {resolve_loader(args.loader)}; {settings}"

    alone = dict(median_run(seg_runs["none"]), runs_ms=[x["step_ms"] for x in seg_runs["none"]])
    print(f"student alone (segkd, --method none): {alone['step_ms']:.1f} ms/step, {alone['img_s']:.1f} img/s")
    rows = []
    for method in args.methods:
        seg, ref = median_run(seg_runs[method]), median_run(ref_runs[method])
        teacher_ms = teacher_phase_ms(seg["phases"])
        row = {"method": method,
               "segkd_img_s": seg["img_s"], "segkd_ms": seg["step_ms"],
               "segkd_peak_mb": seg["peak_mem_mb"] if CUDA else None,
               "ref_img_s": ref["img_s"], "ref_ms": ref["step_ms"], "ref_peak_mb": ref["peak_mem_mb"],
               "ratio": seg["img_s"] / ref["img_s"], "teacher_ms": teacher_ms,
               "student_alone_ms": alone["step_ms"],
               "overhead": (seg["step_ms"] - teacher_ms - alone["step_ms"]) / alone["step_ms"],
               "segkd_phases_ms": seg["phases"], "ref_last_losses": ref["last_losses"],
               "segkd_runs_ms": [x["step_ms"] for x in seg_runs[method]],
               "ref_runs_ms": [x["step_ms"] for x in ref_runs[method]]}
        rows.append(row)
        print(f"{method:4s} segkd {row['segkd_img_s']:8.1f} img/s {row['segkd_ms']:8.1f} ms/step | reference "
              f"{row['ref_img_s']:8.1f} img/s {row['ref_ms']:8.1f} ms/step | ratio {row['ratio']:5.2f} | "
              f"teacher {teacher_ms:.1f} ms, overhead {100 * row['overhead']:+.1f}%")

    verdicts = judge(args, rows) if issue_settings(args) else None
    if verdicts:
        for line in verdicts:
            print(line)
    write(args, meta, rows, alone, verdicts)
    return {"meta": meta, "rows": rows, "student_alone": alone, "verdicts": verdicts}


def teacher_phase_ms(phases):
    """The teacher-forward phase of segkd's profile ('teacher forward'; 'teacher' in the API's first draft)."""
    for key in ("teacher forward", "teacher"):
        if key in phases:
            return phases[key]
    raise KeyError(f"segkd's per-phase profile has no teacher phase: {sorted(phases)}")


def judge(args, rows):
    """PASS/FAIL lines against the issue's targets (only called on a GPU with the issue's settings)."""
    lines = []
    for r in rows:
        ok = r["ratio"] >= TARGET_RATIO
        lines.append(f"{r['method']}: images/s ratio {r['ratio']:.2f} (target >= {TARGET_RATIO}) "
                     f"{'PASS' if ok else 'FAIL'}")
        if r["method"] in OVERHEAD_METHODS:
            ok = r["overhead"] <= TARGET_OVERHEAD
            lines.append(f"{r['method']}: distillation overhead {100 * r['overhead']:.1f}% (target <= "
                         f"{100 * TARGET_OVERHEAD:.0f}%) {'PASS' if ok else 'FAIL'}")
    return lines


def _mb(v):
    return "-" if not v else f"{v:.0f}"


def _ms(v):
    return f"{v:.1f}" if isinstance(v, (int, float)) else "-"


def write(args, meta, rows, alone, verdicts):
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"train_throughput_{slug(meta['device'])}" + ("_small" if args.small else ""))
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "student_alone": {"step_ms": alone["step_ms"], "img_s": alone["img_s"],
                                                   "phases_ms": alone["phases"], "runs_ms": alone["runs_ms"]},
                   "rows": rows, "verdicts": verdicts}, f, indent=2)
    lines = [f"# Training throughput on {meta['device']}: segkd vs a CIRKD-style loop", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += [f"- student alone (segkd, --method none): {alone['step_ms']:.1f} ms/step, {alone['img_s']:.1f} images/s",
              "", "| method | segkd images/s | segkd ms/step | reference images/s | reference ms/step | "
              "ratio segkd/reference | teacher forward ms | distillation overhead | segkd peak MB | "
              "reference peak MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['segkd_img_s']:.1f} | {r['segkd_ms']:.1f} | {r['ref_img_s']:.1f} | "
              f"{r['ref_ms']:.1f} | {r['ratio']:.2f} | {r['teacher_ms']:.1f} | {100 * r['overhead']:+.1f}% | "
              f"{_mb(r['segkd_peak_mb'])} | {_mb(r['ref_peak_mb'])} |" for r in rows]
    lines += ["", "overhead = (segkd distillation step - teacher forward - student-alone step) / student-alone "
              "step; the teacher forward comes from segkd's per-phase profile of the same method."]
    if args.repeats > 1:
        spread = "; ".join(f"{r['method']} segkd {min(r['segkd_runs_ms']):.1f}-{max(r['segkd_runs_ms']):.1f}, "
                           f"reference {min(r['ref_runs_ms']):.1f}-{max(r['ref_runs_ms']):.1f}" for r in rows)
        lines += ["", f"Spread of ms/step over the {args.repeats} runs: {spread}."]
    names = list(dict.fromkeys(k for p in [alone["phases"]] + [r["segkd_phases_ms"] for r in rows] for k in p))
    lines += ["", "## segkd per-phase profile (ms per step, each phase timed)", "",
              "| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, phases in [("none", alone["phases"])] + [(r["method"], r["segkd_phases_ms"]) for r in rows]:
        lines.append(f"| {label} | " + " | ".join(_ms(phases.get(n)) for n in names) + " |")
    if verdicts:
        lines += ["", "## Targets (issue 6: H100/H200, PSPNet-R101 -> R18, 512x1024, batch 8)", ""]
        lines += [f"- {v}" for v in verdicts]
    elif not args.small:
        lines += ["", "Not the issue's target setting (a GPU with PSPNet-R101 -> R18, 512x1024, batch 8): no "
                  "PASS/FAIL; the ratio compares these paths on this device only."]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {base}.md and .json")


if __name__ == "__main__":
    main()
