"""The runs around a distillation run: the cached teacher it distils from, the cached student-alone baseline it
is compared with, the random teacher of --profile, and the closing table.

A teacher or baseline is cached under --cache-dir by a hash of every setting that determines what training it
produces (settings_key), so a later run with the same settings reuses it. A cached teacher carries the sha256
of its checkpoint (checksum.json): a truncated or corrupted entry is named and trained again, never used. One
process trains a given entry; another that needs it meanwhile waits for it (engine/runlock.py). Every run
directory is held by one process at a time (hold_directory).
"""
import dataclasses
import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from engine.checkpoint import (check_resumable, describe_names, load_checkpoint, nonfinite_tensors,
                               remove_stale_temporaries, write_text_atomic)
from engine.config import cache_dir
from engine.data import build_dataset
from engine.dist import barrier, broadcast_object
from engine.errors import RunDirectoryBusy, SegkdError
from engine.methods import MethodConfig
from engine.models import build_model, model_cost
from engine.runlock import DirectoryLock
from engine.trainer import Trainer


@contextmanager
def hold_directory(out, env, what="run directory", echo=print):
    """Rank 0 holds <out>/.segkd.lock while the body runs; if it cannot (another process holds it, or the folder
    cannot be written), every rank raises the same error. Temporary files of saves a killed run left behind are
    removed once it is held."""
    lock, problem = None, None
    if env.is_main:
        try:
            lock = DirectoryLock(Path(out) / ".segkd.lock", f"{what} {out}").acquire()
            removed = remove_stale_temporaries(out)
            if removed:
                echo(f"note: removed {removed} temporary file(s) of checkpoint writes interrupted earlier in {out}")
        except Exception as e:  # every rank must learn of it, or the others wait in the broadcast below
            if lock is not None:
                lock.release()
            problem = e if isinstance(e, RunDirectoryBusy) else SegkdError(f"--out {out} cannot be used: {e}")
    problem = broadcast_object(problem)
    if problem is not None:
        raise problem
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


# Settings added after caches existed: they enter the key only away from their default, so that the keys (and the
# cached teachers and baselines) from before each flag stay valid.
LATER = {"val_split": "val", "val_resize": 0, "val_resize_side": "short", "schedule": "poly", "step_parts": 3,
         "step_gamma": 0.1, "head_lr_mult": 1.0}


def later_default(name, value):
    return name in LATER and value == LATER[name]


def settings_key(cfg, arch, iters, world_size):
    """Hash of everything that determines what training `arch` alone for `iters` iterations produces."""
    d, o = cfg.data, cfg.optim
    root = str(Path(d.data_root).resolve()) if d.data_root else ""
    key = {"arch": arch, "iters": iters, "world": world_size, "seed": cfg.run.seed, "root": root,
           "data": {k: v for k, v in dataclasses.asdict(d).items() if k not in ("data_root", "workers")
                    and not later_default(k, v)},
           "optim": {k: v for k, v in dataclasses.asdict(o).items() if k != "iters" and not later_default(k, v)},
           "pretrained": cfg.model.pretrained_backbone if arch == cfg.model.student else ""}
    if cfg.model.aux_weight:
        key["aux_weight"] = cfg.model.aux_weight
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def train_alone(cfg, env, arch, iters, out, method="none", echo=print):
    """Run the trainer with cross-entropy only on `arch`, resuming an earlier attempt that was cut off. These
    runs are made for the user (a cached teacher, the student-alone baseline): an attempt left with other
    settings (an older segkd's, say) that a resume would refuse is started over instead, with a note."""
    sub = alone_config(cfg, arch, iters, out, method)
    with hold_directory(out, env, echo=echo):
        note = None
        if env.is_main and (Path(out) / "last.pt").exists():
            try:
                ckpt = load_checkpoint(Path(out) / "last.pt")
                check_resumable(ckpt, Path(out) / "last.pt", sub, ckpt["num_classes"])
            except ValueError as e:
                note = str(e)
        note = broadcast_object(note)
        if note:
            echo(f"note: starting {out} over: {note}")
            sub.run.resume = "none"
        return Trainer(sub, env).fit()


