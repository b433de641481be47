"""The fault suite: bad input and faults through the command line as a user meets them. Each case asserts the
exit code, that no traceback is printed, that the one `segkd: error:` line is the last and names the flag, file
or value, and that nothing saved earlier was lost (engine/errors.py documents the codes)."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import evaluate as evaluate_cli
from engine import train as train_cli
from engine.checkpoint import load_checkpoint, nonfinite_tensors
from engine.runlock import DirectoryLock
from speed_testing import teacher  # noqa: F401  (a random pspnet_tiny teacher, module-scoped)

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--crop", "32", "--batch-size", "2", "--workers", "0", "--val-size", "2", "--log-interval", "1",
        "--eval-interval", "0", "--teacher", "pspnet_tiny", "--student", "pspnet_tiny"]
USAGE, RUNTIME, INTERRUPTED = 2, 1, 130


def one_error_line(text):
    """The error line of a failed command's stderr, asserting it is the only one, the last line, and that no
    traceback came with it."""
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("segkd: error")]
    assert len(errors) == 1, text[-3000:]
    assert lines[-1] == errors[0], f"the error is not the last line: {lines[-3:]}"
    return errors[0]


def fails(capfd, tmp, argv, code, *names, command=train_cli):
    """Run the command in this process as its entry point does; -> the error line."""
    args = [*FAST, "--cache-dir", str(tmp / "cache"), *argv] if command is train_cli else list(argv)
    with pytest.raises(SystemExit) as stop:
        command.cli(args)
    out, err = capfd.readouterr()
    assert "Traceback" not in out
    line = one_error_line(err)
    assert stop.value.code == code, (stop.value.code, line)
    for name in names:
        assert name in line, (name, line)
    return line


def runs(tmp, *argv):
    return train_cli.main([*FAST, "--cache-dir", str(tmp / "cache"), *argv])


# ------------------------------------------------------------------ usage: named at parse time, exit 2
@pytest.mark.parametrize("argv, names", [
    (["--iters", "0"], ["--iters must be >= 1, got 0"]),
    (["--iters", "-3"], ["--iters must be >= 1, got -3"]),
    (["--temperature", "0"], ["--temperature must be > 0, got 0.0"]),
    (["--temperature", "-1"], ["--temperature must be > 0"]),
    (["--cwd-temperature", "0"], ["--cwd-temperature must be > 0"]),
    (["--log-interval", "0"], ["--log-interval must be >= 1, got 0"]),
    (["--eval-interval", "-1"], ["--eval-interval must be >= 0"]),
    (["--crop", "1"], ["--crop must be at least 8x8", "got 1x1"]),
    (["--batch-size", "1"], ["--batch-size must be >= 2"]),
    (["--lr", "0"], ["--lr must be > 0"]),
    (["--scale-min", "3"], ["--scale-min 3.0 is above --scale-max 2.0"]),
    (["--precision", "fp8"], ["--precision 'fp8' is not one of"]),
    (["--device", "tpu"], ["--device 'tpu' is not one of"]),
    (["--wdpd-alpha", "2"], ["--wdpd-alpha must be between 0 and 1"]),
    (["--method", "bogus"], ["unknown --method 'bogus'"]),
    (["--iters", "abc"], ["argument --iters: invalid int value: 'abc'"]),
    (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
    (["--student", "resnet_bogus", "--method", "none"], ["resnet_bogus"]),
])
def test_bad_values_are_named_before_anything_runs(capfd, tmp_path, argv, names):
    fails(capfd, tmp_path, [*argv, "--out", str(tmp_path / "r")], USAGE, *names)
    assert not (tmp_path / "r" / "log.jsonl").exists()


def test_a_missing_file_or_an_out_that_is_a_file(capfd, tmp_path):
    fails(capfd, tmp_path, ["--method", "kd", "--teacher-ckpt", str(tmp_path / "nowhere.pt"), "--out",
                            str(tmp_path / "r")], USAGE, "nowhere.pt")
    taken = tmp_path / "taken"
    taken.write_text("mine")
    fails(capfd, tmp_path, ["--method", "none", "--out", str(taken)], USAGE, f"--out {taken}", "not a directory")
    assert taken.read_text() == "mine"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capfd, tmp_path):
    fails(capfd, tmp_path, ["--method", "none", "--device", "cuda", "--out", str(tmp_path / "r")], USAGE,
          "--device cuda", "no CUDA device")


def test_ckpt_interval_zero_means_only_the_final_checkpoint(teacher, tmp_path):
    runs(tmp_path, "--method", "kd", "--teacher-ckpt", teacher, "--iters", "3", "--ckpt-interval", "0",
         "--out", str(tmp_path / "r"))
    assert [p.name for p in sorted((tmp_path / "r").glob("ckpt_*.pt"))] == ["ckpt_0000003.pt"]


def test_an_internal_error_is_one_line_unless_debugging(capfd, tmp_path, monkeypatch):
    from engine import trainer

    def broken(self):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(trainer.Trainer, "fit", broken)
    argv = ["--method", "none", "--iters", "2", "--out", str(tmp_path / "r")]
    fails(capfd, tmp_path, argv, RUNTIME, "ZeroDivisionError: division by zero", "SEGKD_DEBUG=1")
    monkeypatch.setenv("SEGKD_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        train_cli.cli([*FAST, "--cache-dir", str(tmp_path / "cache"), *argv])


# ------------------------------------------------------------------ resume: exact, or refused with the flags
def test_resume_with_other_settings_is_refused_naming_each_flag(capfd, teacher, tmp_path):
    out = str(tmp_path / "r")
    runs(tmp_path, "--method", "cad", "--teacher-ckpt", teacher, "--iters", "2", "--out", out)
    before = load_checkpoint(Path(out) / "last.pt")
    line = fails(capfd, tmp_path, ["--method", "cad", "--teacher-ckpt", teacher, "--iters", "2", "--out", out,
                                   "--lr", "0.01", "--position", "decoder"], USAGE,
                 "--lr 0.01 (the checkpoint's: 0.05)", "--position decoder (the checkpoint's: '')")
    assert "--resume none" in line
    after = load_checkpoint(Path(out) / "last.pt")
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert json.loads((Path(out) / "config.json").read_text())["optim"]["lr"] == 0.05  # what ran


def test_resume_past_iters_is_refused_and_profile_ignores_the_run(capfd, teacher, tmp_path):
    out = str(tmp_path / "r")
    runs(tmp_path, "--method", "kd", "--teacher-ckpt", teacher, "--iters", "4", "--out", out)
    fails(capfd, tmp_path, ["--method", "kd", "--teacher-ckpt", teacher, "--iters", "2", "--out", out], USAGE,
          "at iteration 4, past --iters 2")
    # --profile times fresh weights: a run in --out with other settings is neither refused nor touched
    mtime = (Path(out) / "last.pt").stat().st_mtime_ns
    runs(tmp_path, "--method", "kd", "--teacher-ckpt", teacher, "--iters", "4", "--lr", "0.01", "--profile", "1",
         "--profile-warmup", "0", "--out", out)
    assert (Path(out) / "last.pt").stat().st_mtime_ns == mtime
    assert json.loads((Path(out) / "config.json").read_text())["optim"]["lr"] == 0.05


def test_a_cut_off_cached_teacher_with_other_settings_is_started_over(capfd, tmp_path):
    args = ["--method", "kd", "--teacher-iters", "2", "--iters", "1"]
    runs(tmp_path, *args, "--precision", "fp16", "--out", str(tmp_path / "a"))
    entry = next(p for p in (tmp_path / "cache" / "teachers").iterdir() if p.is_dir())
    (entry / "results.json").unlink()  # as if cut off: a checkpoint, no result
    capfd.readouterr()
    runs(tmp_path, *args, "--out", str(tmp_path / "b"))  # precision fp32: the same entry, other settings
    out = capfd.readouterr().out
    assert f"note: starting {entry} over" in out and "--precision" in out
    assert (entry / "results.json").exists()
    assert json.loads((entry / "config.json").read_text())["run"]["precision"] == "auto"


def test_a_resumed_log_has_each_iteration_once(teacher, tmp_path):
    out = tmp_path / "r"
    args = ["--method", "kd", "--teacher-ckpt", teacher, "--iters", "6", "--ckpt-interval", "2", "--keep-ckpts",
            "3", "--out", str(out)]
    runs(tmp_path, *args)
    # as if killed after iteration 6 was logged but before its checkpoint: resume from iteration 4
    runs(tmp_path, *args, "--resume", str(out / "ckpt_0000004.pt"))
    runs(tmp_path, *args)  # complete: evaluates and reports again
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r["iter"] for r in records if r["kind"] == "train"]
    evals = [r["iter"] for r in records if r["kind"] == "eval"]
    assert train == [1, 2, 3, 4, 5, 6] and evals == [6]
    with open(out / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "it')  # a line cut short by a kill
    runs(tmp_path, *args, "--resume", "none")  # starts over: the old records go
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------ nothing lost, nothing poisoned
def test_non_finite_loss_exits_1_and_keeps_the_checkpoint(capfd, teacher, tmp_path, monkeypatch):
    from engine.methods import kd as kd_module

    original, calls = kd_module.KD.forward, {"n": 0}

    def poisoned(self, s, t, batch):
        calls["n"] += 1
        terms = original(self, s, t, batch)
        return {k: v * float("nan") for k, v in terms.items()} if calls["n"] == 3 else terms

    monkeypatch.setattr(kd_module.KD, "forward", poisoned)
    out = tmp_path / "r"
    fails(capfd, tmp_path, ["--method", "kd", "--teacher-ckpt", teacher, "--iters", "6", "--ckpt-interval", "2",
                            "--out", str(out)], RUNTIME, "non-finite loss at iteration 3", "kd/kd", "intact")
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["iteration"] == 2 and not nonfinite_tensors(ckpt["model"])


def test_non_finite_weights_are_never_checkpointed_nor_scored(capfd, tmp_path):
    out = tmp_path / "r"
    fails(capfd, tmp_path, ["--method", "none", "--iters", "8", "--lr", "1e6", "--ckpt-interval", "1", "--out",
                            str(out)], RUNTIME, "non-finite", "intact")
    for path in out.glob("*.pt"):
        assert not nonfinite_tensors(load_checkpoint(path)["model"]), path
    # a checkpoint poisoned some other way: evaluate.py refuses it, naming the tensors
    ckpt = load_checkpoint(out / "last.pt")
    ckpt["model"]["classifier.weight"] = ckpt["model"]["classifier.weight"] * float("inf")
    torch.save(ckpt, tmp_path / "poisoned.pt")
    fails(capfd, tmp_path, ["--ckpt", str(tmp_path / "poisoned.pt"), "--val-size", "2", "--workers", "0"], USAGE,
          "non-finite weights", "classifier.weight", command=evaluate_cli)


@pytest.mark.parametrize("argv, names", [
    (["--ckpt", "NOWHERE"], ["checkpoint NOWHERE does not exist"]),
    (["--ckpt", "JUNK"], ["JUNK could not be read"]),
    (["--ckpt", "CKPT", "--batch-size", "0"], ["--batch-size must be >= 1"]),
    (["--ckpt", "CKPT", "--dataset", "camvid", "--data-root", "NOWHERE"], ["NOWHERE"]),
])
def test_evaluate_errors_are_one_line(capfd, teacher, tmp_path, argv, names):
    runs(tmp_path, "--method", "none", "--iters", "1", "--out", str(tmp_path / "r"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    where = {"NOWHERE": str(tmp_path / "nowhere"), "JUNK": str(tmp_path / "junk.pt"),
             "CKPT": str(tmp_path / "r" / "last.pt")}
    def fill(text):
        for key, value in where.items():
            text = text.replace(key, value)
        return text

    fails(capfd, tmp_path, [*map(fill, argv), "--workers", "0"], USAGE, *map(fill, names), command=evaluate_cli)


def test_disk_full_names_the_file_and_leaves_no_partial_file(capfd, teacher, tmp_path, monkeypatch):
    import builtins

    import engine.checkpoint as ckpt_module

    real_open, calls = builtins.open, {"n": 0}

    class FullDisk:
        """A file on a disk that fills up after 1000 bytes."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data[:1000]))
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def opener(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if str(path).endswith(".tmp") and "ckpt_" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint: the disk is full part-way through it
                return FullDisk(f)
        return f

    monkeypatch.setattr(ckpt_module, "open", opener, raising=False)
    out = tmp_path / "r"
    fails(capfd, tmp_path, ["--method", "kd", "--teacher-ckpt", teacher, "--iters", "6", "--ckpt-interval", "2",
                            "--out", str(out)], RUNTIME, "no space left", "ckpt_0000004.pt", "intact")
    assert load_checkpoint(out / "last.pt")["iteration"] == 2
    assert not list(out.glob(".*.tmp"))


def test_temporaries_of_killed_saves_are_removed(teacher, tmp_path):
    out = tmp_path / "r"
    args = ["--method", "kd", "--teacher-ckpt", teacher, "--iters", "2", "--out", str(out)]
    runs(tmp_path, *args)
    for name in (".ckpt_0000004.pt.4242.tmp", ".last.pt.4242.tmp"):
        (out / name).write_bytes(b"half a checkpoint")
    runs(tmp_path, *args, "--iters", "4")
    assert not list(out.glob(".*.tmp"))


def test_one_writer_per_run_directory(capfd, teacher, tmp_path):
    out = tmp_path / "r"
    holder = DirectoryLock(out / ".segkd.lock", f"run directory {out}").acquire()
    try:
        fails(capfd, tmp_path, ["--method", "kd", "--teacher-ckpt", teacher, "--iters", "2", "--out", str(out)],
              RUNTIME, f"run directory {out} is in use", f"pid {os.getpid()}")
        assert not (out / "log.jsonl").exists()
    finally:
        holder.release()
    # a lock left by a killed process is free
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from engine.runlock import DirectoryLock; "
            f"DirectoryLock({str(out / '.segkd.lock')!r}, 'x').acquire(); print('held', flush=True); "
            "import time; time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    p.kill()
    p.wait()
    runs(tmp_path, "--method", "kd", "--teacher-ckpt", teacher, "--iters", "2", "--out", str(out))
    assert load_checkpoint(out / "last.pt")["iteration"] == 2


def test_a_damaged_cached_teacher_is_named_and_trained_again(capfd, tmp_path):
    args = ["--method", "kd", "--teacher-iters", "2", "--iters", "1"]
    runs(tmp_path, *args, "--out", str(tmp_path / "a"))
    entry = next((tmp_path / "cache" / "teachers").glob("*[!k]"))  # the entry, not its .lock
    assert (entry / "checksum.json").exists()
    capfd.readouterr()
    data = bytearray((entry / "last.pt").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])  # 4 KB flipped
    (entry / "last.pt").write_bytes(bytes(data))
    runs(tmp_path, *args, "--out", str(tmp_path / "b"))
    out = capfd.readouterr().out
    assert f"the cached teacher {entry} is damaged" in out and "does not match the checksum" in out
    assert "training the teacher" in out
    (entry / "results.json").write_text('{"miou": 0.')  # truncated
    runs(tmp_path, *args, "--out", str(tmp_path / "c"))
    out = capfd.readouterr().out
    assert "results.json is unreadable" in out and "training the teacher" in out
    runs(tmp_path, *args, "--out", str(tmp_path / "d"))
    assert "using the cached teacher" in capfd.readouterr().out


