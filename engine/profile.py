"""Where a training step's time goes: phase clocks, the --profile run and its table, peak memory.

`profile(step, batches, ...)` times any step callable (engine/step.py: TrainStep) on any batch iterator; the
trainer, train.py's --profile and bench/train_throughput.py all time the same TrainStep with it.

A step is cut into phases by `clock.begin(name)` calls: "data" here around fetching the batch, the rest in
the step (teacher forward, student forward, loss, backward, optimizer; a data-free source adds its own, e.g.
dfad's generator step). On CUDA a boundary is a
CUDA event recorded on the current stream, read once after the timed steps (no sync inside them): a phase's
time is the stream time between its boundaries, so host-side waiting (data) shows up as a gap only when the
GPU has run out of work. On CPU a boundary is the wall clock. Inside a torch.profiler trace each phase is
also a named range (`record_function`), so the Chrome/TensorBoard trace shows the same cut.
"""
import json
import resource
import time
from pathlib import Path

import torch

from engine import dist


class NullClock:
    """The clock of a normal training step: boundaries cost nothing."""

    def begin(self, name):
        pass

    def end(self):
        pass


NULL_CLOCK = NullClock()


class PhaseClock:
    def __init__(self, device, ranges=False):
        self.cuda = device.type == "cuda"
        self.ranges = ranges   # also open a torch.profiler range per phase (for traces)
        self.steps = []        # per step: [(name, start mark)] + final mark
        self.current = None
        self.range = None

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin(self, name):
        if self.current is None:
            self.current = []
        self._close_range()
        self.current.append((name, self._now()))
        if self.ranges:
            self.range = torch.profiler.record_function(f"segkd/{name}")
            self.range.__enter__()

    def end(self):
        """Close the step: its last phase ends here."""
        self._close_range()
        if self.current:
            self.steps.append((self.current, self._now()))
        self.current = None

    def _close_range(self):
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None

    def phase_ms(self):
        """-> {phase: mean ms per step} over the closed steps (one device sync on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
        totals = {}
        for marks, last in self.steps:
            stamps = [m for _, m in marks] + [last]
            for (name, _), a, b in zip(marks, stamps, stamps[1:]):
                ms = a.elapsed_time(b) if self.cuda else 1000 * (b - a)
                totals[name] = totals.get(name, 0.0) + ms
        n = max(len(self.steps), 1)
        return {k: v / n for k, v in totals.items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device):
    """Peak CUDA memory allocated since the last reset; on CPU the process's peak resident set (lifetime)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def format_report(stats, title):
    """The --profile table: one row per phase (ms, share of the step), then throughput and memory."""
    phases, step = stats["phases"], stats["phase_step_ms"]
    width = max([len(k) for k in phases] + [len("step (sum)")])
    timer = "CUDA events" if stats["device"].startswith("cuda") else "wall clock"
    lines = [title, f"  {'phase':<{width}}  {'ms':>9}  {'share':>6}   ({timer}, mean of {stats['steps']} steps "
                    f"after {stats['warmup']} warm-up)"]
    for name, ms in phases.items():
        lines.append(f"  {name:<{width}}  {ms:9.2f}  {100 * ms / step if step else 0:5.1f}%")
    lines.append(f"  {'step (sum)':<{width}}  {step:9.2f}  100.0%")
    lines.append(f"  hot loop without phase marks: {stats['step_ms']:.2f} ms/step, "
                 f"{stats['img_s_per_process']:.1f} images/s per process, {stats['img_s']:.1f} images/s overall "
                 f"({stats['world_size']} process(es) x {stats['batch']} images)")
    mem = "peak CUDA memory allocated" if stats["device"].startswith("cuda") else "peak resident memory (process)"
    lines.append(f"  {mem}: {stats['peak_mem_mb']:.0f} MiB")
    for key, text in stats.get("notes", {}).items():
        lines.append(f"  {key}: {text}")
    if stats.get("trace"):
        lines.append(f"  torch.profiler trace: {stats['trace']} (chrome://tracing, Perfetto or TensorBoard)")
    return "\n".join(lines)


