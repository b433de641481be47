"""The one-command GPU check (issue 12): correctness, kernel timings and training throughput in one run.

    python bench/gpu_suite.py --out DIR                 # on a GPU: under 8 minutes on one H100/H200
    python bench/gpu_suite.py --out DIR --budget 300    # fewer repetitions and variants
    python bench/gpu_suite.py --out DIR --parts timings,train   # a subset (e.g. a rerun after a cut-off)
    python bench/gpu_suite.py --out DIR --parts timings --budget 400   # room to build and check the C++ backend
    python bench/gpu_suite.py --dry-run --out /tmp/gs   # the same plan on the CPU at tiny shapes, in seconds

Through the device tool, which copies the working tree (no install step: run from the repository root) and
brings back what is written under $OUT, but at most 8 files (the suite writes about 12): write to a local
folder, then bring back one archive of it and the summary (the suite ends within --budget + 80 s; `timeout`
keeps the archive step inside the tool's 600 s even if it did not):

    timeout 540 python3 bench/gpu_suite.py --out /tmp/gs; tar czf $OUT/gpu_suite.tgz -C /tmp gs; cp /tmp/gs/*.md $OUT/

The parts run in this order, most important first, so that a run cut off at its time limit still holds them.
Each runs in a worker process of its own (a kernel that faults leaves its process's CUDA context unusable; a
part that overruns is stopped) and records its own time; a failing part records its error (one line in the
table, the traceback in the log) and the suite goes on to the next. A part's status is passed, failed,
incomplete (what ran passed, the budget cut the rest of its plan) or skipped:

  workload   1a. Every fused op of kernels/ (pixel_kl, channel_kl, angular_loss in its three modes,
             masked_avg_pool, prototype_kl, bn_stat_distance) against its float64 `<op>_reference` on fresh
             random inputs: the workload shapes (PSPNet-R101 teacher -> R18 student, 512x1024 crops, batch 8,
             output stride 8: logits [8, 19, 64, 128], backbone features [8, 2048, 64, 128] after the connector,
             decoder features [8, 512, 64, 128]) and awkward ones (C in 11/150/171, H*W not a multiple of 16,
             batch 1), contiguous and channels-last, fp32/bf16/fp16, grad_output 0.37, outputs poisoned.
             Relative error ||x - x64|| / ||x64|| of outputs and gradients; a case passes when ours is at most
             twice the error of the torch reference run in the same dtype plus the tests' per-dtype allowance.
             Then the step's lean teacher (PSPNet-R101, batch 8, 512x1024, bf16, channels-last) with cuDNN's fused
             conv + bias + residual + ReLU (kernels.conv_bias_relu) and unfused, against the fp32 teacher: error,
             how many conv configurations cuDNN fused, and the forward time of each.
  tests      1b. The kernel test suite (tests/kernels, pytest in a subprocess: on a GPU the kernels run
             compiled), counted per file; a run stopped by the budget keeps the counts so far. The C++ variants
             are left out (building the library with nvcc takes minutes): part 2 checks them.
  training   1c. 3 training steps of kd, cad, apd, cwd, dfss and dfad through engine.trainer.Trainer with the
             fused kernels (SEGKD_KERNELS=triton, outputs poisoned) and with the torch reference
             (SEGKD_KERNELS=torch): random R101 teacher -> R18 student, 256x512 crops, batch 4, same seed, batches
             and initial weights, fp32 with deterministic cuDNN; the loss terms of every step and the weight
             update must agree, dfss's ADS scores too, and the fused path must have been taken.
  timings    2. Kernel timings from bench/bench_kernels.py: median ms of forward and forward+backward, GB/s,
             % of the device-to-device copy bandwidth measured in the same run, peak memory; eager CIRKD-style
             torch, ours (Triton), the C++ backend of csrc/ where an op has one (built on first use, needs nvcc
             and ninja there; first checked against float64 at the workload shapes, bf16 channels-last and fp32
             NCHW, as 1a checks Triton), torch.compile (as the budget allows).
  train      3. The training step from bench/train_throughput.py: images/s and ms/step of segkd against the
             CIRKD-style loop (bench/cirkd_reference.py) for kd, cad, apd, cwd at the workload (random
             weights), the share of the loss in segkd's phase profile (engine/profile.py), and segkd alone in
             a few variants: fp32 NCHW, --teacher-cuda-graph, --compile (trimmed by the budget).

--budget (seconds, default 420) is shared among the parts in proportion to their weights, time a part leaves
unused passing to the later ones; each part trims its cases, repetitions and variants to fit its share and
says what it left out (at the default budget: most of the speed-option matrix of part 3, and the kernel tests
may be cut short; a second call such as `--parts tests,train --budget 540` gives them the whole time of a
device-tool command). Results go to DIR: gpu_suite_<device>.md (the summary and every table), .json (all of
it), .log (errors with tracebacks, pytest's output), gpu_suite_<device>_<part>.csv, and bench_kernels.py's own
table, kernels_<device>.md/.json (a dry run adds _dry-run to every name). The last lines printed are a short
table of the parts (the device tool returns only the end of the output).

--dry-run runs the same plan on the CPU at tiny shapes, with TRITON_INTERPRET=1 set before triton is imported
(the kernels run through Triton's interpreter) and CUDA hidden; what needs CUDA (torch.compile timings,
CUDA graphs) is reported as skipped. Its figures time CPU code paths only. tests/bench/test_gpu_suite.py runs it.
"""
import argparse
import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 60  # past its allotment, a part's worker process is stopped (a part stops itself, a unit late at most)
MIN_PART_S = 5  # a part left less of the budget is skipped
WEIGHTS = {"workload": 0.15, "tests": 0.22, "training": 0.15, "timings": 0.18, "train": 0.30}
TITLES = {"workload": "1a fused ops vs float64, workload shapes", "tests": "1b kernel tests (pytest)",
          "training": "1c fused vs reference training", "timings": "2 kernel timings",
          "train": "3 training step throughput"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_suite"), help="directory for the results")
    p.add_argument("--dry-run", action="store_true", help="the plan on the CPU at tiny shapes (Triton interpreted)")
    p.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 420; 100 dry-run)")
    p.add_argument("--parts", default=",".join(WEIGHTS), help=f"comma-separated subset of {','.join(WEIGHTS)}")
    p.add_argument("--kernel-tests", default=None,
                   help="pytest selection of part 1b, comma-separated (default: every tests/kernels file)")
    p.add_argument("--worker", choices=tuple(WEIGHTS), default=None, help=argparse.SUPPRESS)  # run one part
    p.add_argument("--until", type=float, default=0.0, help=argparse.SUPPRESS)  # the worker's end (time.time())
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(args.parts) - set(WEIGHTS))
    if unknown or not args.parts:
        p.error(f"--parts: unknown {unknown}; expected a subset of {','.join(WEIGHTS)}")
    args.budget = args.budget or (100.0 if args.dry_run else 420.0)
    if args.budget <= 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget}")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.dry_run:
    # Before torch and triton are imported: the interpreter is chosen when the kernels are defined
    # (kernels/_dispatch.py), and CUDA is hidden so that every module, subprocesses included, plans for the CPU.
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
for path in (ROOT, ROOT / "tests" / "kernels"):
    sys.path.insert(0, str(path))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import bench.bench_kernels as bench_kernels  # noqa: E402
