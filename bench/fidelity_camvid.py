"""Does distillation work on real data? (issue 15): every method against the student alone on CamVid, seeds apart.

    python bench/fidelity_camvid.py                 # teacher once, every method x 3 seeds, 2 runs at a time, report
    python bench/fidelity_camvid.py --report        # the report from the runs already done
    python bench/fidelity_camvid.py --only alone kd --seeds 0
    python bench/fidelity_camvid.py --quick         # smoke test: tiny frames, a few iterations, < 1 min

The setting is bench/datafree_camvid.py's reduced CPU one (frames and labels downscaled 3x to 160x120, crops
96x128, batch 8, a pspnet_small teacher trained 1500 iterations) with pspnet_tiny students trained 400 iterations
instead of 800, so that the teacher beats the student alone by at least 8 mIoU on val (14.1 when chosen; about
7 at 800); bench/results/fidelity_camvid_cpu.md says how the setting was chosen. Teacher and students train on
all 367 train frames; every figure is mIoU on the 101 val frames, the trainer's own final evaluation. No choice
is tuned on val: every method runs at today's defaults.

The data-free methods: DFAD with bench/datafree_camvid.py's scaled generator settings, with and without the
DeepInversion BN prior (its default is off); DFSS on a pool of the unlabelled train frames mixed with as many
foreign images (never a val frame).

Each run is engine/train.py as a user runs it, in its own process with one thread, --lanes at a time; the
teacher trains in one lane while the student-alone runs take the others. A run's folder is named by a digest of
its flags and of the engine's source (engine/, kernels/), so a finished run is skipped while both are unchanged
and re-run when a method or a default changes. Writes bench/results/fidelity_camvid_cpu.md (a generated block;
the discussion around it is kept) and fidelity_camvid_cpu.json.
"""
import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from datafree_camvid import build_pool, downscale_camvid, write_generated  # noqa: E402
from engine.data.synthetic import SyntheticSegmentation  # noqa: E402

ALONE = "alone"
# name -> (what it is, flags). Today's defaults throughout: no method has a CamVid recipe in segkd yet.
# {pool}, {gen_size}, {gen_batch}, {dfad_iters}, {bn_weight} are filled in from the command line.
METHODS = {
    ALONE: ("student alone (CE)", ["--method", "none"]),
    "kd": ("per-pixel KD", ["--method", "kd"]),
    "fitnet": ("FitNet feature MSE", ["--method", "fitnet"]),
    "md": ("magnitude distillation", ["--method", "md"]),
    "lad": ("local angular distillation (+ its KD term)", ["--method", "lad"]),
    "cad": ("channel angular distillation (+ its KD term)", ["--method", "cad"]),
    "pad": ("pixel angular distillation (+ its KD term)", ["--method", "pad"]),
    "apd": ("adaptive perspective distillation", ["--method", "apd"]),
    "cwd": ("channel-wise distillation", ["--method", "cwd"]),
    "cad+kd": ("cad plus per-pixel KD", ["--method", "cad+kd"]),
    "skd": ("pair-wise similarity distillation (SKD) plus per-pixel KD, as CIRKD pairs them", ["--method", "kd+skd"]),
    "ifvd": ("intra-class feature variation distillation", ["--method", "ifvd"]),
    "cirkd": ("cross-image relational KD plus per-pixel KD, as CIRKD trains it", ["--method", "kd+cirkd"]),
    "dfad": ("DFAD: generated images, no labels, no real image; today's default (no BN prior)",
             ["--method", "dfad", "--iters", "{dfad_iters}", "--gen-size", "{gen_size}", "--gen-batch",
              "{gen_batch}"]),
    "dfad_bn": ("DFAD + DeepInversion BN prior (--bn-weight {bn_weight}), bench/datafree_camvid.py's second run",
                ["--method", "dfad", "--iters", "{dfad_iters}", "--gen-size", "{gen_size}", "--gen-batch",
                 "{gen_batch}", "--bn-weight", "{bn_weight}"]),
    "dfss": ("DFSS: ADS-selected pool of unlabelled train frames + as many foreign images, no labels",
             ["--method", "dfss", "--aux-data", "{pool}"]),
}


