"""One training step as one object: the trainer's loop, --profile and every benchmark call the same TrainStep.

    step = TrainStep.build(distiller, teacher, device, optim=cfg.optim, ...)
    terms = step(batch, iteration)              # {term: detached scalar on the device}; no host sync

A step is: the learning rate of `iteration` (--schedule: poly or step); the frozen teacher's forward (engine/teacher.py); the
student's forward and the method's loss terms (Distiller, the module DDP wraps); one backward of their sum;
every optimizer (the student's SGD with the method's connectors, then the method's own); then the training
source's own update, if the method brings one (dfad's generator step). The step never reads the clock
itself: the caller passes one (engine/profile.py) and the step marks its phases on it.
"""
import inspect

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from engine.compile import compile_backend
from engine.methods import segmentation_ce
from engine.optim import build_sgd, lr_factor, student_groups
from engine.precision import autocast, grad_scaler, precision_name
from engine.profile import NULL_CLOCK
from engine.teacher import TeacherForward

DDP_ARGS = inspect.signature(DDP.__init__).parameters


class Distiller(nn.Module):
    """Student + method parts: the trainable whole that DDP wraps, so one gradient all-reduce covers both."""

    def __init__(self, student, method, ignore_index=255, aux_weight=0.0):
        super().__init__()
        self.student = student
        self.method = method
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight        # --aux-weight: of the auxiliary head's cross-entropy

    def forward(self, images, teacher_out, batch, clock=NULL_CLOCK):
        """-> (student SegOutput, {term name: weighted scalar}); 'ce' when the batch carries labels, and 'aux'
        (aux_weight x the auxiliary head's cross-entropy) when the student has an auxiliary head too."""
        clock.begin("student forward")
        s = self.student(images)
        clock.begin("loss")
        terms = {}
        if batch.get("label") is not None:
            terms["ce"] = segmentation_ce(s.logits, batch["label"], self.ignore_index)
            if s.aux is not None:
                terms["aux"] = self.aux_weight * segmentation_ce(s.aux, batch["label"], self.ignore_index)
        terms.update(self.method(s, teacher_out, batch))
        return s, terms


def wrap_ddp(distiller, device, local_rank):
    """DDP over the distiller. static_graph: every method gives gradients to the same parameters at every step,
    so DDP reuses its bucket order and never searches for unused parameters. No BN buffer broadcast at every
    forward: each rank's running statistics follow its own batches, rank 0's are the ones saved, and every rank
    gets them before an evaluation (Trainer.sync_buffers)."""
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in DDP_ARGS
                      else {"broadcast_buffers": False})  # the newer name of the same switch
    return DDP(distiller, device_ids=[local_rank] if device.type == "cuda" else None, gradient_as_bucket_view=True,
               static_graph=True, **no_buffer_sync)


def describe(dtype, channels_last, optim_impl, compiled, teacher_graph, distributed):
    """The one line at the start of every run that says how its step runs."""
    parts = [f"precision {precision_name(dtype)}", f"channels-last {'on' if channels_last else 'off'}",
             f"SGD {optim_impl}", f"compile {'on' if compiled else 'off'}"]
    if teacher_graph:
        parts.append("teacher CUDA graph")
    if distributed:
        parts.append("DDP static_graph on")
    return "step: " + ", ".join(parts)