import bench.train_throughput as train_throughput  # noqa: E402
import kernels  # noqa: E402
from bench.device import device_name, slug  # noqa: E402
from engine.config import parse_config  # noqa: E402
from engine.data import build_dataset  # noqa: E402
from engine.data.loader import dali_importable  # noqa: E402
from engine.datafree.ads import score_pool, scoring_pool, select  # noqa: E402
from engine.dist import DistEnv, init_distributed  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.trainer import Trainer  # noqa: E402
from kernel_testing import GO, _slack  # noqa: E402  (the kernel tests' grad_output and per-dtype allowance)
from kernels import _dispatch  # noqa: E402
from kernels.angular import MODES, angular_loss_reference  # noqa: E402
from kernels.bn_stat import bn_stat_distance_reference  # noqa: E402
from kernels.channel_kl import channel_kl_reference  # noqa: E402
from kernels.ifvd import class_centre_mse_reference  # noqa: E402
from kernels.masked_avg_pool import masked_avg_pool_reference  # noqa: E402
from kernels.pairwise import pairwise_similarity_reference  # noqa: E402
from kernels.upsampled_ce import upsampled_cross_entropy_reference, upsampled_pixel_kl_reference  # noqa: E402
from kernels.pixel_kl import pixel_kl_reference  # noqa: E402
from kernels.prototype import prototype_ce_reference, prototype_kl_reference, prototype_logits_reference  # noqa: E402


class Suite:
    """The run's shared state: the device, the budget, where results go, and the record of every part.

    The suite process runs each part in a worker process of its own (this script with --worker NAME): a kernel
    that faults leaves its CUDA context unusable, and a part that overruns its time can be stopped, without
    losing the parts after it."""

    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if self.cuda else torch.device("cpu")
        self.name = device_name()
        self.stem = f"gpu_suite_{slug(self.name)}" + ("_dry-run" if self.dry else "")
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + (args.until - time.time() if args.worker else args.budget)
        self.part_deadline = self.deadline
        if not args.worker:
            self.path(".log").write_text("")
        self.logfile = open(self.path(".log"), "a")  # appended to by the suite and its workers, in turn
        triton_version = getattr(_dispatch.triton, "__version__", f"unavailable ({_dispatch.TRITON_ERROR!r})")
        self.meta = {"device": self.name, "mode": "dry run: CPU, tiny shapes, Triton interpreted" if self.dry
                     else "GPU", "torch": torch.__version__, "triton": triton_version,
                     "kernels": "Triton, interpreted (TRITON_INTERPRET=1)" if _dispatch.INTERPRETED else
                     "Triton, compiled" if _dispatch.HAS_TRITON else "torch references (no triton)",
                     "python": sys.version.split()[0], "cuda": torch.version.cuda or "-",
                     "DALI": "installed (not part of this suite: bench/bench_data.py)" if dali_importable()
                     else "not installed, its part skipped", "budget (s)": args.budget,
                     "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.parts = {}
        self.rows = []  # a worker's part: its rows so far

    def path(self, suffix):
        return self.out / f"{self.stem}{suffix}"

    def left(self):
        """Seconds left to the current part."""
        return self.part_deadline - time.perf_counter()

    def note(self, *text):
        print(*text, file=self.logfile, flush=True)

    def say(self, text):
        print(text, flush=True)
        self.note(text)

    def add(self, *rows):
        """Record a part's measured rows as they come: a worker stopped at its time limit still hands them over."""
        self.rows.extend(rows)
        self.path(f"_{self.args.worker}_rows.json").write_text(json.dumps(self.rows, default=str))

    def run(self, name, later):
        """Run part `name` in a worker process, in its share of the time left (the rest of the budget divided
        in proportion to the weights of this part and the `later` ones); record its result and write."""
        now = time.perf_counter()
        share = WEIGHTS[name] / sum(WEIGHTS[p] for p in [name] + later)
        allotted = max(self.deadline - now, 0) * share
        if allotted < MIN_PART_S:
            return self.skip(name, f"skipped: {allotted:.0f} s of the budget left to it")
        self.say(f"\n== {TITLES[name]} ({allotted:.0f} s allotted) ==")
        result_file, rows_file = self.path(f"_{name}_result.json"), self.path(f"_{name}_rows.json")
        result_file.unlink(missing_ok=True)
        rows_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--out", str(self.out),
               "--until", f"{time.time() + allotted:.1f}", "--budget", str(self.args.budget)]
        cmd += ["--dry-run"] if self.dry else []
        cmd += ["--kernel-tests", self.args.kernel_tests] if self.args.kernel_tests else []
        self.logfile.flush()
        # stderr (warnings, a crash's traceback) to the log: the printed output stays short
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=self.logfile, start_new_session=True)
        limit = allotted + GRACE_S
        try:
            reason = f"the worker process ended with exit code {proc.wait(timeout=limit)} before reporting"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group: it and its pytest
            proc.wait()
            reason = f"stopped after {limit:.0f} s, {GRACE_S} s past its allotment"
        if result_file.is_file():
            result = json.loads(result_file.read_text())
        else:  # what it measured before it was stopped or crashed
            rows = json.loads(rows_file.read_text()) if rows_file.is_file() else []
            result = {"status": "failed", "summary": f"{reason} (see the log); {len(rows)} rows kept", "rows": rows}
            self.say(f"FAILED: {reason}")
        result_file.unlink(missing_ok=True)
        rows_file.unlink(missing_ok=True)
        result["seconds"] = time.perf_counter() - now
        self.parts[name] = result
        self.write()

    def skip(self, name, why):
        self.parts[name] = {"status": "skipped", "summary": why, "rows": [], "seconds": 0.0}
        self.write()

    def write(self):
        """Every result so far, rewritten after each part: a run cut off keeps what it finished."""
        for name, part in self.parts.items():
            if part["rows"]:
                write_csv(self.path(f"_{name}.csv"), part["rows"])
        record = {"meta": self.meta, "parts": self.parts, "elapsed_s": time.perf_counter() - self.t0}
        self.path(".json").write_text(json.dumps(record, indent=1, default=str))
        self.path(".md").write_text(markdown(self.meta, self.parts))


def worker(args):
    """One part, in this process, until args.seconds have passed; its result goes to a file for the suite."""
    if args.dry_run:
        torch.set_num_threads(1)  # a shared CPU: OpenMP threads stall each other on tiny ops
    suite = Suite(args)
    try:
        result = PARTS[args.worker](suite)
    except Exception as err:  # the error in one line for the table, the traceback in the log
        line = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        suite.note(f"part {args.worker} failed:\n{traceback.format_exc()}")
        suite.say(f"FAILED: {line}")
        result = {"status": "failed", "summary": line[:300], "rows": []}
    suite.path(f"_{args.worker}_result.json").write_text(json.dumps(result, default=str))
    suite.logfile.close()
    return 0


# ----------------------------------------------------------------------------- shared helpers

def write_csv(path, rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)


def cell(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v).replace("|", "/")