def build_train_pool(data, pool):
    """DFSS's pool: pool/train/* the unlabelled train frames (never a val frame), pool/foreign/* as many foreign
    images (synthetic scenes, noise, plasma textures) at the same size: bench/datafree_camvid.py's build_pool,
    which takes the frames of a `val` folder, given a view whose `val` is the train split."""
    if (pool / ".complete").exists():
        return pool
    view, partial = pool.with_name(pool.name + ".view"), pool.with_name(pool.name + ".partial")
    shutil.rmtree(view, ignore_errors=True)
    shutil.rmtree(partial, ignore_errors=True)
    view.mkdir(parents=True)
    (view / "val").symlink_to((data / "train").resolve(), target_is_directory=True)
    build_pool(view, partial)
    (partial / "val").rename(partial / "train")
    shutil.rmtree(view)
    shutil.rmtree(pool, ignore_errors=True)
    partial.rename(pool)
    return pool


def make_quick_data(dst, train=8, val=4, size=48):
    """A CamVid-layout folder of synthetic scenes (labels 0..7 are valid CamVid classes) for --quick."""
    if (dst / ".complete").exists():
        return dst
    for split, count in (("train", train), ("val", val)):
        (dst / split).mkdir(parents=True, exist_ok=True)
        (dst / f"{split}annot").mkdir(parents=True, exist_ok=True)
        scenes = SyntheticSegmentation(split, size=size)
        for i in range(count):
            rgb, label = scenes.load(i)
            Image.fromarray(rgb).save(dst / split / f"q{i:03d}.png")
            Image.fromarray(label.astype(np.uint8)).save(dst / f"{split}annot" / f"q{i:03d}.png")
    (dst / ".complete").write_text("ok")
    return dst


def source_digest():
    """sha1 of every .py file under engine/ and kernels/: a run made by other code is not reused."""
    h = hashlib.sha1()
    for f in sorted([*(ROOT / "engine").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]):
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def run_dir(runs, name, argv, digest):
    key = hashlib.sha1(json.dumps([argv, digest]).encode()).hexdigest()[:10]
    return runs / f"{name.replace('+', '_')}-{key}"


def run_once(name, argv, out, log):
    """engine.train in its own process with one thread (on a shared CPU, runs of two threads spin against each
    other); the trainer's final evaluation (on val) is the result. A finished run (wall.txt) is skipped."""
    if (out / "wall.txt").exists():
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "engine.train", *argv, "--out", str(out)], cwd=ROOT, env=env,
                       stdout=f, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - t0
    (out / "argv.json").write_text(json.dumps(argv))
    (out / "wall.txt").write_text(f"{wall:.1f}")
    print(f"{name}: val {100 * json.loads((out / 'results.json').read_text())['miou']:.1f} "
          f"({wall / 60:.1f} min)", flush=True)


def run_all(teacher, jobs, lanes):
    """The teacher first, in one lane, while the student-alone runs fill the others; a distilling run waits
    for the teacher."""
    with ThreadPoolExecutor(lanes) as pool:
        trained = pool.submit(run_once, *teacher)

        def run(name, *job):
            if not name.startswith(ALONE):
                trained.result()
            run_once(name, *job)

        futures = [pool.submit(run, *job) for job in jobs]
        for f in [trained, *futures]:
            try:
                f.result()
            except subprocess.CalledProcessError as e:
                print(f"a run failed (its log names why): {e}", flush=True)


class LoadMeter:
    """Samples the 1-minute load average every `every` seconds while the runs go: whether other work shared
    the CPU (at `lanes` one-thread runs the load is about `lanes` when nothing else runs)."""

    def __init__(self, every=30):
        self.samples, self.every, self._stop = [], every, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