def profile(step, batches, *, device, start_iter=0, iters=None, warmup=5, steps=20, phases=True, trace_dir=None,
            world_size=1, rank=0):
    """Time `steps` iterations of `step(batch, iteration, clock)` on `batches` after `warmup` untimed ones
    (the weights change; nothing is saved). Iterations count from start_iter, modulo `iters` (the schedule's
    length) so that a long profile never runs past the end of the learning-rate schedule.

    -> {"step_ms": ms per iteration of the plain hot loop (no phase marks, one sync at the end),
        "img_s_per_process", "img_s" (x world size), "phases": {phase: mean ms} (phases=True: a second
        run of `steps` iterations with a boundary per phase), "phase_step_ms": their sum,
        "peak_mem_mb", "batch", "world_size", "device", "steps", "warmup", "trace" (a path), "iterations_run"}
    trace_dir: a further min(steps, 5) iterations under torch.profiler, written as a Chrome trace to
    <trace_dir>/trace_rank<rank>.json.
    """
    if steps < 1:
        raise ValueError(f"--profile needs at least 1 step, got {steps}")
    total = warmup + steps * (2 if phases else 1) + (min(steps, 5) if trace_dir else 0)
    state = {"it": start_iter, "images": 0}

    def run(n, clock=NULL_CLOCK):
        for _ in range(n):
            clock.begin("data")
            batch = next(batches)
            step(batch, state["it"] % iters if iters else state["it"], clock)
            clock.end()
            state["it"] += 1
            state["images"] = batch["image"].shape[0]

    run(warmup)
    sync(device)
    reset_peak_memory(device)
    dist.barrier()
    t0 = time.perf_counter()
    run(steps)
    sync(device)
    step_ms = 1000 * (time.perf_counter() - t0) / steps
    stats = {"step_ms": step_ms, "img_s_per_process": 1000 * state["images"] / step_ms,
             "img_s": 1000 * state["images"] * world_size / step_ms, "batch": state["images"],
             "world_size": world_size, "device": str(device), "steps": steps, "warmup": warmup,
             "phases": {}, "phase_step_ms": 0.0, "trace": None, "iterations_run": total}
    if phases:
        clock = PhaseClock(device)
        run(steps, clock)
        stats["phases"] = clock.phase_ms()
        stats["phase_step_ms"] = sum(stats["phases"].values())
    stats["peak_mem_mb"] = peak_memory_mb(device)
    if trace_dir:
        folder = Path(trace_dir)
        folder.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            run(min(steps, 5), PhaseClock(device, ranges=True))
            sync(device)
        path = folder / f"trace_rank{rank}.json"
        prof.export_chrome_trace(str(path))
        stats["trace"] = str(path)
    return stats


def profile_run(step, batches, env, out, *, warmup, steps, start_iter, iters, title, notes=dict, echo=print):
    """--profile N: the per-phase table on rank 0 (each phase the maximum over the ranks), then
    <out>/profile/profile.json and a torch.profiler trace per rank. notes: -> {label: text} printed below the
    table (a data-free source's, say), asked on rank 0 only."""
    echo(f"--profile: {warmup} warm-up iterations, then {steps} timed twice (hot loop, then per phase), then a "
         "torch.profiler trace; no checkpoint is written")
    folder = Path(out) / "profile"
    stats = profile(step, batches, device=env.device, start_iter=start_iter, iters=iters, warmup=warmup,
                    steps=steps, phases=True, trace_dir=folder, world_size=env.world_size, rank=env.rank)
    stats["notes"] = notes() if env.is_main else {}
    per_rank = dist.all_gather_object(stats["phases"])
    if env.is_main:
        if len(per_rank) > 1:  # the slowest rank sets the pace: show the max over ranks per phase
            stats["phases"] = {k: max(p[k] for p in per_rank) for k in stats["phases"]}
            stats["phase_step_ms"] = sum(stats["phases"].values())
            stats["notes"]["ranks"] = f"phase times are the maximum over {len(per_rank)} ranks"
        echo(format_report(stats, title))
        (folder / "profile.json").write_text(json.dumps(stats, indent=2))
    dist.barrier()
    return stats
