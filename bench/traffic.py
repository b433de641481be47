"""A traffic model of one training step: kernel launches and device-memory bytes per phase, counted on the CPU.

    python bench/traffic.py                    # the workload: PSPNet-R101 -> R18, 512x1024, batch 8, 19 classes
    python bench/traffic.py --small            # pspnet_small -> pspnet_tiny, 64x64, batch 2 (what the test runs)
    python bench/traffic.py --methods kd,apd --bandwidth 3.35e12

It is a MODEL counted on the CPU, not a measurement: no GPU runs and no tensor holds data. segkd's real step
(engine/step.py TrainStep, built as the trainer builds it, bf16 autocast, channels-last) runs on fake tensors
(torch FakeTensorMode: shapes, dtypes and strides, no storage), and a TorchDispatchMode (bench/traffic_model.py,
the machinery; this docstring states its rules) counts every aten op it dispatches:

  - an op that computes: one launch; bytes read = every tensor argument it reads, bytes written = every
    tensor it writes (a mutated argument or a new output), each `numel * itemsize` (for an expanded tensor,
    the storage it spans). `copy_`, `fill_`, `zero_`, the random fills and `out=` arguments are written, not
    read; fused SGD's grads are read, not written;
  - a view (an op whose outputs all share storage with its inputs and that writes nothing: view, reshape of a
    contiguous tensor, permute, expand, detach, `.contiguous()` of a contiguous tensor ...) and an allocation
    (empty, empty_like, ...): no launch, no bytes. `.contiguous()` / clone / `.to()` that copy are real ops;
  - segkd's fused ops (kernels/*.py, torch.library custom ops) run their own launcher (`<op>_forward` /
    `_backward`) on the fake tensors, so the launcher's `.contiguous()` copies, buffer fills and small torch
    reductions are counted as aten ops, and each Triton launch (`kernel[grid](...)`, intercepted: nothing is
    compiled) is one launch whose bytes are its tensor arguments, read or written as the kernel's own pointer
    comments say (kernel_roles: "out" written, "in place" / "atomic" read and written, "when FLAG" only when
    the constexpr FLAG is set). A fused op is thus the launches the GPU sees, not one: pixel_kl's forward on
    channels-last logits is two copies, a fill, its kernel and four tiny reductions. The one data-dependent
    kernel, `_scale_grad_kernel`, touches its gradient only when grad_output != 1: the model follows the value
    of every scalar the step computes from constants (the backward's seed 1, the loss weights), so kd at
    weight 1 skips it as the GPU does.

What makes the CPU run the GPU's step:
  - autocast follows CUDA's policy, not the CPU's: ATen/autocast_mode.h's op lists (lower precision, fp32,
    fp32 with dtype, promote), which AutocastCUDA registers, are registered for AutocastCPU for the run
    (the CPU's own list keeps softmax, upsampling and reductions in bf16, CUDA's computes them in fp32);
  - every loss goes through its fused op (`use_triton` returns True), as CUDA tensors do;
  - optimizers run as on CUDA: the trainer's fused SGD, and foreach for torch's own default (APD's Adam),
    with Adam's step counters on the host (not device tensors, as torch keeps them without `capturable`);
  - the models are converted to channels-last before their parameters become fake (`Module.to` cannot swap
    fake parameters), so the step is built with `channels_last=False` and the same layouts.
One step is counted after one uncounted warm-up step (momentum buffers and optimizer state exist, as in every
step but the first).

Phases, from the step's own clock (engine/profile.py's `begin`): teacher forward, student forward, the loss
(split by loss term), backward (split by autograd node: the student's nodes, and each loss term's: the nodes
reachable from that term but not from the student's outputs; a node or op several terms share is reported
under their joined names), optimizer. A loss term's forward ops are the ops in the loss phase whose results
the term depends on (data flow through storages). One backward runs, as in the real step.

Minimum bytes of a region (a phase row, or one loss op's forward + backward): each tensor it reads that was
written outside it (or before the step) read once, each tensor it writes that is read outside it (or kept:
parameters, gradients, buffers, optimizer state) written once: intermediates cost nothing. For a loss op
(kernels.<op> and segmentation_ce, wrapped while the step runs; its backward is the autograd nodes its call
created, hooked) that is its inputs read once, its outputs and the gradients of its inputs written once. For
a forward phase, what the backward reads later (saved activations) counts as written. Predicted time =
bytes / --bandwidth (read + write bytes per second; default 4.3e12, the H200's measured device-to-device copy
rate): bandwidth only, no launch latency, no compute, no L2 reuse.

Targets (issue 12), reported PASS/FAIL, never failing the run: each fused loss op of kernels/ (segmentation_ce
is shown beside them) within 1.25x of its minimum; APD's loss terms (its "loss terms GB": every loss row but
the task loss `ce` and the sum of the terms, forward + backward; not the networks, the cross-entropy or the
optimizer) at or under 5 GB; no host sync in any method's step, and the reference loop's syncs found.

Modelling shortcuts (read before quoting a figure):
  - an aten op reads each tensor argument once in full and writes each output once: kernels that make two
    passes (batch-norm statistics, then normalisation; softmax) are under-counted, and ops that take a tensor
    only for its shape or read part of it (max_pool2d_with_indices_backward's input, gather/index sources)
    are over-counted; cuDNN/cuBLAS workspaces and autotuning are not modelled. A composite op that reaches the
    counter whole (without autograd, e.g. conv2d and batch_norm in the teacher's inference-mode forward; the
    fake mode decomposes it beneath) counts as one launch over its inputs and outputs;
  - a Triton launch touches each pointer argument once in full: re-reads of tiles within one kernel (pixel_kl
    and prototype_kl re-read tiles they just loaded; pixel_kl's two-pass class loop at C > 256), atomics and
    partially read buffers are not modelled;
  - a foreach / fused multi-tensor op is one launch (CUDA splits it by its chunk size); the output memory
    format of a convolution is the meta kernel's, which matches cuDNN's except for a contiguous input with a
    channels-last weight;
  - host syncs: an op that brings a device value to the host (`.item()`: `_local_scalar_dense`; `torch.equal`;
    `nonzero` and boolean-mask indexing) is a sync; the model cannot see `.cpu()` / `.tolist()` copies or a
    blocking host-to-device copy (no device exists), nor syncs outside the step. A value read on the host
    is a stand-in (the tracked scalar value, else 1); boolean masks are taken as all-true.

The reference loop (bench/cirkd_reference.py: fp32, NCHW, `.item()` of every loss term every step) is counted
the same way on meta tensors (fp32 needs no autocast; its SGD and Adam set to foreach, torch's CUDA default),
one iteration of ReferenceTrainer.train (train_step, the loss reduction, the `.item()` log) after a warm-up one,
for its host syncs and its totals beside segkd's. dfad and dfss (their own generated inputs) are not counted.
Results: bench/results/traffic_<setting>.md and .json (`workload`, or `small` with --small).
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from bench.traffic_model import (FUSED_OPS, CountingClock, boundary, fakeify, persistent_keys,  # noqa: E402
                                 traffic_model)
from engine.config import OptimConfig  # noqa: E402
from engine.methods import METHODS, Method, MethodConfig, build_method  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.step import Distiller, TrainStep, describe  # noqa: E402
from engine.teacher import Frozen  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setting:
    teacher: str
    student: str
    crop: tuple
    batch_size: int
    num_classes: int = 19
    dtype: torch.dtype = torch.bfloat16
    channels_last: bool = True


WORKLOAD = Setting("pspnet_r101", "pspnet_r18", (512, 1024), 8)  # issue 12: Cityscapes crops, batch 8
SMALL = Setting("pspnet_small", "pspnet_tiny", (64, 64), 2)
# every method that learns from a teacher on the labelled loader (dfad and dfss bring their own inputs)
TEACHER_METHODS = tuple(n for n, m in METHODS.items()
                        if m.needs_teacher and m.train_source is Method.train_source)
# counted variants beside the methods: label -> (method, settings); the APD recipes (engine/recipes.py) train with the
# authors' code convention, the default is the paper's
VARIANTS = {"apd-code": ("apd", {"apd_convention": "code"})}
CHOICES = TEACHER_METHODS + tuple(VARIANTS)
BANDWIDTH = 4.3e12                    # B/s, read + write: the H200's measured device-to-device copy rate
TARGET_OP_RATIO = 1.25                # issue 12: each loss op, forward + backward, within 1.25x of its minimum
TARGET_APD_BYTES = 5e9                # issue 12: the whole APD method (its loss terms) at or under 5 GB
IGNORE_INDEX = 255


# ----------------------------------------------------------------------------- segkd's step on fake tensors

def meta_models(method, setting):
    """(teacher, distiller) of `method` (a method or a VARIANTS label) on the meta device, in the step's memory format,
    as the trainer builds them."""
    k = setting.num_classes
    method, overrides = VARIANTS.get(method, (method, {}))
    with torch.device("meta"):
        teacher = build_model(setting.teacher, k)
        student = build_model(setting.student, k)
        method_module = build_method(MethodConfig(method=method, **overrides), student.channels, teacher.channels, k,
                                     IGNORE_INDEX)
        distiller = Distiller(student, method_module, IGNORE_INDEX)
    if setting.channels_last:
        distiller.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    return teacher, distiller


def fake_step(teacher, distiller, setting):
    """(step, batch, frozen teacher) under a FakeTensorMode, the models already fake."""
    frozen = Frozen(teacher)
    step = TrainStep.build(distiller, frozen, torch.device("cpu"), optim=OptimConfig(), dtype=setting.dtype,
                           channels_last=False, optim_impl="fused")  # channels-last: converted in meta_models
    step.description = describe(setting.dtype, setting.channels_last, step.optim_impl, False, False, False)
    for opt in step.method_optimizers:  # torch's default on CUDA tensors is foreach
        for g in opt.param_groups:
            if g.get("foreach") is None and not g.get("fused"):
                g["foreach"] = True
    b, (h, w) = setting.batch_size, setting.crop
    image = torch.empty(b, 3, h, w)
    batch = {"image": image.contiguous(memory_format=torch.channels_last) if setting.channels_last else image,
             "label": torch.zeros(b, h, w, dtype=torch.long)}
    step.model.train()
    return step, batch, frozen


def count_segkd(method, setting):
    """Count one step of segkd's `method` (after an uncounted warm-up step) -> Count."""
    teacher, distiller = meta_models(method, setting)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakeify(distiller, mode)
    fakeify(teacher, mode)
    with traffic_model(mode=mode, dtype=setting.dtype) as (counter, ops):
        counter.recording = False
        step, batch, teacher = fake_step(teacher, distiller, setting)
        step(batch, 0)
        counter.recording = True
        clock = CountingClock(counter, distiller)
        try:
            step(batch, 1, clock)
        finally:
            clock.remove()
        keep = persistent_keys(counter, [distiller, teacher], [step.optimizer, *step.method_optimizers])
    return Count(method, counter.events, keep, dict(ops.calls), list(clock.terms), step.description)