class TrainStep:
    """One iteration of distillation (or of the student alone): `step(batch, iteration, clock) -> terms`.

    batch: a dict already on the device (engine/prefetch.py), "image" [B, 3, H, W] and, from the labelled
    loader, "label" [B, H, W]. Returns the detached loss terms (float32 scalars on the device) followed by the
    source's logged values; `loss_names` lists the ones whose sum was the loss (the rest are only logged).
    """

    def __init__(self, model, distiller, teacher, optimizer, method_optimizers, scaler, dtype, device, optim,
                 source=None, optim_impl="", description=""):
        self.model = model                  # the distiller, or its DDP wrapper: what the forward runs through
        self.distiller = distiller          # the bare Distiller: student + method
        self.teacher = teacher              # TeacherForward, or None for methods without a teacher
        self.optimizer = optimizer          # the student's SGD (student + the method's connectors)
        self.method_optimizers = method_optimizers
        self.scaler = scaler                # GradScaler with fp16, else None
        self.dtype, self.device = dtype, device
        self.optim = optim                  # OptimConfig: iterations and the schedule
        self.iters = optim.iters
        self.source = source                # the method's TrainSource, or None
        self.optim_impl = optim_impl        # the resolved --optim-impl
        self.description = description      # describe(...) of this step
        self.loss_names = ()
        self.scheduled = [optimizer]        # the optimizers whose lr follows --schedule (build adds the source's)

    @property
    def student(self):
        return self.distiller.student

    @property
    def method(self):
        return self.distiller.method

    @classmethod
    def build(cls, distiller, teacher, device, *, optim, dtype=None, channels_last=False, compile=False,
              optim_impl="auto", teacher_cuda_graph=False, distributed=False, local_rank=0, source=None):
        """The step of a distiller already on `device`. teacher: the Frozen teacher or None; optim: OptimConfig
        (lr, momentum, weight decay, iterations, poly power), overridden by the source's `student_optim`."""
        teacher_forward = (TeacherForward(teacher, device, dtype, channels_last, compile, teacher_cuda_graph)
                           if teacher is not None else None)
        if teacher_cuda_graph and teacher is None:
            raise ValueError("--teacher-cuda-graph: the method has no teacher (it distils from none)")
        if compile:
            distiller.student.compile(backend=compile_backend())  # in place: state_dict keys are unchanged
        model = wrap_ddp(distiller, device, local_rank) if distributed else distiller
        hyper = {"lr": optim.lr, "momentum": optim.momentum, "weight_decay": optim.weight_decay}
        hyper.update(source.student_optim if source is not None else {})
        groups = student_groups(distiller.student, distiller.method.param_groups(), optim.head_lr_mult)
        for g in groups:
            g["lr"] = hyper["lr"] * g["lr_mult"]
        optimizer, impl = build_sgd(groups, hyper, optim_impl, device)
        scheduled = [optimizer, *(source.scheduled if source is not None and optim.schedule == "step" else ())]
        for opt in scheduled:
            for g in opt.param_groups:
                g["initial_lr"] = g["lr"]
        text = describe(dtype, channels_last, impl, compile, teacher_cuda_graph, distributed)
        step = cls(model, distiller, teacher_forward, optimizer, distiller.method.optimizers(),
                   grad_scaler(dtype, device), dtype, device, optim, source, impl, text)
        step.scheduled = scheduled
        return step

    def __call__(self, batch, iteration, clock=NULL_CLOCK):
        factor = lr_factor(self.optim, iteration, self.iters)
        for opt in self.scheduled:
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * factor
        self.method.start_iteration(iteration, self.iters)
        images = batch["image"]
        teacher_out = None
        if self.teacher is not None:
            clock.begin("teacher forward")
            teacher_out = self.teacher(images)
        with autocast(self.device, self.dtype):
            _, terms = self.model(images, teacher_out, batch, clock)   # student forward, then the loss terms
        loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        for opt in self.method_optimizers:
            opt.zero_grad(set_to_none=True)
        clock.begin("backward")
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        clock.begin("optimizer")
        for opt in [self.optimizer, *self.method_optimizers]:
            if self.scaler is not None:
                self.scaler.step(opt)  # unscales first; skips the step when a gradient overflowed
            else:
                opt.step()
        if self.scaler is not None:
            self.scaler.update()
        out = {k: v.detach().float() for k, v in terms.items()}
        self.loss_names = tuple(out)
        if self.source is not None:
            clock.begin(self.source.phase)
            out.update(self.source.after_step(iteration))
        return out
