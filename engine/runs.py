"""The runs around a distillation run: the cached teacher it distils from, the cached student-alone baseline it
is compared with, the random teacher of --profile, and the closing table.

A teacher or baseline is cached under --cache-dir by a hash of every setting that determines what training it
produces (settings_key), so a later run with the same settings reuses it.
"""
import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from engine.config import cache_dir
from engine.data import build_dataset
from engine.dist import barrier
from engine.models import build_model
from engine.trainer import Trainer


def settings_key(cfg, arch, iters, world_size):
    """Hash of everything that determines what training `arch` alone for `iters` iterations produces."""
    d, o = cfg.data, cfg.optim
    root = str(Path(d.data_root).resolve()) if d.data_root else ""
    key = {"arch": arch, "iters": iters, "world": world_size, "seed": cfg.run.seed, "root": root,
           "data": {k: v for k, v in dataclasses.asdict(d).items() if k not in ("data_root", "workers")},
           "optim": {k: v for k, v in dataclasses.asdict(o).items() if k != "iters"},
           "pretrained": cfg.model.pretrained_backbone if arch == cfg.model.student else ""}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def train_alone(cfg, env, arch, iters, out, method="none"):
    """Run the trainer with cross-entropy only on `arch` (resuming if an earlier attempt was cut off)."""
    sub = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, student=arch, teacher_ckpt="",
                                  pretrained_backbone=cfg.model.pretrained_backbone if arch == cfg.model.student else ""),
        method=dataclasses.replace(cfg.method, method=method, position=""),
        optim=dataclasses.replace(cfg.optim, iters=iters),
        run=dataclasses.replace(cfg.run, out=str(out), resume="auto", eval_interval=0),
    )
    return Trainer(sub, env).fit()


def ensure_teacher(cfg, env, echo):
    """Path of a trained teacher checkpoint for this run's settings: the cached one, or train it now."""
    arch = cfg.model.teacher
    out = cache_dir(cfg) / "teachers" / f"{cfg.data.dataset}-{arch}-{settings_key(cfg, arch, cfg.run.teacher_iters, env.world_size)}"
    ckpt = out / "last.pt"
    if (out / "results.json").exists():
        miou = json.loads((out / "results.json").read_text())["miou"]
        echo(f"using the cached teacher {arch} ({ckpt}, val mIoU {100 * miou:.1f}) trained earlier with the "
             "same settings; give --teacher-ckpt to use another")
        return str(ckpt)
    echo(f"no --teacher-ckpt given: training the teacher {arch} on {cfg.data.dataset} for {cfg.run.teacher_iters} "
         f"iterations first; it is cached in {out} and reused by later runs with the same settings")
    train_alone(cfg, env, arch, cfg.run.teacher_iters, out)
    return str(ckpt)


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
    """The closing table of a run."""
    rows = []
    if "teacher_miou" in result:
        rows.append(("teacher", result["teacher"], result["teacher_miou"], ""))
    rows.append(("student", f"{cfg.model.student} + {cfg.method.method}" if cfg.method.method != "none"
                 else f"{cfg.model.student} alone", result["miou"], result["run_dir"]))
    if cfg.method.method != "none":
        if baseline:
            rows.append(("student", f"{cfg.model.student} alone", baseline["miou"], f"cached: {baseline['run_dir']}"))
        else:
            rows.append(("student", f"{cfg.model.student} alone", None,
                         "not cached: run with --baseline (or --method none with these settings)"))
    w = max(len(r[1]) for r in rows)
    lines = [f"\nsegkd summary: {cfg.data.dataset} val, mIoU (%)"]
    for role, name, miou, note in rows:
        shown = f"{100 * miou:5.1f}" if miou is not None else "    -"
        lines.append(f"  {role:<8} {name:<{w}}  {shown}   {note}")
    return "\n".join(lines)


def cached_baseline(cfg, env, result):
    """The student-alone result for the closing table: recorded when this run was the student alone, trained
    now with --baseline when not cached yet, read from the cache otherwise; None when there is none."""
    base = baseline_path(cfg, env.world_size)
    if cfg.method.method == "none":
        if env.is_main:
            base.parent.mkdir(parents=True, exist_ok=True)
            base.write_text(json.dumps({"miou": result["miou"], "run_dir": result["run_dir"]}))
        return None
    if cfg.run.baseline and not base.exists():
        alone = train_alone(cfg, env, cfg.model.student, cfg.optim.iters, Path(cfg.run.out + "-alone"))
        if env.is_main:
            base.parent.mkdir(parents=True, exist_ok=True)
            base.write_text(json.dumps({"miou": alone["miou"], "run_dir": alone["run_dir"]}))
        barrier()
    return json.loads(base.read_text()) if base.exists() else None