# ------------------------------------------------------------------ real processes: workers, Ctrl-C
def command(*argv, tool="train.py"):
    return [sys.executable, str(ROOT / "engine" / tool), *argv]


def test_a_bad_sample_in_a_worker_reads_as_with_no_workers(tmp_path):
    from fake_datasets import make_camvid

    root = make_camvid(tmp_path / "data", splits=(("train", 6), ("val", 2)))
    bad = sorted((Path(root) / "train").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    base = ["--method", "none", "--dataset", "camvid", "--data-root", str(root), "--iters", "6", "--crop", "16",
            "--batch-size", "2", "--loader", "torch", "--val-size", "2", "--cache-dir", str(tmp_path / "cache")]
    lines = []
    for workers in ("0", "2"):
        p = subprocess.run(command(*base, "--workers", workers, "--out", str(tmp_path / f"w{workers}")),
                           capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp_path)})
        assert p.returncode == USAGE, p.stderr[-2000:]
        lines.append(one_error_line(p.stderr))
    assert lines[0] == lines[1] and bad.name in lines[0]
    p = subprocess.run(command(*base, "--workers", "2", "--skip-bad-samples", "--out", str(tmp_path / "skip")),
                       capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "1 unreadable training file(s) skipped" in p.stdout


def test_ctrl_c_ends_in_one_line_and_the_run_resumes(teacher, tmp_path):
    out = tmp_path / "r"
    argv = [*FAST, "--method", "kd", "--teacher-ckpt", teacher, "--iters", "400", "--ckpt-interval", "2",
            "--keep-ckpts", "1000", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]  # ckpt_4 stays
    # a shell without job control starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the run the terminal's default, as when a user presses Ctrl-C
    p = subprocess.Popen(command(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "ckpt_0000004.pt").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert p.poll() is None, "the run ended before it could be interrupted"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == INTERRUPTED, err[-2000:]
    assert "interrupted" in one_error_line(err)
    done = load_checkpoint(out / "last.pt")["iteration"]
    assert done >= 4 and not list(out.glob(".*.tmp"))


# ------------------------------------------------------------------ slow: kill -9, real disk full, concurrency
def straight_weights(tmp, teacher, argv, world=1):
    out = tmp / "straight"
    launch(argv + ["--out", str(out)], world=world).check_returncode()
    return load_checkpoint(out / "last.pt")["model"]


def launch(argv, world=1, wait=True, **popen):
    """engine/train.py as a user starts it: plain python, or torchrun with `world` processes."""
    cmd = (command(*argv) if world == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            *popen.pop("torchrun", []), str(ROOT / "engine" / "train.py"), *argv])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def assert_same_weights(a, b):
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def assert_each_iteration_once(out):
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    its = [r["iter"] for r in records if r["kind"] == "train"]
    assert its == sorted(set(its)), its


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_exact(teacher, tmp_path):
    argv = [*FAST, "--method", "cad", "--teacher-ckpt", teacher, "--iters", "60", "--ckpt-interval", "3",
            "--log-interval", "3", "--cache-dir", str(tmp_path / "cache")]
    want = straight_weights(tmp_path, teacher, argv)
    out = tmp_path / "killed"
    rng = __import__("random").Random(0)
    for _ in range(8):
        p = launch(argv + ["--out", str(out)], wait=False)
        time.sleep(rng.uniform(3.0, 7.0))  # torch's import takes ~2 s: kills land in start-up, steps and saves
        p.kill()
        p.communicate()
    done = launch(argv + ["--out", str(out)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_weights(want, load_checkpoint(out / "last.pt")["model"])
    assert not list(out.glob(".*.tmp"))
    assert_each_iteration_once(out)


@pytest.mark.slow
def test_elastic_restarts_recover_five_of_five(teacher, tmp_path):
    """torchrun --max-restarts=1, one rank killed (-9) after a checkpoint, rank 1 and rank 0 in turn: each run
    finishes, resumed from its checkpoint, with the weights of a run never killed."""
    argv = [*FAST, "--method", "kd", "--teacher-ckpt", teacher, "--iters", "80", "--ckpt-interval", "20",
            "--keep-ckpts", "1000", "--log-interval", "10", "--cache-dir", str(tmp_path / "cache")]
    want = straight_weights(tmp_path, teacher, argv, world=2)
    for trial in range(5):
        out = tmp_path / f"trial{trial}"
        p = launch(argv + ["--out", str(out)], world=2, wait=False, torchrun=["--max-restarts=1"])
        deadline = time.time() + 300
        while not (out / "ckpt_0000040.pt").exists() and time.time() < deadline:
            time.sleep(0.1)
        victim = rank_pid(out, trial % 2 == 0 and 1 or 0)
        os.kill(victim, signal.SIGKILL)
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, (trial, err[-3000:])
        assert_same_weights(want, load_checkpoint(out / "last.pt")["model"])
        assert_each_iteration_once(out)


def rank_pid(out, rank):
    """The pid of the torchrun worker of local rank `rank` whose command line names `out`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"LOCAL_RANK={rank}".encode() in env and str(out).encode() in cmdline:
            return int(pid)
    raise AssertionError(f"no rank {rank} running for {out}")


@pytest.mark.slow
def test_disk_full_on_a_small_tmpfs(teacher, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    probe = tmp_path / "probe"
    assert launch([*FAST, "--method", "kd", "--teacher-ckpt", teacher, "--iters", "1", "--out", str(probe),
                   "--cache-dir", str(tmp_path / "cache")]).returncode == 0
    size = (probe / "last.pt").stat().st_size
    # room for two checkpoints and a half: the third numbered one (two kept + the one being written) fails
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(2.5 * size) + 65536}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = mount / "r"
        p = launch([*FAST, "--method", "kd", "--teacher-ckpt", teacher, "--iters", "8", "--ckpt-interval", "2",
                    "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
        assert p.returncode == RUNTIME, p.stderr[-2000:]
        line = one_error_line(p.stderr)
        assert "no space left" in line and str(out) in line and "intact" in line
        assert load_checkpoint(out / "last.pt")["iteration"] == 4
        assert not list(out.glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(mount)])


@pytest.mark.slow
def test_two_trainers_on_one_run_directory(teacher, tmp_path):
    out = tmp_path / "r"
    argv = [*FAST, "--method", "kd", "--teacher-ckpt", teacher, "--iters", "40", "--ckpt-interval", "5",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    first = launch(argv, wait=False)
    deadline = time.time() + 120
    while not (out / "config.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    second = launch(argv)
    assert second.returncode == RUNTIME, second.stderr[-2000:]
    assert f"run directory {out} is in use" in one_error_line(second.stderr)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert load_checkpoint(out / "last.pt")["iteration"] == 40
    assert_each_iteration_once(out)


@pytest.mark.slow
def test_two_runs_needing_one_cached_teacher_train_it_once(tmp_path):
    base = [*FAST, "--method", "kd", "--teacher-iters", "300", "--iters", "2", "--cache-dir", str(tmp_path / "cache")]
    a = launch(base + ["--out", str(tmp_path / "a")], wait=False)
    deadline = time.time() + 120
    while not list((tmp_path / "cache").glob("teachers/*/log.jsonl")) and time.time() < deadline:
        time.sleep(0.1)  # a is training the teacher
    b = launch(base + ["--out", str(tmp_path / "b")], wait=False)
    out_a, err_a = a.communicate(timeout=600)
    out_b, err_b = b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, (err_a[-2000:], err_b[-2000:])
    both = out_a + out_b
    assert both.count("training the teacher") == 1, both
    assert "waiting for the other segkd process" in both and "using the cached teacher" in both