def mean_sd(values):
    """(mean, sample sd; 0.0 for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare(method, alone):
    """A method's val mIoUs (one per seed) against the student alone's.

    delta = mean(method) - mean(alone); se = sqrt(sd_m^2 / n_m + sd_a^2 / n_a), Welch's standard error of that
    difference; t = delta / se. The verdict is the issue's "by more than the seed spread": `above` when delta
    exceeds the larger of the two seed sds (the spread of one seed of either), `below` when -delta does,
    `within spread` otherwise.
    """
    (m, sd_m), (a, sd_a) = mean_sd(method), mean_sd(alone)
    delta = m - a
    se = (sd_m ** 2 / len(method) + sd_a ** 2 / len(alone)) ** 0.5
    spread = max(sd_m, sd_a)
    verdict = "above" if delta > spread else "below" if delta < -spread else "within spread"
    return {"mean": m, "sd": sd_m, "n": len(method), "delta": delta, "se": se,
            "t": delta / se if se > 0 else float("nan"), "spread": spread, "verdict": verdict}


def summarize(results):
    """results: {"teacher": {"miou", "wall"}, "runs": {method: [{"seed", "miou", "wall"}, ...]}} (mIoU as fractions)
    -> the same with per-method statistics in percent, the teacher's gap over the student alone and the lists of
    methods above, within and below the student alone."""
    alone = [100 * r["miou"] for r in results["runs"][ALONE]]
    alone_by_seed = {r["seed"]: 100 * r["miou"] for r in results["runs"][ALONE]}
    a, sd_a = mean_sd(alone)
    teacher = 100 * results["teacher"]["miou"]
    rows = {}
    for name, runs in results["runs"].items():
        vals = [100 * r["miou"] for r in runs]
        row = {"mean": a, "sd": sd_a, "n": len(alone)} if name == ALONE else compare(vals, alone)
        # a seed fixes the initial student and the labelled batches (engine/trainer.py): a per-seed difference
        paired = [100 * r["miou"] - alone_by_seed[r["seed"]] for r in runs if r["seed"] in alone_by_seed]
        if name != ALONE and paired:
            row["paired"] = dict(zip(("mean", "sd"), mean_sd(paired)), n=len(paired))
        rows[name] = {**row, "seeds": [r["seed"] for r in runs], "values": vals,
                      "wall_min": statistics.mean(r["wall"] for r in runs) / 60}
    verdicts = {v: [n for n, r in rows.items() if r.get("verdict") == v] for v in ("above", "within spread", "below")}
    return {"teacher": teacher, "alone": a, "alone_sd": sd_a, "gap": teacher - a, "rows": rows, "verdicts": verdicts}


def paired_cell(r):
    p = r.get("paired")
    return "-" if p is None else f"{p['mean']:+.1f}" + (f" ± {p['sd']:.1f}" if p["n"] > 1 else "")


def pm(r):
    return f"{r['mean']:.1f} ± {r['sd']:.1f}" if r["n"] > 1 else f"{r['mean']:.1f}"


def render(summary, setting, timing):
    """The generated markdown block (a list of lines)."""
    s, rows = summary, summary["rows"]
    gap_ok = "meets" if s["gap"] >= 8 else "does NOT meet"
    lines = [
        f"## CamVid val, {setting['title']}", "",
        f"{setting['device']}, torch {torch.__version__}. `{setting['command']}`: {setting['description']} "
        f"Runs keyed by the engine source digest {setting['digest']}.", "",
        f"Teacher {setting['teacher']} ({setting['teacher_iters']} iterations): **{s['teacher']:.1f}** val mIoU "
        f"({timing['teacher_min']:.1f} min; along its training: {setting['teacher_curve']}). Student alone: "
        f"**{s['alone']:.1f} ± {s['alone_sd']:.1f}** ({rows[ALONE]['n']} seeds). Gap teacher - student alone: "
        f"**{s['gap']:.1f}** ({gap_ok} the issue's >= 8).",
        "",
        "Delta: mean of the method - mean of the student alone; ± Welch's standard error of that difference; "
        "t = delta / se. Verdict: *above* / *below* when |delta| exceeds the larger of the two seed sds "
        "(the issue's \"more than the seed spread\"), *within spread* otherwise. Paired delta: mean ± sd over "
        "seeds of (method - student alone at the same seed: the same initial student and, but for the data-free "
        "methods, the same batches); "
        "shown for information, the verdict does not use it.", "",
        "| method | what | seeds | val mIoU | delta | t | verdict | paired delta | per seed | min per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        what = setting["what"].get(name, "")
        seeds = ",".join(map(str, r["seeds"]))
        per_seed = ", ".join(f"{v:.1f}" for v in r["values"])
        if name == ALONE:
            lines.append(f"| {name} | {what} | {seeds} | {pm(r)} | - | - | - | - | {per_seed} | "
                         f"{r['wall_min']:.1f} |")
        else:
            lines.append(f"| {name} | {what} | {seeds} | {pm(r)} | {r['delta']:+.1f} ± "
                         f"{r['se']:.1f} | {r['t']:+.1f} | {r['verdict']} | {paired_cell(r)} | {per_seed} | "
                         f"{r['wall_min']:.1f} |")
    missing = [n for n in setting["what"] if n not in rows]
    v = s["verdicts"]
    lines += [
        "",
        f"Above the student alone by more than the seed spread: {', '.join(v['above']) or 'none'}. "
        f"Within the spread: {', '.join(v['within spread']) or 'none'}. Below: {', '.join(v['below']) or 'none'}."
        + (f" Not run yet: {', '.join(missing)}." if missing else ""),
        "",
        f"Wall time: {timing['runs_min']:.1f} min of runs (one thread each, teacher included), "
        + ("elapsed not measured" if timing["elapsed_min"] is None else f"{timing['elapsed_min']:.1f} min elapsed")
        + f" for the invocation that ran them ({setting['lanes']} runs at a time; runs found finished are skipped). "
        f"1-minute load average while it ran: {timing['load']} (about {setting['lanes']} when nothing else runs).",
    ]
    if setting.get("ads"):
        lines += ["", setting["ads"]]
    return lines


def ads_line(runs_by_name):
    """What ADS kept from the DFSS pool, from each dfss run's ads_scores.json."""
    kept = []
    for _, out in runs_by_name.get("dfss", []):
        path = out / "ads_scores.json"
        if path.exists():
            rec = json.loads(path.read_text())
            train = [f.startswith("train/") for f in rec["files"]]
            kept.append((len(rec["files"]), sum(train), sum(rec["kept"]),
                         sum(k and t for k, t in zip(rec["kept"], train))))
    if not kept:
        return ""
    pool, train, k, kt = kept[0]
    return (f"DFSS pool: {pool} images ({train} unlabelled train frames, {pool - train} foreign); ADS kept {k}, of "
            f"which {kt} train frames (the teacher is the same for every seed, so is the selection).")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--camvid", default=str(ROOT.parent / "shared" / "datasets" / "camvid"))
    p.add_argument("--work", default=str(Path(os.environ.get("SEGKD_CACHE") or Path.home() / ".cache" / "segkd")
                                         / "bench" / "fidelity_camvid"))
    p.add_argument("--factor", type=float, default=3.0, help="downscale factor of the frames (480x360 / 3 = 160x120)")
    p.add_argument("--teacher", default="pspnet_small")
    p.add_argument("--student", default="pspnet_tiny")
    p.add_argument("--crop", default="96,128")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--teacher-iters", type=int, default=1500)
    p.add_argument("--iters", type=int, default=400, help="student iterations (dfad: --dfad-iters)")
    p.add_argument("--dfad-iters", type=int, default=2000, help="dfad student steps (a generator step every 5)")
    p.add_argument("--gen-size", default="48,64", help="dfad generated HxW: 128x128 for 360x480 frames, scaled")
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--bn-weight", type=float, default=0.1, help="--bn-weight of the dfad_bn run")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    p.add_argument("--alone-seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2, 3, 4, 5],
                   help="seeds of the student alone, the reference every method is compared with")
    p.add_argument("--only", nargs="*", default=None,
                   help="methods to run (default: all; --only with no name: the teacher alone)")
    p.add_argument("--lanes", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--report", action="store_true", help="write the report from finished runs, run nothing")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 12 synthetic 48x48 frames, a few iterations, one seed (two alone); "
                        "writes under --work/quick unless --out is given")
    p.add_argument("--out", default=None, help="results folder (default: bench/results)")
    args = p.parse_args()
    work = Path(args.work)
    if args.quick:
        work = work / "quick"
        args.crop, args.batch_size, args.teacher_iters, args.iters, args.dfad_iters = "32,32", 2, 6, 4, 4
        args.gen_size, args.gen_batch, args.seeds, args.alone_seeds = "16,16", 2, [0], [0, 1]
        data = make_quick_data(work / "data")
        out_dir = Path(args.out or work / "results")
    else:
        if not Path(args.camvid).is_dir():
            sys.exit(f"fidelity_camvid: error: --camvid {args.camvid} is not a folder (the CamVid SegNet layout)")
        data = downscale_camvid(Path(args.camvid), work.parent / "datafree_camvid" / f"camvid_x{args.factor:g}",
                                args.factor)
        out_dir = Path(args.out or ROOT / "bench" / "results")
    pool = build_train_pool(data, work / f"pool_{data.name}")
    runs, logs = work / "runs", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    digest = source_digest()

    common = ["--dataset", "camvid", "--data-root", str(data), "--crop", args.crop, "--batch-size",
              str(args.batch_size), "--workers", "0", "--device", "cpu", "--log-interval", "100",
              "--eval-interval", "0", "--cache-dir", str(work / "cache")]
    teacher_argv = [*common, "--method", "none", "--student", args.teacher, "--iters", str(args.teacher_iters),
                    "--eval-interval", str(max(1, args.teacher_iters // 6))]  # its learning curve, in its log
    teacher_out = run_dir(runs, "teacher", teacher_argv, digest)
    fill = {"pool": str(pool), "gen_size": args.gen_size, "gen_batch": args.gen_batch,
            "dfad_iters": args.dfad_iters, "bn_weight": f"{args.bn_weight:g}"}
    student = [*common, "--student", args.student, "--teacher", args.teacher, "--iters", str(args.iters)]
    jobs, runs_by_name = [], {}
    for name, (_, flags) in METHODS.items():
        flags = [f.format(**fill) for f in flags]
        extra = [] if name == ALONE else ["--teacher-ckpt", str(teacher_out / "last.pt")]
        for s in args.alone_seeds if name == ALONE else args.seeds:
            argv = [*student, *flags, *extra, "--seed", str(s)]  # a repeated flag: the later one counts
            out = run_dir(runs, f"{name}-s{s}", argv, digest)
            runs_by_name.setdefault(name, []).append((s, out))
            if args.only is None or name in args.only:
                jobs.append((s, f"{name}-s{s}", argv, out, logs / f"{name.replace('+', '_')}-s{s}.log"))
    # the student alone first (it runs beside the teacher), then every method's first seed before any second
    # seed: a benchmark stopped early still reports every method
    jobs = [j[1:] for j in sorted(jobs, key=lambda j: (not j[1].startswith(ALONE), j[0]))]

    t0 = time.perf_counter()
    with LoadMeter() as load:
        if not args.report:
            run_all(("teacher", teacher_argv, teacher_out, logs / "teacher.log"), jobs, args.lanes)
    elapsed = time.perf_counter() - t0
    write_report(args, data, digest, teacher_out, runs_by_name, None if args.report else elapsed, load.samples,
                 out_dir)


def finished(out):
    return (out / "wall.txt").exists() and (out / "results.json").exists()


def teacher_curve(out):
    """'250: 30.1, 500: 35.2, ...': the teacher's val mIoU along its training, from its log."""
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    return ", ".join(f"{r['iter']}: {100 * r['miou']:.1f}" for r in evals)


def write_report(args, data, digest, teacher_out, runs_by_name, elapsed, load, out_dir):
    """elapsed None (--report): the elapsed time and load of the run that wrote the previous report are kept."""
    if not finished(teacher_out) or not any(finished(o) for _, o in runs_by_name[ALONE]):
        print(f"fidelity_camvid: no finished teacher or student alone for this engine source (digest {digest[:12]}; "
              "runs are keyed by the sources of engine/ and kernels/, so a changed engine runs anew): no report")
        return
    wall = lambda out: float((out / "wall.txt").read_text())  # noqa: E731
    miou = lambda out: json.loads((out / "results.json").read_text())["miou"]  # noqa: E731
    results = {"teacher": {"miou": miou(teacher_out), "wall": wall(teacher_out), "dir": str(teacher_out)},
               "runs": {name: [{"seed": s, "miou": miou(o), "wall": wall(o), "dir": str(o),
                                "iou": json.loads((o / "results.json").read_text()).get("iou")}
                               for s, o in outs if finished(o)]
                        for name, outs in runs_by_name.items()}}
    results["runs"] = {n: r for n, r in results["runs"].items() if r}
    summary = summarize(results)
    fill = {"bn_weight": f"{args.bn_weight:g}"}
    frames = sorted((data / "val").glob("*.png"))
    w, h = Image.open(frames[0]).size
    setting = {
        "title": "quick smoke test (synthetic frames)" if args.quick else "reduced CPU setting",
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores; one thread per "
                  f"run, {args.lanes} runs at a time)",
        "command": "python bench/fidelity_camvid.py" + (" --quick" if args.quick else ""),
        "description": (f"frames downscaled {args.factor:g}x to {w}x{h}, crops {args.crop.replace(',', 'x')}, "
                        f"batch {args.batch_size}, the engine's default SGD; teacher and students train on the "
                        f"{len(list((data / 'train').glob('*.png')))} train frames, all figures are mIoU (%) on "
                        f"the {len(frames)} val frames. Students {args.student}, "
                        f"{args.iters} iterations (dfad: {args.dfad_iters} student steps on generated "
                        f"{args.gen_size.replace(',', 'x')} images, batch {args.gen_batch}). Every method at "
                        "today's defaults: segkd has no CamVid recipe yet."
                        if not args.quick else "synthetic scenes in the CamVid layout, a few iterations: "
                                               "the numbers mean nothing."),
        "teacher": args.teacher, "teacher_iters": args.teacher_iters, "lanes": args.lanes,
        "what": {n: what.format(**fill) for n, (what, _) in METHODS.items()},
        "digest": digest[:12], "teacher_curve": teacher_curve(teacher_out),
        "ads": ads_line(runs_by_name),
    }
    name = "fidelity_camvid_quick" if args.quick else "fidelity_camvid_cpu"
    all_walls = [results["teacher"]["wall"]] + [r["wall"] for rs in results["runs"].values() for r in rs]
    timing = {"teacher_min": results["teacher"]["wall"] / 60, "runs_min": sum(all_walls) / 60,
              "elapsed_min": None if elapsed is None else elapsed / 60,
              "load": (f"mean {statistics.mean(load):.1f}, max {max(load):.1f} ({len(load)} samples)" if load
                       else "not sampled")}
    previous = out_dir / f"{name}.json"
    if elapsed is None and previous.exists():
        kept = json.loads(previous.read_text())["timing"]
        timing.update(elapsed_min=kept["elapsed_min"], load=kept["load"])
    lines = render(summary, setting, timing)
    write_generated(out_dir / f"{name}.md", lines, "<!-- camvid:start -->", "<!-- camvid:end -->",
                    title="# Does distillation work on CamVid? (issue 15)\n")
    record = {"setting": {k: v for k, v in vars(args).items()}, "summary": summary, "timing": timing,
              "results": results}
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out_dir / (name + '.json')}")


if __name__ == "__main__":
    main()