# ----------------------------------------------------------------------------- the reference loop on meta tensors

class _MetaImages(torch.utils.data.Dataset):
    """A labelled dataset of meta tensors at the crop size; fetching an item ends a counted step."""

    def __init__(self, setting, counter, window):
        self.setting, self.counter, self.window = setting, counter, window
        self.num_classes, self.ignore_index = setting.num_classes, IGNORE_INDEX

    def __len__(self):
        return 64

    def __getitem__(self, i):
        if self.window["open"]:
            self.window["open"], self.counter.recording = False, False
        h, w = self.setting.crop
        return {"image": torch.empty(3, h, w, device="meta"), "label": torch.zeros(h, w, dtype=torch.long,
                                                                                   device="meta")}


def count_reference(method, setting):
    """Count one iteration of the reference loop (bench/cirkd_reference.py ReferenceTrainer.train: train_step,
    the loss reduction and the `.item()` log) after a warm-up one -> Count."""
    from cirkd_reference import ReferenceTrainer

    with torch.device("meta"):
        teacher = build_model(setting.teacher, setting.num_classes)
        student = build_model(setting.student, setting.num_classes)
    with traffic_model(fake=False) as (counter, _):
        counter.recording = False
        window = {"open": False}
        ref = ReferenceTrainer(method, teacher, student, _MetaImages(setting, counter, window),
                               batch_size=setting.batch_size, workers=0, device="meta",
                               mcfg=MethodConfig(method=method), ocfg=OptimConfig(), max_iterations=10, log_every=1)
        for opt in [ref.optimizer, *ref.extra_optimizers]:  # torch's default on CUDA tensors is foreach
            for g in opt.param_groups:
                if g.get("foreach") is None:
                    g["foreach"] = True
        calls = {"n": 0}
        train_step = ref.train_step

        def counted_step(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                window["open"], counter.recording, counter.phase = True, True, "reference step"
            return train_step(*args, **kwargs)

        ref.train_step = counted_step
        ref.train(warmup=1, steps=2)
    return Count(method, counter.events, set(), {}, [], "fp32, NCHW, torch.optim.SGD (foreach), .item() every step")


# ----------------------------------------------------------------------------- tables

@dataclasses.dataclass
class Count:
    method: str
    events: list
    persistent: set
    calls: dict           # loss-op call -> op name
    terms: list
    description: str

    @property
    def launches(self):
        return sum(e.launches for e in self.events)

    @property
    def bytes(self):
        return sum(e.read + e.written for e in self.events)

    @property
    def syncs(self):
        return [e for e in self.events if e.sync]

    @property
    def method_bytes(self):
        """Bytes of the method's own loss terms, forward + backward: the loss rows but the task loss's (ce) and
        the sum of the terms (the networks, the cross-entropy and the optimizer are not the method's)."""
        return sum(e.read + e.written for e in self.events if e.row.startswith("loss ")
                   and e.row.split(": ", 1)[1] not in ("ce", "total"))


ROW_ORDER = ("teacher forward", "student forward", "loss forward", "loss backward", "student backward", "optimizer")


def phase_rows(count, bandwidth):
    """One row per phase (loss phases per term), then the total; each with its minimum and predicted ms."""
    minimum = boundary(count.events, lambda e: e.row, count.persistent)
    whole = boundary(count.events, lambda e: "step", count.persistent)["step"]
    agg = {}
    for e in count.events:
        a = agg.setdefault(e.row, {"launches": 0, "read": 0, "written": 0})
        a["launches"] += e.launches
        a["read"] += e.read
        a["written"] += e.written

    def order(row):  # the step's order: phases as they run, loss terms as the method returns them, totals last
        rank = next((i for i, p in enumerate(ROW_ORDER) if row.startswith(p)), len(ROW_ORDER))
        first = row.split(": ", 1)[-1].split("+")[0]
        return rank, count.terms.index(first) if first in count.terms else len(count.terms), row

    rows = [dict(phase=r, **a, minimum=minimum.get(r, 0)) for r, a in sorted(agg.items(), key=lambda x: order(x[0]))]
    rows.append({"phase": "total", "launches": count.launches, "read": sum(r["read"] for r in rows),
                 "written": sum(r["written"] for r in rows), "minimum": whole})
    for r in rows:
        r["ratio"] = (r["read"] + r["written"]) / r["minimum"] if r["minimum"] else None
        r["predicted_ms"] = 1e3 * (r["read"] + r["written"]) / bandwidth
    return rows


def loss_op_rows(count):
    """One row per loss op (all its calls): forward and backward bytes, minimum, ratio."""
    minimum = boundary(count.events, lambda e: e.op, count.persistent)
    rows = {}
    for e in count.events:
        if e.op is None:
            continue
        name = count.calls[e.op]
        r = rows.setdefault(name, {"op": name, "calls": len({c for c, n in count.calls.items() if n == name}),
                                   "launches": 0, "forward": 0, "backward": 0, "minimum": 0})
        r["launches"] += e.launches
        r["backward" if e.phase == "backward" else "forward"] += e.read + e.written
    for call, name in count.calls.items():
        if name in rows:
            rows[name]["minimum"] += minimum.get(call, 0)
    for r in rows.values():
        r["ratio"] = (r["forward"] + r["backward"]) / r["minimum"] if r["minimum"] else None
        r["target"] = ("PASS" if r["ratio"] <= TARGET_OP_RATIO else "FAIL") if r["op"] in FUSED_OPS else "-"
    return sorted(rows.values(), key=lambda r: (r["op"] not in FUSED_OPS, r["op"]))


def top_kernels(count, n=8):
    """The n kernels that move the most bytes, summed over their launches."""
    agg = defaultdict(lambda: [0, 0])
    for e in count.events:
        agg[e.kernel][0] += e.launches
        agg[e.kernel][1] += e.read + e.written
    return [{"kernel": k, "launches": v[0], "bytes": v[1]} for k, v in
            sorted(agg.items(), key=lambda kv: -kv[1][1])[:n]]


def _gb(b):
    return f"{b / 1e9:.3f}"


def _mb(b):
    return f"{b / 1e6:.2f}"


def _ratio(r):
    return "-" if r is None else f"{r:.2f}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(CHOICES),
                   help=f"comma-separated subset of {','.join(CHOICES)} (apd-code: apd in the authors' code "
                        "convention, the recipes')")
    p.add_argument("--small", action="store_true", help=f"{SMALL.teacher} -> {SMALL.student}, "
                   f"{SMALL.crop[0]}x{SMALL.crop[1]}, batch {SMALL.batch_size}: what CI runs")
    p.add_argument("--bandwidth", type=float, default=BANDWIDTH, help="device copy bandwidth in bytes/s, read + "
                   "write, for the predicted times (default: 4.3e12, the H200's measured device-to-device rate)")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also count the CIRKD-style reference loop (bench/cirkd_reference.py) of kd, cad, apd, cwd")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"), help="directory for the results")
    a = p.parse_args(argv)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in a.methods if m not in CHOICES]
    if unknown or not a.methods:
        p.error(f"--methods: unknown {unknown}; expected a subset of {','.join(CHOICES)}")
    if a.bandwidth <= 0:
        p.error(f"--bandwidth must be > 0, got {a.bandwidth}")
    a.setting, a.name = (SMALL, "small") if a.small else (WORKLOAD, "workload")
    return a


