"""Checkpoints: what a run saves and how it is restored, written atomically, loaded with clear errors.

A checkpoint is a plain dict of tensors and plain Python values, so it loads with `weights_only=True`:

    format             "segkd-checkpoint-v1"
    iteration          iterations done; a resume continues with this one
    complete           True for the checkpoint written at the end of the run
    arch, num_classes, class_names   the student, as evaluate.py and --teacher-ckpt read it
    config             the run's Config.to_dict()
    model              the student's state_dict
    method_state       the method's state_dict (connectors, projectors)
    optimizer          the student's SGD; method_optimizers: the method's own, in order
    rng                every rank's RNG states (torch, CUDA, numpy, python), rank order
    metrics            the final evaluation (complete checkpoints)
    source             the training source's state (data-free methods)
    scaler             the GradScaler's state (--precision fp16)

A run directory holds ckpt_<iteration>.pt (the newest --keep-ckpts) and last.pt, a hard link to the newest.
"""
import errno
import io
import os
import random
from pathlib import Path

import numpy as np
import torch

from engine.errors import DiskFullError, SegkdError, first_line

FORMAT = "segkd-checkpoint-v1"


TEMPORARY = (".ckpt_*.pt.*.tmp", ".last.pt.*.tmp")  # what save_atomic / link_atomic write before the rename


def save_atomic(obj, path):
    """Write `obj` to `path` so that a crash at any moment leaves either the old file or the new one. A failed
    write (disk full, quota, I/O error) removes its temporary file and raises one clear error naming the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Serialised in memory first: torch.save's zip writer turns a failed write into an opaque RuntimeError
    # ("unexpected pos ..."), while a plain write of the bytes raises the OSError that says what happened.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(e, path) from e
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def write_error(error, path):
    """The one error of a failed checkpoint write: disk full named as such, anything else with its reason."""
    kept = f"earlier checkpoints in {path.parent} are intact and no partial file was left"
    no_space = error.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error)
    if no_space:
        return DiskFullError(f"no space left on the device while writing the checkpoint {path}; {kept}. Free some "
                             "space (or choose another --out) and run the same command again to resume")
    return SegkdError(f"could not write the checkpoint {path} ({error.strerror or error}); {kept}")


def write_text_atomic(path, text):
    """Write a small text file (a log, a JSON record) so that a kill leaves the old content or the new, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def kept_note(out):
    """What a run that stops now leaves behind, for its error message."""
    last = Path(out) / "last.pt"
    return f"the last good checkpoint {last} is intact" if last.exists() else "no checkpoint had been written yet"


def remove_stale_temporaries(folder):
    """Temporary files of saves interrupted by a kill (a completed or failed save removes its own): called by the
    one process that holds the run directory (engine/runlock.py), so none of them is being written."""
    removed = 0
    for pattern in TEMPORARY:
        for tmp in Path(folder).glob(pattern):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def link_atomic(src, dst):
    """Make `dst` name the same file as `src` (hard link, else a copy), atomically."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        try:
            os.link(src, tmp)
        except OSError:
            import shutil
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(e, dst) from e
    _fsync_dir(dst.parent)


def _fsync_dir(d):
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path, map_location="cpu"):
    """Load a segkd checkpoint; names the file in every error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, ...
        raise ValueError(f"checkpoint {path} could not be read ({first_line(e)})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a segkd checkpoint (no '{FORMAT}' marker); a raw state dict can be "
                         "given as --teacher-ckpt, not to --resume or evaluate.py")
    return ckpt


def run_state(step, cfg, *, iteration, num_classes, class_names, rngs, complete=False, metrics=None):
    """The checkpoint of a run at `iteration`: the layout of the module docstring, from the parts a TrainStep
    (engine/step.py) holds."""
    ckpt = {
        "format": FORMAT, "iteration": iteration, "complete": complete, "arch": cfg.model.student,
        "num_classes": num_classes, "class_names": list(class_names), "config": cfg.to_dict(),
        "model": step.student.state_dict(), "method_state": step.method.state_dict(),
        "optimizer": step.optimizer.state_dict(),
        "method_optimizers": [o.state_dict() for o in step.method_optimizers], "rng": rngs,
        "metrics": metrics or {},
    }
    if step.source is not None:
        ckpt["source"] = step.source.state_dict()
    if step.scaler is not None:
        ckpt["scaler"] = step.scaler.state_dict()
    return ckpt


def write_run_checkpoint(ckpt, out, keep):
    """<out>/ckpt_<iteration>.pt written atomically, last.pt pointed at it, then all but the newest `keep`
    numbered checkpoints removed."""
    out = Path(out)
    path = out / f"ckpt_{ckpt['iteration']:07d}.pt"
    save_atomic(ckpt, path)
    link_atomic(path, out / "last.pt")
    numbered = sorted(out.glob("ckpt_*.pt"))
    for old in numbered[: max(len(numbered) - keep, 0)]:
        old.unlink()
    return path


def resume_path(spec, out):
    """--resume: '' or 'none' -> None; 'auto' -> <out>/last.pt if it exists, else None; else the file named."""
    if spec in ("", "none"):
        return None
    path = Path(out) / "last.pt" if spec == "auto" else Path(spec)
    if spec == "auto" and not path.exists():
        return None
    return path