def md_table(rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return lines


def markdown(meta, parts):
    lines = [f"# GPU suite on {meta['device']}", ""] + [f"- {k}: {v}" for k, v in meta.items() if k != "device"]
    lines += ["", "| part | status | seconds | summary |", "|---|---|---:|---|"]
    lines += [f"| {TITLES[n]} | {p['status']} | {p['seconds']:.1f} | {cell(p['summary'])} |" for n, p in parts.items()]
    for name, part in parts.items():
        lines += ["", f"## {TITLES[name]}", "", part["summary"]]
        if part.get("notes"):
            lines += [""] + [f"- {n}" for n in part["notes"]]
        if part["rows"]:
            lines += [""] + md_table(part["rows"])
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def kernel_path(mode, poison=False):
    """SEGKD_KERNELS=mode (kernels/_dispatch.py reads it on every call) and, for the fused path, every buffer
    a kernel must fill poisoned with NaN, as the kernel tests do."""
    saved, _dispatch.POISON = _dispatch.POISON, poison
    try:
        with bench_kernels.kernels_env(mode):
            yield
    finally:
        _dispatch.POISON = saved


def outcome(rows, failed, trimmed):
    """A part's status: failed (a check failed or a step raised), incomplete (everything run passed, but the
    budget cut some of its plan), skipped (the budget left it nothing), or passed."""
    if failed or not (rows or trimmed):
        return "failed"
    if not rows:
        return "skipped"
    return "incomplete" if trimmed else "passed"


def release():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- 1a: ops at the workload shapes

class Size(NamedTuple):
    """Sizes of one set of op cases; `awkward` adds a valid-pixel mask and T = 2 to pixel_kl."""
    b: int        # batch
    k: int        # classes
    h: int        # feature map (output stride 8)
    w: int
    feat: int     # backbone channels after the connector (angular)
    dec: int      # decoder channels (apd)
    awkward: bool = False


WORKLOAD = Size(8, 19, 64, 128, 2048, 512)  # R101 -> R18 at 512x1024 crops, batch 8, output stride 8
AWKWARD = [Size(1, 150, 33, 65, 40, 24, True), Size(2, 171, 17, 31, 72, 48, True), Size(1, 11, 45, 61, 130, 9, True)]
DRY_WORKLOAD, DRY_AWKWARD = Size(2, 19, 6, 10, 24, 16), [Size(1, 11, 3, 7, 9, 12, True)]
VARIANTS = [(torch.float32, "contiguous"), (torch.bfloat16, "contiguous"), (torch.float32, "channels_last"),
            (torch.bfloat16, "channels_last"), (torch.float16, "contiguous"), (torch.float16, "channels_last")]


def in_layout(x, dtype, layout):
    """x rounded to `dtype`, in `layout` when 4-d."""
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" and x.dim() == 4 else x


def rand(shape, dtype, layout, device, scale=1.0):
    """Fresh random values (never zeros), rounded to `dtype`, in `layout` when 4-d."""
    return in_layout(torch.randn(shape, device=device) * scale, dtype, layout)


def op_cases(z, device):
    """[(op, what, make(dtype, layout) -> inputs, ours, reference, grad_idx)] at the sizes z: every fused op as
    the methods call it (kd/cwd on logits, lad/cad/pad on connector features, apd on decoder features, ADS on
    BN inputs)."""
    b, k, h, w = z.b, z.k, z.h, z.w
    hw, f32 = f"{h}x{w}", torch.float32
    valid = (torch.rand(b, h, w, device=device) > 0.3) if z.awkward else None
    temp = 2.0 if z.awkward else 1.0

    def pair(c, scale):
        return lambda dt, lay: [rand((b, c, h, w), dt, lay, device, scale), rand((b, c, h, w), dt, lay, device, scale)]

    def pool(dt, lay):
        labels = torch.randint(0, k, (b, h, w), device=device)
        labels[torch.rand(b, h, w, device=device) < 0.1] = 255
        return [rand((b, z.dec, h, w), dt, lay, device), labels]

    def protos(dt, lay):
        present = torch.rand(b, k, device=device) < 0.6
        present[:, 0] = True
        return [rand((b, z.dec, h, w), dt, lay, device), rand((b, z.dec, h, w), dt, lay, device),
                rand((b, k, z.dec), f32, lay, device), rand((b, k, z.dec), f32, lay, device), present]

    def observe(dt, lay):  # prototype_logits: pixel features, prototypes, present classes
        fs, _, ps, _, present = protos(dt, lay)
        return [fs, ps, present]

    def observe_labels(dt, lay):  # prototype_ce: features, prototypes, the labels' classes, the labels
        f, labels = pool(dt, lay)
        present = torch.stack([torch.isin(torch.arange(k, device=device), y[y < k]) for y in labels])
        return [f, rand((b, k, z.dec), f32, lay, device), present, labels]

    c_bn = max(z.dec // 2, 1)

    def bn_inputs(dt, lay):  # an ADS batch of BN inputs: twice the batch, a layer at twice the resolution
        x = torch.randn(2 * b, c_bn, 2 * h, 2 * w, device=device) * 2 + torch.randn(1, c_bn, 1, 1, device=device)
        return [in_layout(x, dt, lay), rand((c_bn,), f32, lay, device), rand((c_bn,), f32, lay, device).abs() + 0.5]

    ph, pw = (h + 1) // 2, (w + 1) // 2  # SKD's max-pool 2x2, ceil mode: the reference's N x N maps stay small

    def skd(dt, lay):
        return [rand((b, z.dec, ph, pw), dt, lay, device).relu(), rand((b, z.feat, ph, pw), dt, lay, device).relu()]

    def task(dt, lay):  # the student's logits and labels at 8x their size (awkward: not a multiple of it)
        hh, ww = (8 * h + 3, 8 * w - 5) if z.awkward else (8 * h, 8 * w)
        labels = torch.randint(0, k, (b, hh, ww), device=device)
        labels[torch.rand(b, hh, ww, device=device) < 0.1] = 255
        return [rand((b, k, h, w), dt, lay, device, 3), labels]

    def ifvd(dt, lay):
        f, labels = pool(dt, lay)
        return [f, rand((b, z.feat, h, w), dt, lay, device), labels]

    mask = ", valid mask" if valid is not None else ""
    cases = [
        ("pixel_kl", f"kd logits {b}x{k}x{hw}, T={temp:g}{mask}", pair(k, 3),
         lambda s, t: kernels.pixel_kl(s, t, temp, valid), lambda s, t: pixel_kl_reference(s, t, temp, valid), (0,)),
        ("channel_kl", f"cwd logits {b}x{k}x{hw}, T=4", pair(k, 3),
         lambda s, t: kernels.channel_kl(s, t, 4.0), lambda s, t: channel_kl_reference(s, t, 4.0), (0,)),
    ]
    for mode in MODES:
        cases.append(("angular_loss", f"{mode} features {b}x{z.feat}x{hw}", pair(z.feat, 1),
                      lambda s, t, m=mode: kernels.angular_loss(s, t, m),
                      lambda s, t, m=mode: angular_loss_reference(s, t, m), (0,)))
    cases += [
        ("masked_avg_pool", f"decoder {b}x{z.dec}x{hw}, K={k}", pool,
         lambda f, y: kernels.masked_avg_pool(f, y, k), lambda f, y: masked_avg_pool_reference(f, y, k), (0,)),
        ("masked_avg_pool", f"decoder {b}x{z.dec}x{hw}, K={k}, normalize", pool,
         lambda f, y: kernels.masked_avg_pool(f, y, k, normalize=True),
         lambda f, y: masked_avg_pool_reference(f, y, k, normalize=True), (0,)),
        ("prototype_kl", f"decoder {b}x{z.dec}x{hw}, K={k}, tau=0.1", protos,
         lambda *a: kernels.prototype_kl(*a, 0.1), lambda *a: prototype_kl_reference(*a, 0.1), (0, 2)),
        ("prototype_logits", f"decoder {b}x{z.dec}x{hw}, K={k}, tau=0.1", observe,
         lambda f, a, p: kernels.prototype_logits(f, a, p, 0.1),
         lambda f, a, p: prototype_logits_reference(f, a, p, 0.1), (0, 1)),
        ("prototype_ce", f"decoder {b}x{z.dec}x{hw}, K={k}, tau=0.1", observe_labels,
         lambda f, a, p, y: kernels.prototype_ce(f, a, p, y, 0.1),
         lambda f, a, p, y: prototype_ce_reference(f, a, p, y, 0.1), (0, 1)),
        ("bn_stat_distance", f"BN input {2 * b}x{c_bn}x{2 * h}x{2 * w}", bn_inputs,
         kernels.bn_stat_distance, bn_stat_distance_reference, (0,)),
        ("upsampled_cross_entropy", f"task loss {b}x{k}x{hw} -> x8 labels", task,
         lambda x, y: kernels.upsampled_cross_entropy(x, y), upsampled_cross_entropy_reference, (0,)),
        ("upsampled_cross_entropy", f"apd code L_t {b}x{k}x{hw} -> x8 labels, align_corners", task,
         lambda x, y: kernels.upsampled_cross_entropy(x, y, align_corners=True),
         lambda x, y: upsampled_cross_entropy_reference(x, y, 255, True), (0,)),
        ("upsampled_pixel_kl", f"apd code L_kd {b}x{k}x{hw} -> x8, T=2, align_corners", pair(k, 3),
         lambda s, t: kernels.upsampled_pixel_kl(s, t, (8 * h, 8 * w), 2.0, align_corners=True),
         lambda s, t: upsampled_pixel_kl_reference(s, t, (8 * h, 8 * w), 2.0, 1.0, True), (0,)),
        ("pairwise_similarity_loss", f"skd features {b}x{z.dec}|{z.feat}x{ph}x{pw} (pooled 2x2)", skd,
         kernels.pairwise_similarity_loss, pairwise_similarity_reference, (0,)),
        ("class_centre_mse", f"ifvd decoder {b}x{z.dec}|{z.feat}x{hw}, K={k}", ifvd,
         lambda s, t, y: kernels.class_centre_mse(s, t, y, k), lambda s, t, y: class_centre_mse_reference(s, t, y, k),
         (0,)),
    ]
    return cases


def run_op(fn, inputs, grad_idx, upstream):
    """-> (outputs, gradients of inputs[grad_idx]) of fn(*inputs), the first output backpropagated."""
    xs = [x.detach().clone().requires_grad_(i in grad_idx) if x.is_floating_point() else x
          for i, x in enumerate(inputs)]
    out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    outs[0].backward(upstream(outs[0]))
    return [o.detach() for o in outs], [xs[i].grad for i in grad_idx]


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64; inf for a missing or non-finite x (a poisoned element left unwritten)."""
    if x is None or x.shape != ref.shape or not torch.isfinite(x).all():
        return float("inf")
    diff, norm = (x.double() - ref).norm().item(), ref.norm().item()
    return diff / norm if norm > 0 else diff


def compare(ours_fn, ref_fn, inputs, grad_idx, mode="triton"):
    """Ours (fused, poisoned) and the torch reference in the inputs' dtype, each against the float64 reference.
    -> {"fwd"|"grad": (rel err of ours, rel err of torch, bound)} for the worst output / gradient, where
    bound = 2 * torch's + the kernel tests' allowance for the result's dtype (tests/kernels/kernel_testing.py)."""
    def upstream(out):
        if out.dim() == 0:
            return torch.full_like(out, GO)
        g = torch.Generator().manual_seed(1)
        return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)

    with kernel_path(mode, poison=True):  # triton, or cuda: the C++ kernels of csrc/
        ours = run_op(ours_fn, inputs, grad_idx, upstream)
    ref = run_op(ref_fn, [x.double() if x.is_floating_point() else x for x in inputs], grad_idx, upstream)
    same = run_op(ref_fn, inputs, grad_idx, upstream)
    result = {}
    for kind, i in (("fwd", 0), ("grad", 1)):
        checks = [(rel_err(o, r), rel_err(s, r), 2 * rel_err(s, r) + _slack(s.dtype))
                  for o, r, s in zip(ours[i], ref[i], same[i])]
        result[kind] = max(checks, key=lambda c: c[0] / c[2])
    return result


def part_workload(suite):
    """1a: every fused op at the workload shapes, then the awkward ones, each dtype and layout."""
    work, awkward = (DRY_WORKLOAD, DRY_AWKWARD) if suite.dry else (WORKLOAD, AWKWARD)
    torch.manual_seed(0)
    n = len(op_cases(work, suite.device))
    # (size, case index, dtype, layout), most important first
    if suite.dry:  # one variant per case, cycling, so that every dtype and layout is run once
        plan = [(work, i, *VARIANTS[i % len(VARIANTS)]) for i in range(n)]
        plan += [(z, i, *VARIANTS[(i + 3) % len(VARIANTS)]) for z in awkward for i in range(n)]
    else:
        plan = [(work, i, *v) for v in VARIANTS[:4] for i in range(n)]
        plan += [(work, i, *v) for v in VARIANTS[4:] for i in range(n)]
        plan += [(z, i, *VARIANTS[j]) for z in awkward for i in range(n) for j in (0, 3, 4)]
    rows, not_run = suite.rows, 0
    for z, i, dtype, layout in plan:
        if suite.left() <= 0:
            not_run += 1
            continue
        op, what, make, ours_fn, ref_fn, grad_idx = op_cases(z, suite.device)[i]
        dt = str(dtype).replace("torch.", "")
        try:
            res, error = compare(ours_fn, ref_fn, make(dtype, layout), grad_idx), ""
        except Exception as err:  # recorded as a failed case; the next case may still run
            inf = (float("inf"),) * 3
            res, error = {"fwd": inf, "grad": inf}, f"{type(err).__name__}: {str(err)[:200]}"
            suite.note(f"{op} {what} {dt} {layout}:\n{traceback.format_exc()}")
        ok = not error and all(e <= bound for e, _, bound in res.values())
        suite.add({"op": op, "case": what, "dtype": dt, "layout": layout,
                   "fwd rel err": res["fwd"][0], "fwd torch rel err": res["fwd"][1], "fwd bound": res["fwd"][2],
                   "grad rel err": res["grad"][0], "grad torch rel err": res["grad"][1], "grad bound": res["grad"][2],
                   "ok": ok, "error": error})
        suite.say(f"  {'ok  ' if ok else 'FAIL'} {op:16s} {what:42s} {dt:8s} {layout:13s} "
                  f"fwd {res['fwd'][0]:.1e} grad {res['grad'][0]:.1e} {error}")
        release()
    if suite.left() > 0:
        teacher_fusion(suite)
    else:
        not_run += 1
    bad = [r for r in rows if not r["ok"]]
    worst = max(rows, key=lambda r: max(r["fwd rel err"] / r["fwd bound"], r["grad rel err"] / r["grad bound"]),
                default=None)
    summary = f"{len(rows) - len(bad)}/{len(rows)} cases within tolerance"
    if worst:
        summary += (f"; closest to its bound: {worst['op']} {worst['dtype']} {worst['layout']} (fwd "
                    f"{worst['fwd rel err']:.1e}, grad {worst['grad rel err']:.1e})")
    if bad:
        summary += "; FAILED: " + ", ".join(f"{r['op']} {r['dtype']} {r['layout']}" for r in bad[:4])
    if not_run:
        summary += f"; {not_run} cases not run (budget)"
    return {"status": outcome(rows, bad, not_run), "summary": summary, "rows": rows}


def teacher_fusion(suite):
    """The step's lean teacher (engine/teacher.py: BatchNorm folded, conv + ReLU and conv + residual + ReLU fused
    through kernels.conv_bias_relu, i.e. cuDNN's fused convolution on CUDA) at the workload (PSPNet-R101, batch 8,
    512x1024, bf16, channels-last; dry run: pspnet_tiny at 64x80), fused and unfused (SEGKD_KERNELS=torch: the
    same lean copy, conv then add then ReLU), each against the fp32 unfolded teacher. One row: the fused error and
    its bound (twice the unfused error + the bf16 allowance), how many conv configurations cuDNN fused (the rest
    fell back, see conv_act's warning in the log), and the median forward time of each path."""
    from bench.bench_teacher import random_bn
    from engine.teacher import Frozen, TeacherForward
    from kernels import conv_act

    name, (b, h, w) = ("pspnet_tiny", (2, 64, 80)) if suite.dry else ("pspnet_r101", (8, 512, 1024))
    dtype = torch.bfloat16
    row = {"op": "teacher conv_bias_relu", "case": f"{name} [{b}, 3, {h}, {w}] forward", "dtype": "bfloat16",
           "layout": "channels_last", "grad rel err": 0.0, "grad torch rel err": 0.0, "grad bound": 1.0}
    try:
        torch.manual_seed(0)
        model = random_bn(build_model(name, 19)).to(suite.device)  # random BN statistics: the fold is not trivial
        frozen = Frozen(model)
        x = torch.randn(b, 3, h, w, device=suite.device).contiguous(memory_format=torch.channels_last)
        lean = TeacherForward(frozen, suite.device, dtype, channels_last=True)
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            want = frozen(x)[0].double()
        with kernel_path("auto"):
            fused = lean(x)[0]
        with kernel_path("torch"):
            unfused = lean(x)[0]
        err, err_unfused = rel_err(fused, want), rel_err(unfused, want)
        verdicts = [v for k, v in conv_act._verdicts.items() if k[0].type == suite.device.type]
        row.update({"fwd rel err": err, "fwd torch rel err": err_unfused,
                    "fwd bound": 2 * err_unfused + _slack(dtype),
                    "fused configurations": f"{sum(verdicts)}/{len(verdicts)}"})

        def timed(mode):
            with kernel_path(mode):
                times = []
                for _ in range(3 if suite.dry else 10):
                    release()
                    t0 = time.perf_counter()
                    lean(x)
                    release()
                    times.append(time.perf_counter() - t0)
            return 1e3 * sorted(times)[len(times) // 2]

        row["fused ms"], row["unfused ms"] = timed("auto"), timed("torch")
        row["ok"], row["error"] = row["fwd rel err"] <= row["fwd bound"], ""
    except Exception as err:
        row.update({"fwd rel err": float("inf"), "fwd torch rel err": float("inf"), "fwd bound": 0.0, "ok": False,
                    "error": f"{type(err).__name__}: {str(err)[:200]}"})
        suite.note(f"teacher fusion:\n{traceback.format_exc()}")
    suite.add(row)
    suite.say(f"  {'ok  ' if row['ok'] else 'FAIL'} {row['op']:16s} {row['case']:42s} fwd {row['fwd rel err']:.1e} "
              f"(bound {row['fwd bound']:.1e}) fused {row.get('fused configurations', '-')} configurations, "
              f"{row.get('fused ms', float('nan')):.2f} ms fused vs {row.get('unfused ms', float('nan')):.2f} ms "
              f"unfused {row['error']}")
    release()


# ----------------------------------------------------------------------------- 1b: the kernel test suite

TEST_ORDER = ("pixel_kl", "channel_kl", "angular", "masked_avg_pool", "prototype", "bn_stat", "unused_grads",
              "dispatch", "shared")
DRY_TESTS = ["tests/kernels/test_kernels_shared.py",
             "tests/kernels/test_kernels_pixel_kl.py::test_grad_output_one_leaves_forward_gradient"]
RESULT = re.compile(r"^(\S+?\.py)::(.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def kernel_test_selection(suite):
    if suite.args.kernel_tests:
        return [x.strip() for x in suite.args.kernel_tests.split(",") if x.strip()]
    if suite.dry:
        return DRY_TESTS
    files = sorted(ROOT.glob("tests/kernels/test_kernels_*.py"))
    rank = {f"test_kernels_{n}.py": i for i, n in enumerate(TEST_ORDER)}  # the ops of the workload first
    files.sort(key=lambda f: rank.get(f.name, len(rank)))
    return [str(f.relative_to(ROOT)) for f in files]


def part_tests(suite):
    """1b: pytest over the kernel tests in a subprocess (the default markers: `slow` ones are left out)."""
    selection = kernel_test_selection(suite)
    output = suite.path("_tests_pytest.txt")
    # the C++ variants (the `cuda` backend, test_kernels_cpp.py) stay out: building the library with nvcc would
    # spend minutes of this part's share; part 2 builds it and checks it at the workload shapes (cpp_correctness)
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", f"--junitxml={suite.path('_tests_junit.xml')}",
           "-k", "not cuda and not cpp", *selection]
    env = {k: v for k, v in os.environ.items() if k != "SEGKD_KERNELS"}
    env["PYTHONUNBUFFERED"] = "1"
    timeout = max(suite.left(), 10.0)
    suite.note("part tests: " + " ".join(cmd))
    with open(output, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            proc.kill()
            rc, timed_out = proc.wait(), True
    text = output.read_text(errors="replace")
    suite.note(text)
    counts = {}
    for line in text.splitlines():
        m = RESULT.match(line)
        if m:
            per = counts.setdefault(m.group(1), dict.fromkeys(("PASSED", "FAILED", "ERROR", "SKIPPED"), 0))
            per[m.group(3)] = per.get(m.group(3), 0) + 1
    rows = [{"file": f, "passed": c["PASSED"], "failed": c["FAILED"], "errors": c["ERROR"],
             "skipped": c["SKIPPED"]} for f, c in counts.items()]
    total = {k: sum(r[k] for r in rows) for k in ("passed", "failed", "errors", "skipped")}
    failures = [line for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    summary = (f"{total['passed']} passed, {total['failed']} failed, {total['errors']} errors, "
               f"{total['skipped']} skipped in {len(rows)} files")
    if timed_out:
        summary = f"stopped by the budget after {timeout:.0f} s: {summary}; the rest not run"
    elif rc != 0 and not failures:
        summary += f"; pytest exit code {rc} (see the log)"
    failed = total["failed"] or total["errors"] or (rc != 0 and not timed_out)
    return {"status": outcome(rows, failed, timed_out), "summary": summary, "rows": rows, "notes": failures[:20]}


# ----------------------------------------------------------------------------- 1c: fused vs reference training

TRAIN_METHODS = ("kd", "cad", "apd", "cwd", "dfss", "dfad")
OP_MODULES = ("pixel_kl", "channel_kl", "angular", "masked_avg_pool", "prototype", "bn_stat")
TERM_RTOL = 1e-3    # per loss term and step; fp32 rounding of the fused sums gives ~1e-6
UPDATE_RTOL = 2e-3  # ||update_fused - update_ref|| / ||update_ref|| after the steps; a wrong gradient gives O(1)


@contextlib.contextmanager
def fused_calls():
    """Count, per op module, the calls that took the Triton path: the check means nothing if none did."""
    counts, saved = {}, {}
    for name in OP_MODULES:
        mod = sys.modules[f"kernels.{name}"]
        saved[mod] = real = mod.use_triton

        def spy(*tensors, real=real, name=name, **kwargs):
            took = real(*tensors, **kwargs)
            counts[name] = counts.get(name, 0) + int(took)
            return took
        mod.use_triton = spy
    try:
        yield counts
    finally:
        for mod, real in saved.items():
            mod.use_triton = real


@contextlib.contextmanager
def deterministic():
    """cuDNN deterministic, no TF32: the two paths then differ only by the loss kernels."""
    b = torch.backends
    saved = (b.cudnn.deterministic, b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision())
    b.cudnn.deterministic, b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = True, False, False, False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        b.cudnn.deterministic, b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = saved[:4]
        torch.set_float32_matmul_precision(saved[4])


def ads_selection(trainer):
    """dfss's image selection (PoolSource.select without its score cache and matplotlib pictures, which the
    lent GPU machine may lack): ADS scores of the pool by the teacher's BN statistics (kernels.bn_stat_distance),
    the lowest kept. -> the scores, float64 [N]."""
    src, df, crop = trainer.source, trainer.cfg.method, trainer.cfg.data.crop
    pool = scoring_pool(src.root, src.files, df.ads_view, crop, df.ads_max_side)
    scores = score_pool(trainer.teacher.model, pool, df.ads_layers, df.ads_batch, trainer.env.device, 0)
    kept = select(scores, df.ads_keep)
    src.selection = ([src.files[i] for i in kept], torch.tensor(scores[kept], dtype=torch.float64))
    return scores


def train_steps(suite, argv, method, steps, mode):
    """`steps` trainer steps of `method` on kernel path `mode` -> (terms per step, weight update, fused calls,
    ADS scores or None)."""
    with kernel_path(mode, poison=mode == "triton"), fused_calls() as calls:
        trainer = Trainer(parse_config(argv), DistEnv(device=suite.device), echo=suite.note)
        scores = ads_selection(trainer) if method == "dfss" else None
        params = [p for g in trainer.step.optimizer.param_groups for p in g["params"]]
        before = torch.cat([p.detach().reshape(-1) for p in params]).double()
        batches = trainer.batches(0)
        terms = [{k: v.item() for k, v in trainer.step(next(batches), it).items()} for it in range(steps)]
        update = torch.cat([p.detach().reshape(-1) for p in params]).double() - before
    del trainer, batches
    release()
    return terms, update, dict(calls), scores


def part_training(suite):
    """1c: each method trained a few steps on both kernel paths from the same start."""
    # ads_layers: the interpreter runs bn_stat program by program; the dry run scores with the last layers only
    teacher, student, crop, batch, steps, ads_layers = (
        ("pspnet_tiny", "pspnet_tiny", (32, 32), 2, 2, "last-3") if suite.dry else
        ("pspnet_r101", "pspnet_r18", (256, 512), 4, 3, "all"))
    rows, not_run = suite.rows, []
    with tempfile.TemporaryDirectory(prefix="segkd-gpu-suite-") as tmp, deterministic():
        tmp = Path(tmp)
        torch.manual_seed(0)
        ckpt = tmp / "teacher.pt"
        torch.save(build_model(teacher, 8).state_dict(), ckpt)  # random weights; the synthetic set has 8 classes
        pool = tmp / "pool"
        pool.mkdir()
        g = torch.Generator().manual_seed(0)
        for i in range(4 * batch):  # dfss's unlabelled pool, scored in one batch; ADS keeps half
            pixels = torch.randint(0, 256, (crop[0], crop[1], 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(pool / f"{i:03d}.png")
        size = f"{crop[0]},{crop[1]}"
        base = ["--dataset", "synthetic", "--teacher", teacher, "--student", student, "--teacher-ckpt", str(ckpt),
                "--crop", size, "--batch-size", str(batch), "--workers", "0", "--val-size", "2", "--iters", "10",
                "--lr", "0.05", "--precision", "fp32", "--channels-last", "on", "--eval-interval", "0",
                "--resume", "none"]
        extra = {"dfad": ["--gen-size", size, "--gen-batch", str(batch), "--gen-every", "2"],
                 "dfss": ["--aux-data", str(pool), "--ads-keep", "0.5", "--ads-batch", str(4 * batch),
                          "--ads-layers", ads_layers]}
        for method in TRAIN_METHODS:
            if suite.left() <= 0:
                not_run.append(method)
                continue
            t0 = time.perf_counter()
            results = {}
            try:
                for mode in ("torch", "triton"):
                    run_dir = tmp / f"{method}-{mode}"
                    argv = base + extra.get(method, []) + ["--method", method, "--out", str(run_dir),
                                                           "--cache-dir", str(run_dir / "cache")]
                    results[mode] = train_steps(suite, argv, method, steps, mode)
                suite.add(compare_training(method, results["torch"], results["triton"], steps,
                                           time.perf_counter() - t0))
            except Exception as err:  # recorded as a failed method; the next one may still run
                suite.note(f"{method}:\n{traceback.format_exc()}")
                suite.add({"method": method, "steps": steps, "worst term rel diff": float("inf"),
                           "update rel diff": float("inf"), "fused calls": "-", "seconds": time.perf_counter() - t0,
                           "ok": False, "problem": f"{type(err).__name__}: {str(err)[:200]}"})
            r = rows[-1]
            suite.say(f"  {'ok  ' if r['ok'] else 'FAIL'} {method:5s} terms {r['worst term rel diff']:.1e} "
                      f"update {r['update rel diff']:.1e} fused calls: {r['fused calls']} {r['problem']}")
    bad = [r["method"] for r in rows if not r["ok"]]
    summary = (f"{len(rows) - len(bad)}/{len(rows)} methods train alike on both paths ({steps} steps, "
               f"{teacher} -> {student}, {crop[0]}x{crop[1]}, batch {batch}, fp32)")
    if rows:
        summary += (f"; worst term rel diff {max(r['worst term rel diff'] for r in rows):.1e}, "
                    f"update rel diff {max(r['update rel diff'] for r in rows):.1e}")
    if bad:
        summary += f"; FAILED: {', '.join(bad)}"
    if not_run:
        summary += f"; not run (budget): {', '.join(not_run)}"
    return {"status": outcome(rows, bad, not_run), "summary": summary, "rows": rows}


def compare_training(method, ref, fused, steps, seconds):
    (ref_terms, ref_update, ref_calls, ref_scores), (terms, update, calls, scores) = ref, fused
    problems, worst = [], 0.0
    if sum(ref_calls.values()):
        problems.append("the reference run took the fused path")
    if [t.keys() for t in terms] != [t.keys() for t in ref_terms]:
        problems.append("different loss terms")
    for r, f in zip(ref_terms, terms):
        for k in r.keys() & f.keys():
            d = abs(f[k] - r[k]) / max(abs(r[k]), 1e-12) if abs(r[k]) > 1e-6 else abs(f[k] - r[k])
            worst = max(worst, d if d == d else float("inf"))
    if not worst <= TERM_RTOL:
        problems.append(f"loss terms differ by {worst:.1e} > {TERM_RTOL}")
    upd = (update - ref_update).norm().item() / max(ref_update.norm().item(), 1e-30)
    if not upd <= UPDATE_RTOL:
        problems.append(f"weight update differs by {upd:.1e} > {UPDATE_RTOL}")
    if method != "dfad" and not sum(calls.values()):  # dfad's L1 uses no fused op
        problems.append("the fused path was not taken")
    row = {"method": method, "steps": steps, "worst term rel diff": worst, "update rel diff": upd,
           "fused calls": ", ".join(f"{k} {v}" for k, v in calls.items() if v) or "none (no fused op)"}
    if scores is not None:
        row["ADS score rel diff"] = float(abs(scores - ref_scores).max() / max(abs(ref_scores).max(), 1e-30))
        if not row["ADS score rel diff"] <= 1e-4:
            problems.append("ADS scores differ")
    row.update(seconds=seconds, ok=not problems, problem="; ".join(problems))
    return row


# ----------------------------------------------------------------------------- 2: kernel timings

# (op, bench_kernels shape label, dtype) most important first: the workload's shapes and dtypes (bf16 under
# autocast; apd's projector outputs are bf16 and normalised inside its ops), then issue 3's headline pixel_kl shape
# and the other dtypes and modes.
TIMING_CASES = [
    ("pixel_kl", "8x19x64x128", "bfloat16"), ("channel_kl", "8x19x64x128", "bfloat16"),
    ("angular", "channel 8x512x64x128", "bfloat16"), ("masked_avg_pool", "8x512x64x128 K=19 normalize", "bfloat16"),
    ("prototype_kl", "8x512x64x128 K=19", "bfloat16"), ("prototype_ce", "8x512x64x128 K=19", "bfloat16"),
    ("bn_stat", "8x512x64x128", "bfloat16"), ("upsampled_ce", "8x19x64x128 -> 512x1024", "bfloat16"),
    ("pixel_kl", "8x19x512x1024", "bfloat16"), ("pixel_kl", "8x19x64x128", "float32"),
    ("channel_kl", "8x19x64x128", "float32"), ("angular", "layer 8x512x64x128", "bfloat16"),
    ("angular", "point 8x512x64x128", "bfloat16"), ("masked_avg_pool", "8x512x64x128 K=19", "bfloat16"),
    ("masked_avg_pool", "8x512x64x128 K=19", "float32"), ("prototype_kl", "8x512x64x128 K=19", "float32"),
    ("bn_stat", "8x512x64x128", "float32"), ("pairwise", "8x512|2048x32x64", "bfloat16"),
    ("upsampled_ce", "8x150x64x64 -> 512x512", "bfloat16"), ("prototype_logits", "8x512x64x128 K=19", "bfloat16"),
]
COMPILE_ESTIMATE_S = 60  # a first torch.compile of one case, forward and forward+backward, before any is measured


def timing_cases(suite):
    """[(op, label, dtype, make, providers, bytes fwd, bytes fwd+bwd)] in TIMING_CASES' order (dry run: the first
    small case of each op)."""
    picked = []
    for op in bench_kernels.OPS:
        found = list(bench_kernels.cases(op, suite.dry))
        if suite.dry:
            picked.append((0, (op, *found[0])))
            continue
        for case in found:
            key = (op, case[0], str(case[1]).replace("torch.", ""))
            if key in TIMING_CASES:
                picked.append((TIMING_CASES.index(key), (op, *case)))
    return [case for _, case in sorted(picked, key=lambda x: x[0])]


def part_timings(suite):
    """2: bench/bench_kernels.py's cases and providers: eager and ours first for every case, then
    torch.compile case by case while the budget lasts (each first compile takes tens of seconds)."""
    bk = bench_kernels
    torch._dynamo.config.cache_size_limit = 256
    reps = 2 if suite.dry else 20
    copy_gbs = bk.copy_bandwidth_gbs(reps)
    cases = timing_cases(suite)
    first = ["eager", "ours"] + (["liger"] if suite.cuda and bk.has_liger() else [])
    rows, notes, skipped, expected, skipped_compile = suite.rows, [], [], 0, False
    for op, label, dtype, make, provs, bf, bfb in cases:
        if suite.left() <= 0:
            skipped.append(f"{op} {label}")
            continue
        expected += 2 * sum(p in provs for p in first)  # fwd and fwd+bwd of each provider the op has
        suite.add(*bk.run_case(op, label, dtype, make, provs, bf, bfb, first, reps, copy_gbs))
        release()
    cpp_cases, cpp_failed = [c for c in cases if "cpp" in c[4]], False
    if cpp_cases and suite.left() > (30 if suite.dry else 120):  # the C++ backend (csrc/), op by op beside ours
        from kernels import _cpp

        t0 = time.perf_counter()
        built = _cpp.ops() is not None  # the first use builds it: a minute or more with nvcc
        notes.append(f"C++ backend (csrc/): {'built' if built else 'NOT built'} in {time.perf_counter() - t0:.0f} s"
                     + ("" if built else f" ({str(_cpp.ERROR).splitlines()[0][:200] if _cpp.ERROR else '?'})")
                     + (" WITHOUT its CUDA kernels (no nvcc): not timed" if built and suite.cuda and not _cpp.HAS_CUDA
                        else ""))
        built = built and (_cpp.HAS_CUDA or not suite.cuda)
        if built:
            cpp_failed = cpp_correctness(suite, notes)
        for op, label, dtype, make, provs, bf, bfb in cpp_cases if built else []:
            if suite.left() <= 0:
                notes.append(f"cpp of {op} {label} {dtype}: skipped: budget")
                continue
            suite.add(*bk.run_case(op, label, dtype, make, provs, bf, bfb, ["cpp"], reps, copy_gbs))
            release()
    elif cpp_cases:
        notes.append("C++ backend (csrc/): not built: budget")
    if not suite.cuda:
        notes.append("torch.compile: skipped: needs CUDA (Inductor on the CPU takes minutes per shape)")
    else:
        longest = COMPILE_ESTIMATE_S
        for op, label, dtype, make, provs, bf, bfb in cases:
            if suite.left() < longest:
                notes.append(f"torch.compile of {op} {label} {dtype}: skipped: budget")
                skipped_compile = True
                continue
            t0 = time.perf_counter()
            suite.add(*bk.run_case(op, label, dtype, make, provs, bf, bfb, ["compile"], reps, copy_gbs))
            longest = max(time.perf_counter() - t0, 10.0)
            release()
    eager = {(r["op"], r["shape"], r["dtype"], r["pass"]): r["ms"] for r in rows if r["provider"] == "eager"}
    for r in rows:
        key = (r["op"], r["shape"], r["dtype"], r["pass"])
        r["speedup_vs_eager"] = eager[key] / r["ms"] if key in eager else None
    got = sum(r["provider"] in first for r in rows)
    if got < expected:
        notes.append(f"{expected - got} eager/ours timings failed (their error is printed above)")
    if skipped:
        notes.append("not timed (budget): " + ", ".join(skipped))
    meta = dict(suite.meta, **{"copy bandwidth (GB/s, measured)": f"{copy_gbs:.1f}",
                               "ours runs": "triton" if suite.cuda else "torch reference (CPU)",
                               "timing": "triton.testing.do_bench median" if suite.cuda else
                               f"wall-clock median of {reps}, CPU", "grad_output": f"{bk.GO} for scalar losses"})
    stem = suite.out / f"kernels_{slug(suite.name)}{'_dry-run' if suite.dry else ''}"
    stem.with_suffix(".md").write_text(bk.markdown(meta, rows))
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "targets": bk.targets(rows)},
                                                    indent=1))
    heads = [r for r in rows if r["provider"] == "ours" and r["pass"] == "fwd+bwd"][:3]
    summary = f"{len(rows)} timings of {len(cases) - len(skipped)} cases, copy {copy_gbs:.0f} GB/s; " + "; ".join(
        f"{r['op']} {r['shape']} {r['dtype']} fwd+bwd ours {r['ms']:.3f} ms = {r['speedup_vs_eager']:.1f}x eager, "
        f"{100 * r['copy_frac']:.0f}% copy BW" for r in heads if r["speedup_vs_eager"])
    return {"status": outcome(rows, got < expected or cpp_failed, skipped or skipped_compile), "summary": summary,
            "rows": rows, "notes": notes + bk.targets(rows)}


def cpp_correctness(suite, notes):
    """The C++ backend (SEGKD_KERNELS=cuda) against float64 at the workload shapes, as part 1a checks Triton: every op
    it has, bf16 channels-last and fp32 NCHW. Adds a note; True when a case failed. (Part 1b leaves the C++ variants
    of the kernel tests out: their first one would spend minutes of its share building the library.)"""
    from kernels import _cpp

    work = DRY_WORKLOAD if suite.dry else WORKLOAD
    names = set(_cpp.CPP_OPS)
    results = []
    for op, what, make, ours_fn, ref_fn, grad_idx in op_cases(work, suite.device):
        if op not in names or "align_corners" in what:  # the C++ kernels have align_corners=False's rule only
            continue
        for dtype, layout in ((torch.bfloat16, "channels_last"), (torch.float32, "contiguous")):
            if suite.left() <= 0:
                break
            name = f"{op} {what} {str(dtype).replace('torch.', '')} {layout}"
            try:
                res = compare(ours_fn, ref_fn, make(dtype, layout), grad_idx, mode="cuda")
                results.append((name, all(e <= bound for e, _, bound in res.values()), res))
            except Exception as err:
                suite.note(f"cpp {name}:\n{traceback.format_exc()}")
                results.append((name, False, f"{type(err).__name__}: {str(err)[:160]}"))
            suite.say(f"  {'ok  ' if results[-1][1] else 'FAIL'} cpp {name}")
            release()
    bad = [r for r in results if not r[1]]
    notes.append(f"C++ backend vs float64 at the workload shapes: {len(results) - len(bad)}/{len(results)} cases "
                 "within tolerance" + ("; FAILED: " + ", ".join(r[0] for r in bad[:6]) if bad else ""))
    return bool(bad)


# ----------------------------------------------------------------------------- 3: the training step

# The variants of segkd's step (bench/train_throughput.py flags) and the units timed, most important first: the
# default step (bf16, channels-last on a GPU) of every method against the CIRKD-style loop, the student alone for
# the distillation overhead, then one speed option at a time on and off, kd before cad.
TRAIN_FLAGS = {"default": [], "fp32 NCHW": ["--precision", "fp32", "--channels-last", "off"],
               "teacher CUDA graph": ["--teacher-cuda-graph"], "compile": ["--compile"],
               "compile + teacher CUDA graph": ["--compile", "--teacher-cuda-graph"]}
TRAIN_UNITS = [("default", m) for m in ("none", "kd", "cad", "apd", "cwd")] + [
    ("teacher CUDA graph", "kd"), ("fp32 NCHW", "kd"), ("compile", "kd"), ("teacher CUDA graph", "cad"),
    ("fp32 NCHW", "cad"), ("compile + teacher CUDA graph", "kd")]
FIRST_UNIT_S, COMPILE_UNIT_S = 30, 150  # estimates (GPU) before a unit of the kind has been measured


def part_train(suite):
    """3: segkd's step against the CIRKD-style loop, and segkd alone in a few variants, unit by unit while the
    budget lasts (a unit: one method's step built and timed, and for the default variant the reference's)."""
    tt = train_throughput
    timing = ["--small", "--warmup", "1", "--steps", "1"] if suite.dry else ["--warmup", "3", "--steps", "10"]
    env = init_distributed("auto")
    rows, notes, errors, last, alone, trimmed = suite.rows, [], [], {}, None, False
    args = {name: tt.parse_args(timing + flags) for name, flags in TRAIN_FLAGS.items()}
    base = args["default"]
    with tempfile.TemporaryDirectory(prefix="segkd-gpu-suite-") as tmp:
        dataset = build_dataset(base.dataset, "train", root=base.data_root, train=True, crop=tuple(base.crop))
        torch.manual_seed(0)
        teacher_state = build_model(base.teacher, dataset.num_classes).state_dict()  # random: timing only
        ckpt = os.path.join(tmp, "teacher.pt")
        torch.save(teacher_state, ckpt)
        for name, method in TRAIN_UNITS:
            flags, with_ref = TRAIN_FLAGS[name], name == "default"
            if not suite.cuda and ("--compile" in flags or "--teacher-cuda-graph" in flags):
                notes.append(f"{name} {method}: skipped: needs CUDA")  # CUDA graphs; Inductor on CPU: minutes
                continue
            kind = "compile" if "--compile" in flags else "eager"
            estimate = last.get(kind, COMPILE_UNIT_S if kind == "compile" else FIRST_UNIT_S) if suite.cuda else 0
            if suite.left() < estimate:
                notes.append(f"{name} {method}: skipped: budget ({suite.left():.0f} s left, ~{estimate:.0f} s needed)")
                trimmed = True
                continue
            t0 = time.perf_counter()
            try:
                seg, settings = tt.run_segkd(args[name], env, method, ckpt, tmp)
                ref = (tt.run_reference(args[name], method, teacher_state, dataset, env.device)
                       if with_ref and method != "none" else None)
            except Exception as err:  # one variant failing (a CUDA graph, say) must not lose the others
                errors.append(f"{name} {method}: {type(err).__name__}: {str(err)[:200]}")
                suite.note(f"part train, {name} {method} failed:\n{traceback.format_exc()}")
                suite.say(f"  FAIL {errors[-1]}")
                continue
            last[kind] = time.perf_counter() - t0
            if method == "none":
                alone = seg
                continue
            suite.add(train_row(name, method, seg, ref, alone if with_ref else None, settings))
            r = rows[-1]
            suite.say(f"  {name:18s} {method:4s} segkd {r['segkd img/s']:7.1f} img/s {r['segkd ms/step']:7.1f} "
                      f"ms/step, loss {100 * r['loss share']:.1f}% of the step"
                      + (f" | reference {r['ref img/s']:7.1f} img/s, ratio {r['ratio']:.2f}" if ref else ""))
    head = [r for r in rows if r["variant"] == "default"]
    summary = (f"{len(rows)} steps timed ({base.teacher} -> {base.student}, {'x'.join(map(str, base.crop))}, "
               f"batch {base.batch_size})")
    if head:
        summary += "; " + "; ".join(f"{r['method']} {r['ratio']:.2f}x the reference, loss {100 * r['loss share']:.1f}%"
                                    for r in head)
    if errors:
        summary += f"; {len(errors)} failed: " + "; ".join(errors)[:300]
    return {"status": outcome(rows, errors, trimmed), "summary": summary, "rows": rows, "notes": notes + errors}


def train_row(variant, method, seg, ref, alone, settings):
    """One timed step: segkd's figures, the reference's and their ratio, the loss phase's share of the step,
    and the distillation overhead of bench/train_throughput.py when the student-alone step was timed."""
    phases, total = seg["phases"], seg["phase_step_ms"]
    teacher_ms = train_throughput.teacher_phase_ms(phases)
    return {"variant": variant, "method": method, "segkd img/s": seg["img_s"], "segkd ms/step": seg["step_ms"],
            "ref img/s": ref["img_s"] if ref else None, "ref ms/step": ref["step_ms"] if ref else None,
            "ratio": seg["img_s"] / ref["img_s"] if ref else None,
            "loss share": phases.get("loss", 0.0) / total if total else 0.0,
            "teacher share": teacher_ms / total if total else 0.0,
            "overhead": (seg["step_ms"] - teacher_ms - alone["step_ms"]) / alone["step_ms"] if alone else None,
            "segkd peak MB": seg["peak_mem_mb"] if torch.cuda.is_available() else None,
            "ref peak MB": ref["peak_mem_mb"] if ref and torch.cuda.is_available() else None, "step": settings}


# ----------------------------------------------------------------------------- main

PARTS = {"workload": part_workload, "tests": part_tests, "training": part_training, "timings": part_timings,
         "train": part_train}


def final_table(suite):
    lines = [f"== GPU suite on {suite.name}: {time.perf_counter() - suite.t0:.0f} s of a {suite.args.budget:.0f} s "
             "budget ==", f"{'part':40s} {'status':10s} {'s':>6s}  summary"]
    for name, part in suite.parts.items():
        summary = part["summary"] if len(part["summary"]) <= 200 else part["summary"][:197] + "..."
        lines.append(f"{TITLES[name]:40s} {part['status']:10s} {part['seconds']:6.1f}  {summary}")
    lines.append(f"results: {suite.path('.md')} (and .json, .log, _<part>.csv)")
    return "\n".join(lines)


def main(args):
    if args.worker:
        return worker(args)
    if not torch.cuda.is_available() and not args.dry_run:
        sys.exit("gpu_suite.py: error: no CUDA device here; --dry-run runs the plan on the CPU")
    suite = Suite(args)
    for k, v in suite.meta.items():
        suite.say(f"{k}: {v}")
    if suite.cuda:
        suite.say(f"GPU memory: {torch.cuda.get_device_properties(0).total_memory / 2 ** 30:.0f} GiB")
    chosen = [p for p in PARTS if p in args.parts]
    for name in PARTS:
        if name in chosen:
            suite.run(name, chosen[chosen.index(name) + 1:])
        else:
            suite.skip(name, "not selected (--parts)")
    suite.logfile.close()
    print("\n" + final_table(suite), flush=True)
    return 1 if any(p["status"] == "failed" for p in suite.parts.values()) else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