def main(argv=None):
    args = parse_args(argv)
    s = args.setting
    from cirkd_reference import METHODS as REFERENCE_METHODS

    header = (f"A MODEL counted on the CPU (fake tensors through a dispatch counter), not a measurement: "
              f"no GPU ran. {s.teacher} -> {s.student}, {s.crop[0]}x{s.crop[1]} crops, batch {s.batch_size}, "
              f"{s.num_classes} classes; predicted ms = bytes / {args.bandwidth:.3g} B/s.")
    print(header, flush=True)
    results, started = {}, time.perf_counter()
    for method in args.methods:
        t0 = time.perf_counter()
        count = count_segkd(method, s)
        results[method] = {"count": count, "rows": phase_rows(count, args.bandwidth), "ops": loss_op_rows(count),
                           "top": top_kernels(count)}
        if args.reference and method in REFERENCE_METHODS:
            results[method]["reference"] = count_reference(method, s)
        total = results[method]["rows"][-1]
        print(f"{method:6s} {count.launches:6d} launches {_gb(count.bytes):>8s} GB/step (minimum "
              f"{_gb(total['minimum'])}) {total['predicted_ms']:7.2f} ms predicted, {len(count.syncs)} host syncs"
              + "".join(f" | {o['op']} {_ratio(o['ratio'])}x" for o in results[method]["ops"])
              + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    verdicts = judge(results)
    for v in verdicts:
        print(v)
    meta = {"model": header, "setting": args.name, "teacher -> student": f"{s.teacher} -> {s.student}",
            "crop": "x".join(map(str, s.crop)), "batch size": s.batch_size, "classes": s.num_classes,
            "step": results[args.methods[0]]["count"].description.removeprefix("step: "),
            "bandwidth B/s": f"{args.bandwidth:.3g}",
            "torch": torch.__version__, "counted in s": round(time.perf_counter() - started, 1),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    write(args, meta, results, verdicts)
    return {"meta": meta, "results": results, "verdicts": verdicts}


def judge(results):
    """PASS/FAIL lines against issue 12's targets (reported, never failing the run)."""
    lines = []
    for method, r in results.items():
        for o in r["ops"]:
            if o["op"] in FUSED_OPS:
                lines.append(f"{method}: {o['op']} forward+backward {_ratio(o['ratio'])}x its minimum (target <= "
                             f"{TARGET_OP_RATIO}) {o['target']}")
        n = len(r["count"].syncs)
        lines.append(f"{method}: {n} host syncs per step (target 0) {'PASS' if n == 0 else 'FAIL'}")
    for name in ("apd", "apd-code"):
        if name in results:
            b = results[name]["count"].method_bytes
            lines.append(f"{name}: {_gb(b)} GB per step in its loss terms, forward + backward (target <= "
                         f"{_gb(TARGET_APD_BYTES)}) {'PASS' if b <= TARGET_APD_BYTES else 'FAIL'}")
    ref = [r["reference"] for r in results.values() if "reference" in r]
    if ref:
        n = sum(len(c.syncs) for c in ref)
        lines.append(f"reference loop: {n} host syncs over {len(ref)} methods (expected > 0: it reads every loss "
                     f"term with .item()) {'PASS' if n > 0 else 'FAIL'}")
    return lines


def write(args, meta, results, verdicts):
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"traffic_{args.name}")
    doc = {"meta": meta, "verdicts": verdicts, "methods": {}}
    lines = [f"# Traffic model of one training step ({args.name})", "", f"**{meta['model']}**", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "model"]
    lines += ["", "## Per step", "",
              "| method | launches | GB read | GB written | GB total | predicted ms | "
              "loss terms GB | host syncs | reference GB | reference launches | reference host syncs |",
              "|---|" + "---:|" * 10]
    for method, r in results.items():
        c, t, ref = r["count"], r["rows"][-1], r.get("reference")
        lines.append(f"| {method} | {c.launches} | {_gb(t['read'])} | {_gb(t['written'])} | {_gb(c.bytes)} | "
                     f"{t['predicted_ms']:.2f} | "
                     f"{_gb(c.method_bytes)} | {len(c.syncs)} | "
                     + (f"{_gb(ref.bytes)} | {ref.launches} | {len(ref.syncs)} |" if ref else "- | - | - |"))
    lines += ["", "(No minimum for a whole step: activations saved for the backward must be written and read, which a "
              "step-level 'each input once' bound leaves out; the minimum is given per phase and per loss op below.)",
              "", "loss terms GB: the method's own loss terms, forward + backward (every loss row but the task "
              "loss `ce` and the sum of the terms). Reference: bench/cirkd_reference.py's loop, fp32, NCHW."]
    lines += ["", "## Loss ops, forward + backward (all calls of the step)", "",
              "| method | op | calls | launches | forward MB | backward MB | minimum MB | ratio | target <= "
              f"{TARGET_OP_RATIO} |", "|---|---|" + "---:|" * 7]
    for method, r in results.items():
        lines += [f"| {method} | {o['op']} | {o['calls']} | {o['launches']} | {_mb(o['forward'])} | "
                  f"{_mb(o['backward'])} | {_mb(o['minimum'])} | {_ratio(o['ratio'])} | {o['target']} |"
                  for o in r["ops"]]
    lines += ["", "segmentation_ce (the task loss: bilinear upsampling to the label size, then cross-entropy) is "
              "shown beside the fused ops; the ratio target is about the fused ops of kernels/."]
    lines += ["", "## Targets (issue 12)", ""] + [f"- {v}" for v in verdicts]
    for method, r in results.items():
        c = r["count"]
        lines += ["", f"## {method}: per phase", "", "| phase | launches | MB read | MB written | minimum MB | ratio "
                  "| predicted ms |", "|---|" + "---:|" * 6]
        lines += [f"| {x['phase']} | {x['launches']} | {_mb(x['read'])} | {_mb(x['written'])} | {_mb(x['minimum'])} "
                  f"| {_ratio(x['ratio'])} | {x['predicted_ms']:.3f} |" for x in r["rows"]]
        lines += ["", "Kernels moving the most bytes: " + "; ".join(
            f"{k['kernel']} {_mb(k['bytes'])} MB in {k['launches']} launches" for k in r["top"]) + "."]
        syncs = c.syncs + (r["reference"].syncs if "reference" in r else [])
        if syncs:
            lines += ["", "Host syncs: " + "; ".join(
                f"{'reference' if e.phase == 'reference step' else 'segkd'} {e.kernel} at {e.sync}" for e in syncs)
                + "."]
        doc["methods"][method] = {
            "launches": c.launches, "bytes": c.bytes, "phases": r["rows"], "loss_ops": r["ops"],
            "method_bytes": c.method_bytes, "top_kernels": r["top"],
            "host_syncs": [{"kernel": e.kernel, "phase": e.phase, "at": e.sync} for e in c.syncs],
            "reference": None if "reference" not in r else {
                "launches": r["reference"].launches, "bytes": r["reference"].bytes,
                "host_syncs": [{"kernel": e.kernel, "at": e.sync} for e in r["reference"].syncs]}}
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {base}.md and .json")


if __name__ == "__main__":
    main()
