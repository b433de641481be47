"""The training run: build the models and the step, loop over iterations, evaluate, save.

One Trainer for every method: a method only contributes named loss terms, parameter groups and, where it
trains a part apart, its own optimizers; a data-free method also supplies its training inputs and an update
of its own after each step through a TrainSource (engine/methods/base.py). One iteration is one call of the
TrainStep (engine/step.py); the checkpoint layout is engine/checkpoint.py's; the loss terms are accumulated
and checked for non-finite values by engine/meter.py. Rank 0 alone logs and saves. The only host syncs of the
loop are at the log interval, before a checkpoint and at evaluation.
"""
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from engine import checkpoint, dist
from engine.config import cache_dir, validate
from engine.errors import NonFiniteError, SegkdError
from engine.data import build_dataset, build_train_loader, build_val_loader
from engine.evaluate import evaluate, format_iou
from engine.memory_format import resolve_channels_last
from engine.meter import TermMeter
from engine.methods import SourceContext, build_method, method_needs_teacher, parse_method
from engine.models import build_model, load_pretrained_backbone
from engine.precision import resolve_precision
from engine.prefetch import DevicePrefetcher
from engine.step import Distiller, TrainStep
from engine.teacher import Frozen, load_teacher


class Trainer:
    def __init__(self, cfg, env, echo=print):
        self.cfg, self.env = cfg, env
        self.echo = echo if env.is_main else (lambda *a, **k: None)
        self.out = Path(cfg.run.out)
        validate(cfg)
        dev, r, d = env.device, cfg.run, cfg.data
        torch.manual_seed(r.seed)
        self.dtype = resolve_precision(r.precision, dev)
        self.channels_last = resolve_channels_last(r.channels_last, dev)
        if r.profile < 0 or r.profile_warmup < 0:
            raise ValueError(f"--profile and --profile-warmup must be >= 0, got {r.profile} and {r.profile_warmup}")

        self.train_set = build_dataset(d.dataset, "train", root=d.data_root, train=True, crop=d.crop,
                                       scale=(d.scale_min, d.scale_max), flip=d.flip, rotate=d.rotate,
                                       seed=r.seed, skip_bad=d.skip_bad_samples)
        try:
            self.val_set = build_dataset(d.dataset, d.val_split, root=d.data_root, train=False,
                                         skip_bad=d.skip_bad_samples)
        except ValueError as err:  # the dataset names its splits; say which flag chose this one
            raise ValueError(f"--val-split {d.val_split!r}: {err}") from None
        self.val_set.eval_resize, self.val_set.eval_resize_side = d.val_resize, d.val_resize_side
        val_items = (torch.utils.data.Subset(self.val_set, range(min(d.val_size, len(self.val_set))))
                     if d.val_size else self.val_set)
        k, ignore = self.train_set.num_classes, self.train_set.ignore_index
        self.num_classes, self.ignore_index = k, ignore

        parse_method(cfg.method.method)  # unknown names fail before any model is built
        student = build_model(cfg.model.student, k, aux=cfg.model.aux_weight > 0)
        if cfg.model.pretrained_backbone:
            load_pretrained_backbone(student, cfg.model.pretrained_backbone)
        self.teacher, self.teacher_arch = None, None
        if method_needs_teacher(cfg.method.method):
            if not cfg.model.teacher_ckpt:
                raise ValueError(f"--method {cfg.method.method} needs a teacher: give --teacher-ckpt")
            teacher, self.teacher_arch = load_teacher(cfg.model.teacher_ckpt, cfg.model.teacher, k, d.dataset)
            self.teacher = Frozen(teacher).to(dev)
        method = build_method(cfg.method, student.channels,
                              self.teacher.channels if self.teacher else student.channels, k, ignore)

        distiller = Distiller(student, method, ignore, cfg.model.aux_weight)
        if cfg.model.sync_bn and env.distributed and dev.type != "cuda":
            raise ValueError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm has no CPU implementation "
                             "(drop the flag for gloo runs on CPU)")
        if cfg.model.sync_bn and env.distributed:
            distiller = nn.SyncBatchNorm.convert_sync_batchnorm(distiller)
        self.distiller = distiller.to(dev)
        if self.channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        self.student = self.distiller.student
        # built before the step's teacher forward: a source may score images with the bare teacher
        self.source = method.train_source(SourceContext(cfg, env, self.teacher, self.student, self.out, self.echo,
                                                        self.dtype, cache_dir(cfg)))
        self.step = TrainStep.build(self.distiller, self.teacher, dev, optim=cfg.optim, dtype=self.dtype,
                                    channels_last=self.channels_last, compile=r.compile, optim_impl=r.optim_impl,
                                    teacher_cuda_graph=r.teacher_cuda_graph, distributed=env.distributed,
                                    local_rank=env.local_rank, source=self.source)
        self.echo(self.step.description)

        # long-side resizing scores each image at its label's size: one image a batch, none padded beside another
        val_batch = 1 if d.val_resize and d.val_resize_side == "long" else d.batch_size
        self.val_loader = build_val_loader(val_items, val_batch, workers=d.workers, rank=env.rank,
                                           world_size=env.world_size, device=env.device,
                                           loader="torch" if d.val_resize else d.loader)  # DALI's graph: no resize
        self.start_iter, self.rng_to_restore = 0, None
        self._resume()
        torch.manual_seed(r.seed + 1000 + env.rank)  # dropout differs per rank, reproducibly
        self.step.model.train()

    # ---------------------------------------------------------------- checkpoints
    def _resume(self):
        path = checkpoint.resume_path(self.cfg.run.resume, self.out)
        if path is None:
            return
        ckpt = checkpoint.load_checkpoint(path)
        checkpoint.check_resumable(ckpt, path, self.cfg, self.num_classes)
        self.start_iter, rngs = checkpoint.restore(self.step, ckpt, path, self.cfg.method.method)
        self.rng_to_restore = rngs[self.env.rank] if len(rngs) == self.env.world_size else None
        if self.rng_to_restore is None:
            self.echo(f"note: {path} was written by {len(rngs)} processes, this run has {self.env.world_size}: "
                      "weights and data position resume exactly, random streams (dropout) do not")
        self.echo(f"resuming from {path} at iteration {self.start_iter}")

    def save(self, iteration, complete=False, metrics=None):
        """All ranks call (RNG states are gathered); rank 0 writes the checkpoint (engine/checkpoint.py), unless a
        weight or buffer has gone non-finite (BatchNorm statistics do one step before the loss): then no rank
        writes and the run stops, so that last.pt stays the last good state."""
        rngs = dist.all_gather_object(checkpoint.rng_state())
        error = None
        if self.env.is_main:
            try:
                bad = checkpoint.nonfinite_tensors({"student": self.student.state_dict(),
                                                    "method": self.step.method.state_dict()})
                if bad:
                    raise NonFiniteError(
                        f"non-finite weights or statistics at iteration {iteration} "
                        f"({checkpoint.describe_names(bad)}): no checkpoint written, training stopped; "
                        f"{checkpoint.kept_note(self.out)}. Try a lower --lr, check the data, or run with "
                        "--precision fp32.")
                ckpt = checkpoint.run_state(self.step, self.cfg, iteration=iteration, num_classes=self.num_classes,
                                            class_names=self.train_set.class_names, rngs=rngs, complete=complete,
                                            metrics=metrics)
                checkpoint.write_run_checkpoint(ckpt, self.out, self.cfg.run.keep_ckpts)
            except SegkdError as e:  # every rank stops with the same error; none waits for rank 0 in a collective
                error = e
        error = dist.broadcast_object(error)
        if error is not None:
            raise error

    # ---------------------------------------------------------------- the step's inputs
    def batches(self, start_iter):
        """The training batches from iteration `start_iter` on, one ahead and already on the device: the
        source's (data-free methods) or the labelled loader's."""
        cfg, env = self.cfg, self.env
        if self.source is not None:
            batches = self.source.batches(start_iter)
        else:
            batches = iter(build_train_loader(self.train_set, cfg.data.batch_size, workers=cfg.data.workers,
                                              seed=cfg.run.seed, rank=env.rank, world_size=env.world_size,
                                              start_iter=start_iter, loader=cfg.data.loader, device=env.device))
        ahead = self.source is None or self.source.prefetch
        return DevicePrefetcher(batches, env.device, self.channels_last, ahead)

    # ---------------------------------------------------------------- evaluation
    def sync_buffers(self):
        """Give every rank rank 0's BatchNorm statistics. DDP does not sync buffers at each forward here
        (engine/step.py: wrap_ddp), so each rank's running statistics follow its own batches; evaluating without
        this would let the ranks score slightly different models."""
        if self.env.distributed:
            for buf in self.distiller.buffers():
                torch.distributed.broadcast(buf, 0)

    def evaluate(self, model=None):
        model = model if model is not None else self.student
        self.sync_buffers()
        return evaluate(model, self.val_loader, self.num_classes, self.env.device, ignore_index=self.ignore_index,
                        sliding=self.cfg.run.sliding, window=self.cfg.data.crop, dtype=self.dtype)

    # ---------------------------------------------------------------- the loop
    def fit(self):
        cfg, env = self.cfg, self.env
        iters = cfg.optim.iters
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(cfg.dumps())
        it = self.start_iter
        log_path = self.out / "log.jsonl"
        if env.is_main:
            self._truncate_log(log_path, it, final_again=it >= iters)
        if it < iters:
            batches = self.batches(it)  # before the RNG restore: a DataLoader iterator draws a seed from it
            if self.rng_to_restore is not None:
                checkpoint.set_rng_state(self.rng_to_restore)
            self.step.model.train()
            self.echo(f"training {cfg.model.student} with --method {cfg.method.method} on {cfg.data.dataset}: "
                      f"iterations {it}..{iters}, {cfg.data.batch_size} images x {env.world_size} process(es), "
                      f"run directory {self.out}")
        bar = tqdm(total=iters, initial=it, disable=not env.is_main, dynamic_ncols=True, desc="train")
        meter = TermMeter(env.device, it)
        images, t_last = 0, time.perf_counter()
        try:  # the bar is closed before any error is reported, so that the error is the last line
            while it < iters:
                batch = next(batches)
                meter.add(self.step(batch, it))
                images += batch["image"].shape[0]
                it += 1
                bar.update(1)
                at_log = it % cfg.run.log_interval == 0 or it == iters
                at_ckpt = cfg.run.ckpt_interval and it % cfg.run.ckpt_interval == 0 and it < iters
                if at_log or at_ckpt:
                    now = time.perf_counter()
                    record = meter.reduce(self.step.loss_names, env.world_size, self.out)
                    rate = images / max(now - t_last, 1e-9)
                    record.update(kind="train", iter=it, lr=self.step.optimizer.param_groups[0]["lr"],
                                  img_s=rate * env.world_size, img_s_per_process=rate)
                    self._log(log_path, record)
                    bar.set_postfix_str(f"loss {record['loss']:.3f} lr {record['lr']:.2e} "
                                        f"{record['img_s']:.0f} img/s")
                    images, t_last = 0, time.perf_counter()
                if cfg.run.eval_interval and it % cfg.run.eval_interval == 0 and it < iters:
                    self._record_eval(log_path, it, self.evaluate())
                    t_last = time.perf_counter()
                if at_ckpt:
                    self.save(it)
                    t_last = time.perf_counter()
        finally:
            bar.close()
        return self._finish(log_path)

    def _finish(self, log_path):
        """Final evaluation, the complete checkpoint, results.json and the pictures -> the run's result."""
        cfg, env, iters = self.cfg, self.env, self.cfg.optim.iters
        final = self.evaluate()
        self._record_eval(log_path, iters, final)
        if self.start_iter < iters:
            self.save(iters, complete=True, metrics=final)
        result = {"miou": final["miou"], "iou": final["iou"], "acc": final["acc"],
                  "class_names": list(self.val_set.class_names), "student": cfg.model.student,
                  "method": cfg.method.method, "dataset": cfg.data.dataset, "iterations": iters,
                  "run_dir": str(self.out)}
        skip_log = getattr(self.train_set, "skip_log", None)
        if skip_log is not None:  # --skip-bad-samples: the total over all ranks
            skipped = int(dist.all_reduce_sum(torch.tensor([skip_log.count()], device=env.device)).item())
            result["skipped_files"] = skipped
            self.echo(f"--skip-bad-samples: {skipped} unreadable training file(s) skipped "
                      f"(rank 0's list: {skip_log.path})")
        if self.teacher is not None:
            result["teacher"] = self.teacher_arch
            result["teacher_miou"] = self.evaluate(self.teacher.model)["miou"]
        if env.is_main:
            self.echo(format_iou(final, self.val_set.class_names,
                                 f"{cfg.model.student} + {cfg.method.method} on {cfg.data.dataset} "
                                 f"{cfg.data.val_split}:"))
            (self.out / "results.json").write_text(json.dumps(result, indent=2))
            self.pictures()
        dist.barrier()
        return result

    @staticmethod
    def _truncate_log(path, start_iter, final_again):
        """A run logs from start_iter on: drop the records a killed run wrote after its last checkpoint (all of
        them when it starts from 0; when a complete run is reported again, its final evaluation), so no
        iteration appears twice."""
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if record.get("iter", 0) < start_iter or (record.get("iter") == start_iter and not (
                    final_again and record.get("kind") == "eval")):
                kept.append(line)
        checkpoint.write_text_atomic(path, "".join(line + "\n" for line in kept))

    def _log(self, path, record):
        if self.env.is_main:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _record_eval(self, path, it, result):
        record = {"kind": "eval", "iter": it, "miou": result["miou"], "acc": result["acc"],
                  "iou": dict(zip(self.val_set.class_names, result["iou"]))}
        self._log(path, record)
        self.echo(f"iteration {it}: {self.cfg.data.val_split} mIoU {100 * result['miou']:.1f}")

    def pictures(self):
        """curves.png and samples.png in the run directory (engine/plots.py)."""
        from engine.plots import plot_run

        cfg = self.cfg
        plot_run(self.out, f"{cfg.model.student} + {cfg.method.method} on {cfg.data.dataset}", self.student,
                 self.teacher.model if self.teacher is not None else None, self.val_set, self.env.device)

    # ---------------------------------------------------------------- what --profile prints with its table
    def profile_title(self):
        cfg = self.cfg
        return (f"profile: {cfg.model.student} + {cfg.method.method} on {cfg.data.dataset}, "
                f"teacher {cfg.model.teacher if self.teacher is not None else '-'}, {self.step.description}")

    def profile_notes(self):
        return self.source.profile_notes() if self.source is not None else {}
