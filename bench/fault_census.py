"""Fault census: bad inputs and faults tried as a new user meets them, against any checkout of segkd.

    python bench/fault_census.py                         # this checkout
    python bench/fault_census.py --checkout DIR --name before

Each case runs engine/train.py or engine/evaluate.py of the checkout in a fresh process (CPU, tiny models) and
is classified by what the user sees:

    clear      the command failed with one readable error line naming the flag, file or value, no traceback
    traceback  a Python traceback reached the user
    silent     a bad input was accepted (exit 0) or a failure went unreported
    lost       saved data was lost, poisoned or left inconsistent (checked per case)
    ok         a fault the run is meant to survive (or a value with a documented meaning) was handled

Results: bench/results/faults_<name>.md and .json. tests/engine/test_faults.py holds the same cases as tests.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--crop", "32", "--batch-size", "2", "--workers", "0", "--val-size", "2", "--log-interval", "1",
        "--eval-interval", "0", "--teacher", "pspnet_tiny", "--student", "pspnet_tiny"]


class Census:
    def __init__(self, checkout, work):
        self.checkout, self.work, self.rows = Path(checkout), Path(work), []
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(self.checkout)}

    def cmd(self, tool, argv):
        return [sys.executable, str(self.checkout / "engine" / tool), *argv]

    def run(self, argv, tool="train.py", fast=True, env=None):
        full = [*FAST, "--cache-dir", str(self.work / "cache"), *argv] if tool == "train.py" and fast else argv
        return subprocess.run(self.cmd(tool, full), capture_output=True, text=True, timeout=600,
                              env={**self.env, **(env or {})})

    def record(self, name, p, token=None, kind=None, note=""):
        """Classify a finished process: a refused bad input by default; `kind` forces the class."""
        text = p.stdout + p.stderr
        lines = [line for line in p.stderr.replace("\r", "\n").splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        if kind is None:
            if "Traceback" in text:
                kind = "traceback"
            elif p.returncode == 0:
                kind = "silent"
            elif token is None or token in last:
                kind = "clear"
            else:
                kind = "traceback" if len(lines) > 3 and "error" not in last.lower() else "clear"
        self.rows.append({"case": name, "class": kind, "exit": p.returncode, "last line": last[:200], "note": note})
        print(f"{kind:9s} {name}: exit {p.returncode}: {last[:150]}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkout", default=str(ROOT))
    ap.add_argument("--name", default="after")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="segkd-census-"))
    c = Census(a.checkout, work)
    teacher = work / "teacher.pt"
    subprocess.run([sys.executable, "-c", "import sys, torch; sys.path.insert(0, sys.argv[1]); "
                    "from engine.models import build_model; torch.manual_seed(1); "
                    "torch.save(build_model('pspnet_tiny', 8).state_dict(), sys.argv[2])", str(c.checkout),
                    str(teacher)], check=True, env=c.env)
    t = ["--teacher-ckpt", str(teacher)]

    # ---- bad values and files, train.py
    bad = [("--iters 0", ["--iters", "0"], "--iters"), ("--iters -3", ["--iters", "-3"], "--iters"),
           ("--temperature 0", ["--temperature", "0"], "--temperature"),
           ("--temperature -1", ["--temperature", "-1"], "--temperature"),
           ("--cwd-temperature 0", ["--method", "cwd", "--cwd-temperature", "0"], "--cwd-temperature"),
           ("--log-interval 0", ["--log-interval", "0"], "--log-interval"),
           ("--eval-interval -1", ["--eval-interval", "-1"], "--eval-interval"),
           ("--keep-ckpts -1", ["--keep-ckpts", "-1"], "--keep-ckpts"),
           ("--crop 1", ["--crop", "1"], "--crop"), ("--batch-size 1", ["--batch-size", "1"], "--batch-size"),
           ("--lr 0", ["--lr", "0"], "--lr"), ("--lr -1", ["--lr", "-1"], "--lr"),
           ("--momentum -1", ["--momentum", "-1"], "--momentum"),
           ("--scale-min above --scale-max", ["--scale-min", "3"], "--scale-min"),
           ("--rotate -5", ["--rotate", "-5"], "--rotate"), ("--workers -1", ["--workers", "-1"], "--workers"),
           ("--val-size -1", ["--val-size", "-1"], "--val-size"),
           ("--teacher-iters 0 (no --teacher-ckpt)", ["--teacher-iters", "0"], "--teacher-iters"),
           ("--precision fp8", ["--precision", "fp8"], "--precision"),
           ("--device tpu", ["--device", "tpu"], "--device"), ("--device cuda without CUDA", ["--device", "cuda"],
                                                                "--device cuda"),
           ("--method bogus", ["--method", "bogus"], "bogus"),
           ("--student bogus", ["--method", "none", "--student", "bogus"], "bogus"),
           ("--teacher-ckpt missing", ["--teacher-ckpt", str(work / "nowhere.pt")], "nowhere.pt"),
           ("--dataset camvid, --data-root missing", ["--method", "none", "--dataset", "camvid", "--data-root",
                                                      str(work / "nowhere")], "nowhere"),
           ("--wdpd-alpha 2", ["--method", "dfss", *t, "--aux-data", str(work), "--wdpd-alpha", "2"], "--wdpd-alpha"),
           ("--gen-batch 1", ["--method", "dfad", *t, "--gen-batch", "1"], "--gen-batch"),
           ("--aux-data missing", ["--method", "dfss", *t, "--aux-data", str(work / "nowhere")], "nowhere")]
    for i, (name, argv, token) in enumerate(bad):
        if "--method" not in argv:
            argv = ["--method", "kd", *t, *argv]
        if "--iters" not in argv:
            argv = [*argv, "--iters", "2"]
        c.record(name, c.run([*argv, "--out", str(work / f"bad{i}")]), token)  # a directory per case
    (work / "junk.pt").write_bytes(b"not a checkpoint")
    c.record("--teacher-ckpt junk file", c.run(["--method", "kd", "--teacher-ckpt", str(work / "junk.pt"), "--iters",
                                                "2", "--out", str(work / "junk-run")]), "junk.pt")
    taken = work / "taken"
    taken.write_text("mine")
    c.record("--out is an existing file", c.run(["--method", "none", "--iters", "2", "--out", str(taken)]), "--out")

    # ---- resume
    base = ["--method", "cad", *t, "--iters", "2", "--out", str(work / "r")]
    c.run(base)
    p = c.run([*base, "--lr", "0.01"])
    cfg = json.loads((work / "r" / "config.json").read_text())
    c.record("resume with another --lr", p, "--lr",
             kind="lost" if p.returncode == 0 and cfg["optim"]["lr"] != 0.05 else None,
             note="config.json then records an lr that did not run" if p.returncode == 0 else "")
    c.record("resume with another --position", c.run([*base, "--position", "decoder"]), "--position")
    c.record("--resume junk file", c.run([*base, "--resume", str(work / "junk.pt")]), "junk.pt")
    c.run(["--method", "kd", *t, "--iters", "6", "--ckpt-interval", "2", "--keep-ckpts", "3", "--out", str(work / "l")])
    c.run(["--method", "kd", *t, "--iters", "6", "--ckpt-interval", "2", "--keep-ckpts", "3", "--out", str(work / "l"),
           "--resume", str(work / "l" / "ckpt_0000004.pt")])
    its = [json.loads(line)["iter"] for line in (work / "l" / "log.jsonl").read_text().splitlines()
           if json.loads(line)["kind"] == "train"]
    c.record("log.jsonl after a resume from an earlier checkpoint", subprocess.CompletedProcess([], 0, "", ""),
             kind="ok" if its == sorted(set(its)) else "lost", note=f"train iterations logged: {its}")

    # ---- documented zero
    p = c.run(["--method", "kd", *t, "--iters", "3", "--ckpt-interval", "0", "--out", str(work / "z")])
    c.record("--ckpt-interval 0", p, kind="ok" if p.returncode == 0 else ("traceback" if "Traceback" in p.stderr
                                                                          else "clear"),
             note="documented: only the final checkpoint" if p.returncode == 0 else "")

    # ---- non-finite
    p = c.run(["--method", "none", "--iters", "8", "--lr", "1e6", "--ckpt-interval", "1", "--out", str(work / "n")])
    poisoned = check_finite(c, work / "n" / "last.pt")
    c.record("--lr 1e6 --ckpt-interval 1 (diverges)", p, "non-finite", kind="lost" if poisoned else None,
             note=f"last.pt holds {poisoned} non-finite tensor(s)" if poisoned else "")
    make_poisoned(c, work / "r" / "last.pt", work / "poisoned.pt")
    p = c.run(["--ckpt", str(work / "poisoned.pt"), "--val-size", "2", "--workers", "0"], tool="evaluate.py")
    c.record("evaluate.py on non-finite weights", p, "non-finite")

    # ---- evaluate.py
    for name, argv, token in [("evaluate --ckpt missing", ["--ckpt", str(work / "nowhere.pt")], "nowhere.pt"),
                              ("evaluate --ckpt junk", ["--ckpt", str(work / "junk.pt")], "junk.pt"),
                              ("evaluate --batch-size 0", ["--ckpt", str(work / "r" / "last.pt"), "--batch-size", "0"],
                               "--batch-size"),
                              ("evaluate --data-root missing", ["--ckpt", str(work / "r" / "last.pt"), "--dataset",
                                                                "camvid", "--data-root", str(work / "nowhere")],
                               "nowhere"),
                              ("evaluate --device cuda without CUDA", ["--ckpt", str(work / "r" / "last.pt"),
                                                                       "--device", "cuda"], "cuda")]:
        c.record(name, c.run([*argv, "--workers", "0"], tool="evaluate.py"), token)

    # ---- bad data with workers
    data = make_bad_camvid(c, work)
    camvid = ["--method", "none", "--dataset", "camvid", "--data-root", str(data), "--iters", "6", "--crop", "16",
              "--batch-size", "2", "--loader", "torch", "--val-size", "2"]
    p = c.run([*camvid, "--workers", "2", "--out", str(work / "bw")], fast=False, env={"TMPDIR": str(work)})
    c.record("truncated image, --workers 2", p, "f001.png")
    p = c.run([*camvid, "--workers", "2", "--skip-bad-samples", "--out", str(work / "bs")], fast=False,
              env={"TMPDIR": str(work)})
    c.record("truncated image, --workers 2 --skip-bad-samples", p,
             kind="ok" if p.returncode == 0 and "1 unreadable" in p.stdout else None)

    # ---- Ctrl-C
    out = work / "c"
    proc = subprocess.Popen(c.cmd("train.py", [*FAST, "--method", "kd", *t, "--iters", "400", "--ckpt-interval", "2",
                                               "--keep-ckpts", "1000", "--out", str(out), "--cache-dir",
                                               str(work / "cache")]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=c.env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "ckpt_0000004.pt").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    o, e = proc.communicate(timeout=120)
    c.record("Ctrl-C during training", subprocess.CompletedProcess([], proc.returncode, o, e), "interrupted")

    # ---- stale temporaries, two writers, cache damage
    for i in range(3):
        (work / "r" / f".ckpt_000000{i}.pt.99{i}.tmp").write_bytes(b"x" * 1000)
    c.run(["--method", "cad", *t, "--iters", "3", "--out", str(work / "r")])
    left = len(list((work / "r").glob(".*.tmp")))
    c.record("temporaries of killed saves", subprocess.CompletedProcess([], 0, "", ""),
             kind="lost" if left else "ok", note=f"{left} left after the next run" if left else "removed")

    two = work / "two"
    argv = [*FAST, "--method", "kd", *t, "--iters", "40", "--ckpt-interval", "5", "--keep-ckpts", "1", "--out",
            str(two), "--cache-dir", str(work / "cache")]
    first = subprocess.Popen(c.cmd("train.py", argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=c.env)
    deadline = time.time() + 120
    while not (two / "config.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    second = subprocess.run(c.cmd("train.py", [*argv[:-2], "--seed", "7", *argv[-2:]]), capture_output=True,
                            text=True, env=c.env, timeout=600)
    first.communicate(timeout=600)
    seed = json.loads((two / "config.json").read_text())["run"]["seed"]
    c.record("two trainers on one --out", second, "in use",
             kind="lost" if second.returncode == 0 else None,
             note=f"both ran; config.json says seed {seed}" if second.returncode == 0 else "")

    cached = ["--method", "kd", "--teacher-iters", "2", "--iters", "1"]
    c.run([*cached, "--out", str(work / "ca")])
    entry = next(p for p in (work / "cache" / "teachers").iterdir() if p.is_dir())
    blob = bytearray((entry / "last.pt").read_bytes())
    mid = len(blob) // 2
    blob[mid:mid + 4096] = bytes(b ^ 0xFF for b in blob[mid:mid + 4096])
    (entry / "last.pt").write_bytes(bytes(blob))
    p = c.run([*cached, "--out", str(work / "cb")])
    used = "using the cached teacher" in p.stdout
    c.record("4 KB flipped in the cached teacher", p, kind="silent" if used and p.returncode == 0 else
             ("ok" if p.returncode == 0 and "damaged" in p.stdout else None),
             note="the damaged teacher was used" if used else "")
    (entry / "last.pt").write_bytes((entry / "last.pt").read_bytes()[:5000])
    p = c.run([*cached, "--out", str(work / "cc")])
    c.record("truncated cached teacher", p, kind="ok" if p.returncode == 0 and "damaged" in p.stdout else None,
             note="an error about a --teacher-ckpt the user never gave" if "teacher-ckpt" in p.stderr else "")
    (entry / "results.json").write_text('{"miou": 0.')
    p = c.run([*cached, "--out", str(work / "cd")])
    c.record("truncated cached results.json", p, kind="ok" if p.returncode == 0 and "damaged" in p.stdout else None)

    write(a, c.rows)


def check_finite(c, path):
    if not path.exists():
        return 0
    code = ("import sys, torch; c = torch.load(sys.argv[1], weights_only=True); "
            "print(sum(1 for v in c['model'].values() if v.is_floating_point() and not torch.isfinite(v).all()))")
    return int(subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                              env=c.env).stdout.strip() or 0)


def make_poisoned(c, src, dst):
    code = ("import sys, torch; c = torch.load(sys.argv[1], weights_only=True); "
            "c['model']['classifier.weight'] = c['model']['classifier.weight'] * float('inf'); "
            "torch.save(c, sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(src), str(dst)], check=True, env=c.env)


def make_bad_camvid(c, work):
    from PIL import Image
    import numpy as np

    root = work / "camvid"
    for split, n in (("train", 6), ("val", 2)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(n):
            Image.fromarray(np.full((24, 32, 3), 40 * i, np.uint8)).save(root / split / f"f{i:03d}.png")
            Image.fromarray(np.full((24, 32), i % 5, np.uint8)).save(root / f"{split}annot" / f"f{i:03d}.png")
    bad = root / "train" / "f001.png"
    bad.write_bytes(bad.read_bytes()[:40])
    return root


def write(a, rows):
    counts = {}
    for r in rows:
        counts[r["class"]] = counts.get(r["class"], 0) + 1
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Fault census: {a.name} ({a.checkout})", "",
             f"{len(rows)} cases (CPU, tiny models, one fresh process each): " +
             ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), "",
             "| case | class | exit | last line / note |", "| --- | --- | ---: | --- |"]
    for r in rows:
        shown = (r["note"] or r["last line"]).replace("|", "\\|")
        lines.append(f"| {r['case']} | {r['class']} | {r['exit']} | {shown} |")
    (out / f"faults_{a.name}.md").write_text("\n".join(lines) + "\n")
    (out / f"faults_{a.name}.json").write_text(json.dumps({"counts": counts, "rows": rows}, indent=2))
    print("\n".join(lines[:3]))


if __name__ == "__main__":
    main()
