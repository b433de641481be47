"""Train a segmentation student, with or without distillation.

    torchrun --nproc-per-node=2 engine/train.py --method cad        # the main job: built-in data, small models
    python engine/train.py --method none --student pspnet_r18 --dataset camvid --data-root DIR   # a teacher/baseline

With no --teacher-ckpt, a distillation method first trains the --teacher on the same data (or reuses the
one an earlier run with the same settings cached), then distils. The run ends with a table: teacher mIoU,
student-with-method mIoU and, where one is cached, the student-alone mIoU.
"""
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python engine/train.py`: import `engine` from the checkout, not engine/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from engine.config import parse_config  # noqa: E402
from engine.dist import barrier, cleanup, init_distributed  # noqa: E402
from engine.errors import run_cli  # noqa: E402
from engine.methods import method_needs_teacher, parse_method  # noqa: E402
from engine.profile import profile_run  # noqa: E402
from engine.recipes import RECIPES, dry_run_text  # noqa: E402
from engine.runs import cached_baseline, ensure_teacher, hold_directory, random_teacher, summary  # noqa: E402
from engine.trainer import Trainer  # noqa: E402


def main(argv=None):
    cfg = parse_config(argv, description=__doc__.split("\n\n")[0])
    if cfg.run.recipe == "list":
        if os.environ.get("RANK", "0") == "0":
            print("\n".join(RECIPES))
        return None
    names = parse_method(cfg.method.method)
    if cfg.run.dry_run:  # nothing is built, read or written
        if os.environ.get("RANK", "0") == "0":
            print(dry_run_text(cfg))
        return None
    if not cfg.run.out:
        cfg.run.out = str(Path("runs") / f"{cfg.data.dataset}-{cfg.model.student}-{'+'.join(names)}")
    if Path(cfg.run.out).exists() and not Path(cfg.run.out).is_dir():
        raise ValueError(f"--out {cfg.run.out} exists and is not a directory: give a directory for the run")
    env = init_distributed(cfg.run.device)
    echo = print if env.is_main else (lambda *a, **k: None)
    try:
        if cfg.run.profile:  # times the step from fresh weights: nothing of a run in --out is read or written
            cfg.run.resume = "none"
            with hold_directory(cfg.run.out, env, echo=echo):
                if method_needs_teacher(cfg.method.method) and not cfg.model.teacher_ckpt:
                    cfg.model.teacher_ckpt = random_teacher(cfg, env, echo)
                trainer = Trainer(cfg, env, echo)
                if env.is_main:
                    (Path(cfg.run.out) / "profile").mkdir(parents=True, exist_ok=True)
                    (Path(cfg.run.out) / "profile" / "config.json").write_text(cfg.dumps())
                return profile_run(trainer.step, trainer.batches(trainer.start_iter), env, cfg.run.out,
                                   warmup=cfg.run.profile_warmup, steps=cfg.run.profile,
                                   start_iter=trainer.start_iter, iters=cfg.optim.iters,
                                   title=trainer.profile_title(), notes=trainer.profile_notes, echo=echo)
        with hold_directory(cfg.run.out, env, echo=echo):  # first: a busy --out fails before any teacher is trained
            if method_needs_teacher(cfg.method.method) and not cfg.model.teacher_ckpt:
                cfg.model.teacher_ckpt = ensure_teacher(cfg, env, echo)
                barrier()
            result = Trainer(cfg, env, echo).fit()
        echo(summary(cfg, result, cached_baseline(cfg, env, result)))
        return result
    finally:
        cleanup()


def cli(argv=None):
    """The command line: any failure ends in one line `segkd: error: ...` and its exit code (engine/errors.py)."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