# Settings a resume may change: where things are and how the run is driven, never what is trained or how.
# --iters may change too (a run is extended or shortened; the poly schedule then runs to the new end).
NOT_SHAPING = {
    "model": {"teacher_ckpt", "pretrained_backbone"},
    "data": {"data_root", "workers", "loader", "skip_bad_samples", "val_size", "val_split", "val_resize",
             "val_resize_side"},
    "method": set(),
    "optim": {"iters"},
    "run": {"recipe", "dry_run", "out", "resume", "log_interval", "eval_interval", "ckpt_interval", "keep_ckpts", "teacher_iters",
            "baseline", "channels_last", "compile", "optim_impl", "teacher_cuda_graph", "profile", "profile_warmup",
            "sliding", "device", "cache_dir"},
}


def check_resumable(ckpt, path, cfg, num_classes):
    """Refuse a checkpoint whose run differs from this one in anything that shapes the model or the optimisation:
    first another student, method, dataset or class count, then every other such flag, all listed."""
    from engine.config import SECTIONS, Config

    want = {"model": cfg.model.student, "method": cfg.method.method, "dataset": cfg.data.dataset,
            "num_classes": num_classes}
    have = {"model": ckpt["arch"], "method": ckpt["config"]["method"]["method"],
            "dataset": ckpt["config"]["data"]["dataset"], "num_classes": ckpt["num_classes"]}
    for key in want:
        if want[key] != have[key]:
            raise ValueError(f"cannot resume from {path}: it is a checkpoint of {key} {have[key]!r}, this run "
                             f"trains {key} {want[key]!r} (choose another --out, or --resume none)")
    saved = Config.from_dict(ckpt["config"])
    differ = []
    for section in SECTIONS:
        for name, value in vars(getattr(cfg, section)).items():
            old = getattr(getattr(saved, section), name)
            if name not in NOT_SHAPING[section] and value != old:
                differ.append(f"--{name.replace('_', '-')} {_shown(value)} (the checkpoint's: {_shown(old)})")
    if differ:
        raise ValueError(f"cannot resume from {path}: this run differs from it in {'; '.join(differ)}. Resume "
                         "with the checkpoint's values, choose another --out, or --resume none to start over")
    if cfg.optim.iters < ckpt["iteration"]:
        raise ValueError(f"cannot resume from {path}: it is at iteration {ckpt['iteration']}, past --iters "
                         f"{cfg.optim.iters} (give --iters {ckpt['iteration']} or more, or --resume none)")


def _shown(value):
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return repr(value) if value == "" else str(value)


def restore(step, ckpt, path, method_spec):
    """Load a checkpoint's state into the parts of `step` -> (iteration to continue from, every rank's RNG
    states as saved)."""
    step.student.load_state_dict(ckpt["model"])
    step.method.load_state_dict(ckpt["method_state"])
    step.optimizer.load_state_dict(ckpt["optimizer"])
    for opt, state in zip(step.method_optimizers, ckpt["method_optimizers"]):
        opt.load_state_dict(state)
    if step.scaler is not None and ckpt.get("scaler"):
        step.scaler.load_state_dict(ckpt["scaler"])
    if step.source is not None:
        if "source" not in ckpt:
            raise ValueError(f"cannot resume from {path}: it has no state of the training source of "
                             f"--method {method_spec}")
        step.source.load_state_dict(ckpt["source"])
    return ckpt["iteration"], ckpt["rng"]


def nonfinite_tensors(state):
    """Names of the floating-point tensors of a (nested) state dict that hold a NaN or an infinity; one host
    sync for the whole dict."""
    named = []

    def walk(obj, name):
        if torch.is_tensor(obj):
            if obj.is_floating_point():
                named.append((name, obj))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}.{i}" if name else str(i))

    walk(state, "")
    finite = {}
    for device in {t.device for _, t in named}:  # one stack per device, one host sync each
        on = [i for i, (_, t) in enumerate(named) if t.device == device]
        flags = torch.stack([torch.isfinite(named[i][1]).all() for i in on]).tolist()
        finite.update(zip(on, flags))
    return [name for i, (name, _) in enumerate(named) if not finite[i]]


def describe_names(names, most=5):
    shown = ", ".join(names[:most])
    return f"{len(names)} tensor(s): {shown}" + (", ..." if len(names) > most else "")


def load_model(path):
    """(the student of a segkd checkpoint in eval mode, the checkpoint) for evaluate.py, export.py and compare.py:
    one clear error for a file that is not a checkpoint, holds non-finite weights or does not fit its arch."""
    from engine.models import build_model, without_aux

    ckpt = load_checkpoint(path)
    bad = nonfinite_tensors(ckpt["model"])
    if bad:
        raise ValueError(f"checkpoint {path} holds non-finite weights ({describe_names(bad)}): it cannot be used; "
                         "take an earlier checkpoint")
    model = build_model(ckpt["arch"], ckpt["num_classes"])
    try:
        model.load_state_dict(without_aux(ckpt["model"]))  # the auxiliary head (--aux-weight) is training-only
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit its architecture {ckpt['arch']!r}: {e}") from e
    return model.eval(), ckpt


def rng_state():
    """RNG states of this process (torch CPU, CUDA, numpy, python), as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