def alone_config(cfg, arch, iters, out, method="none"):
    """The configuration of `arch` trained alone for `iters` iterations in `out`, from the run that needs it."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, student=arch, teacher_ckpt="",
                                  pretrained_backbone=cfg.model.pretrained_backbone if arch == cfg.model.student else ""),
        # the student alone reads none of the distillation settings: the defaults, so that a cut-off run resumes
        # whatever method flags the run that needs it was given
        method=MethodConfig(method=method),
        optim=dataclasses.replace(cfg.optim, iters=iters),
        run=dataclasses.replace(cfg.run, out=str(out), resume="auto", eval_interval=0),
    )


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksum(out):
    ckpt = Path(out) / "last.pt"
    write_text_atomic(Path(out) / "checksum.json", json.dumps({"file": "last.pt", "sha256": sha256(ckpt),
                                                               "bytes": ckpt.stat().st_size}))


def cached_teacher_problem(out):
    """Why the cached teacher in `out` cannot be used (None: it can): an unreadable results.json, a missing,
    truncated or altered last.pt. An entry from before checksums is checked by loading it, then given one."""
    ckpt = out / "last.pt"
    try:
        json.loads((out / "results.json").read_text())["miou"]
    except (OSError, ValueError, KeyError) as e:
        return f"its results.json is unreadable ({type(e).__name__})"
    if not ckpt.is_file():
        return "its last.pt is missing"
    try:
        record = json.loads((out / "checksum.json").read_text())
    except FileNotFoundError:
        try:
            bad = nonfinite_tensors(load_checkpoint(ckpt)["model"])
        except ValueError as e:
            return str(e)
        if bad:
            return f"its last.pt holds non-finite weights ({describe_names(bad)})"
        write_checksum(out)
        return None
    except ValueError:
        return "its checksum.json is unreadable"
    if ckpt.stat().st_size != record.get("bytes") or sha256(ckpt) != record.get("sha256"):
        return "its last.pt does not match the checksum written when it was trained (truncated or corrupted)"
    return None


def wait_for_lock(path, what, env, echo, poll=2.0):
    """Rank 0 takes the lock `path`, waiting while another process holds it. The other ranks wait with it one
    poll at a time (a broadcast per poll), so that none sits in one collective past the process-group timeout
    while another job trains a teacher for hours. -> the held DirectoryLock on rank 0, None elsewhere."""
    lock, said = DirectoryLock(path, what) if env.is_main else None, False
    while True:
        got = None
        if env.is_main:
            try:
                lock.acquire()
                got = True
            except RunDirectoryBusy:
                got = False
                if not said:
                    echo(f"waiting for the other segkd process ({lock.owner()}) that holds {what}")
                    said = True
        if broadcast_object(got):
            return lock
        time.sleep(poll)


def ensure_teacher(cfg, env, echo):
    """Path of a trained teacher checkpoint for this run's settings: the cached one, or train it now. Another
    process training the same entry is waited for; a damaged entry is named, removed and trained again."""
    arch = cfg.model.teacher
    key = settings_key(cfg, arch, cfg.run.teacher_iters, env.world_size)
    out = cache_dir(cfg) / "teachers" / f"{cfg.data.dataset}-{arch}-{key}"
    ckpt = out / "last.pt"
    lock = wait_for_lock(out.with_name(out.name + ".lock"), f"the cached teacher {out}", env, echo)
    try:
        state = None
        if env.is_main:  # a cut-off training is resumed by train_alone, or started over if it cannot be
            state = "train"
            problem = cached_teacher_problem(out) if (out / "results.json").exists() else None
            if problem is None and (out / "results.json").exists():
                state = "ready"
            if problem is not None:
                echo(f"the cached teacher {out} is damaged: {problem}; training it again")
                shutil.rmtree(out)
        state = broadcast_object(state)
        if state == "ready":
            miou = json.loads((out / "results.json").read_text())["miou"]
            echo(f"using the cached teacher {arch} ({ckpt}, val mIoU {100 * miou:.1f}) trained earlier with the "
                 "same settings; give --teacher-ckpt to use another")
            return str(ckpt)
        echo(f"no --teacher-ckpt given: training the teacher {arch} on {cfg.data.dataset} for "
             f"{cfg.run.teacher_iters} iterations first; it is cached in {out} and reused by later runs with the "
             "same settings")
        train_alone(cfg, env, arch, cfg.run.teacher_iters, out, echo=echo)
        if env.is_main:
            write_checksum(out)
        barrier()
        return str(ckpt)
    finally:
        if lock is not None:
            lock.release()


def random_teacher(cfg, env, echo):
    """--profile without --teacher-ckpt: a randomly initialised teacher (a step's time does not depend on the
    weights), written once to <out>/profile/random_teacher.pt."""
    path = Path(cfg.run.out) / "profile" / f"random_teacher_{cfg.model.teacher}.pt"
    if env.is_main and not path.exists():
        k = build_dataset(cfg.data.dataset, "val", root=cfg.data.data_root, train=False).num_classes
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.run.seed)
        torch.save(build_model(cfg.model.teacher, k).state_dict(), path)
    barrier()
    echo(f"--profile without --teacher-ckpt: timing with a randomly initialised {cfg.model.teacher} ({path})")
    return str(path)


def baseline_path(cfg, world_size):
    arch = cfg.model.student
    return cache_dir(cfg) / "baselines" / f"{cfg.data.dataset}-{arch}-{settings_key(cfg, arch, cfg.optim.iters, world_size)}.json"


def summary(cfg, result, baseline):
    """The closing table of a run: mIoU, and each model's parameters and FLOPs per image at the training crop
    (engine/models/cost.py)."""
    k, crop = len(result["class_names"]), tuple(cfg.data.crop)
    cost = {arch: model_cost(arch, k, crop) for arch in {cfg.model.student, result.get("teacher")} if arch}
    rows = []
    if "teacher_miou" in result:
        rows.append(("teacher", result["teacher"], result["teacher"], result["teacher_miou"], ""))
    rows.append(("student", f"{cfg.model.student} + {cfg.method.method}" if cfg.method.method != "none"
                 else f"{cfg.model.student} alone", cfg.model.student, result["miou"], result["run_dir"]))
    if cfg.method.method != "none":
        if baseline:
            rows.append(("student", f"{cfg.model.student} alone", cfg.model.student, baseline["miou"],
                         f"cached: {baseline['run_dir']}"))
        else:
            rows.append(("student", f"{cfg.model.student} alone", cfg.model.student, None,
                         "not cached: run with --baseline (or --method none with these settings)"))
    if cfg.run.recipe:  # the source's figures beside ours (engine/recipes.py)
        from engine.recipes import get_recipe, paper_rows

        recipe = get_recipe(cfg.run.recipe)
        archs = {"teacher": cfg.model.teacher, "none": cfg.model.student}
        for label, figure in paper_rows(recipe, cfg.method.method, cfg):
            arch = archs["teacher"] if label.startswith("teacher") else archs["none"]
            rows.append(("paper", label, arch, figure / 100, recipe.paper_source))
    w = max(len(r[1]) for r in rows)
    lines = [f"\nsegkd summary: {cfg.data.dataset} {cfg.data.val_split}, mIoU (%); parameters and GFLOPs of one "
             f"{crop[0]}x{crop[1]} image"]
    for role, name, arch, miou, note in rows:
        shown = f"{100 * miou:5.1f}" if miou is not None else "    -"
        params, flops = cost[arch] if arch in cost else cost.setdefault(arch, model_cost(arch, k, crop))
        lines.append(f"  {role:<8} {name:<{w}}  {shown}  {params / 1e6:7.2f} M {flops / 1e9:8.3f} GFLOPs   {note}")
    if "teacher_miou" in result:
        (tp, tf), (sp, sf) = cost[result["teacher"]], cost[cfg.model.student]
        lines.append(f"  student: {tp / sp:.1f}x fewer parameters, {tf / sf:.1f}x fewer FLOPs than the teacher, "
                     f"{100 * (result['miou'] - result['teacher_miou']):+.1f} mIoU")
    return "\n".join(lines)


def cached_baseline(cfg, env, result):
    """The student-alone result for the closing table: recorded when this run was the student alone, trained
    now with --baseline when not cached yet, read from the cache otherwise; None when there is none."""
    base = baseline_path(cfg, env.world_size)
    if cfg.method.method == "none":
        if env.is_main:
            write_text_atomic(base, json.dumps({"miou": result["miou"], "run_dir": result["run_dir"]}))
        return None
    if broadcast_object(cfg.run.baseline and not base.exists() if env.is_main else None):  # rank 0 decides
        alone = train_alone(cfg, env, cfg.model.student, cfg.optim.iters, Path(cfg.run.out + "-alone"))
        if env.is_main:
            write_text_atomic(base, json.dumps({"miou": alone["miou"], "run_dir": alone["run_dir"]}))
        barrier()
    try:
        return json.loads(base.read_text()) if base.exists() else None
    except ValueError:
        print(f"note: the cached baseline {base} is unreadable; it is ignored (and replaced by the next "
              "--baseline or --method none run with these settings)")
        return None
