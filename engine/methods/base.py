"""What every distillation method shares: the constructor, the loss-term contract, the connector.

A method is a small nn.Module. Given the student's and the teacher's outputs (SegOutput: backbone, decoder,
logits) and the batch, `forward` returns a dict of named, already-weighted loss terms; the trainer adds them
to the student's cross-entropy and never looks inside. A method owns its extra trainable parts (connectors,
projectors): by default they join the student's SGD; a part with its own optimizer is listed by
`optimizers()` and left out of `param_groups()`.

A data-free method (dfad, dfss) also brings its training inputs: `train_source(ctx)` returns a TrainSource
that replaces the labelled loader and may run an update of its own after each student step (a generator
step). The trainer treats every source alike; see TrainSource.

A method's settings are a small dataclass in its own module (`settings = KDSettings`, say); every method's
fields, after the shared ones below, make up the run's MethodConfig (engine/methods/__init__.py), from which
the flags and the README's CLI table are generated. A method reads them from the MethodConfig it is given.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn
import torch.nn.functional as F

import kernels
from engine.settings import positive, setting

POSITIONS = ("backbone", "decoder", "logits")
KD_UNITS = ("element", "pixel")


@dataclass
class SharedSettings:
    """The settings every method may read, first in MethodConfig."""
    method: str = setting("cad", "distillation method, or several joined by '+' (e.g. cad+kd); 'none' trains with "
                                 "CE only")
    position: str = setting("", "where feature methods distil: backbone|decoder|logits (empty: the method's "
                                "default)")
    temperature: float = setting(1.0, "softmax temperature T of the per-pixel KD term (kd, and the KD term of "
                                      "lad/cad/pad/apd)", check=positive)


@dataclass
class SourceContext:
    """What a method's TrainSource may use: the run's settings and the two networks, nothing of the trainer."""
    cfg: Any            # the whole engine.config.Config (a method's own settings: cfg.method)
    env: Any            # engine.dist.DistEnv: rank, world size, device
    teacher: Any        # the Frozen teacher (None for methods without one); `teacher.model` runs with autograd
    student: nn.Module  # the bare student (not the DDP wrapper), already on env.device
    out: Any            # the run directory (pathlib.Path); may not exist yet
    echo: Callable      # print on rank 0, silent elsewhere
    dtype: Any = None   # autocast dtype of the training step (torch.bfloat16 / float16), None for fp32
    cache_dir: Path = None  # where results reusable across runs may be cached (--cache-dir)


class TrainSource:
    """Training inputs a method supplies instead of the labelled loader (generated images, a selected pool).

    The trainer calls, in this order:
      `student_optim`        read once when the student's SGD is built: overrides of lr / momentum / weight_decay
      `scheduled`            the source's optimizers whose lr follows the student's under --schedule step (dfad's
                             generator, as DFAD's --scheduler decays both); with poly they keep their lr
      `load_state_dict(s)`   when resuming, with what `state_dict()` returned into the checkpoint
      `batches(start_iter)`  once per fit: an iterator whose n-th item is the batch of iteration start_iter + n,
                             a dict with at least "image" [B, 3, H, W] in the teacher's normalised input space
                             (no "label": the student gets no cross-entropy). Create any DataLoader iterator
                             before returning (it draws from the global RNG that a resume restores afterwards).
      `after_step(it)`       after the student's step of iteration `it`: an extra update of the source's own;
                             returns {name: detached scalar}, the same names every iteration, which are logged
                             next to the loss terms but are not part of the student's loss
      `state_dict()`         at every checkpoint (plain tensors and Python values)
      `profile_notes()`      with --profile: {label: text} printed under the phase table (e.g. scoring speed)
    --profile times `batches` as the phase "data" and `after_step` as the phase named by `phase`.
    """

    phase = "source step"
    prefetch = False  # True when batch n+1 does not depend on after_step(n): the trainer may fetch it early

    student_optim = {}
    scheduled = ()

    def batches(self, start_iter):
        raise NotImplementedError

    def after_step(self, it):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def profile_notes(self):
        return {}


class Method(nn.Module):
    """Every method gives gradients to the same parameters at every step (DDP runs with static_graph)."""

    settings = None     # the method's own settings dataclass (None: it has none)
    needs_teacher = True
    default_position = "logits"
    positioned = False  # True for methods that honour --position

    def __init__(self, cfg, student_channels, teacher_channels, num_classes, ignore_index=255):
        """cfg: MethodConfig; *_channels: the models' `channels` dicts ({"backbone": C, "decoder": C, "logits": K})."""
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.position = (cfg.position or self.default_position) if self.positioned else self.default_position
        if self.position not in POSITIONS:
            raise ValueError(f"--position {self.position!r} is not one of {', '.join(POSITIONS)}")
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels

    def forward(self, s, t, batch):
        """s, t: SegOutput of student and teacher (t is None when needs_teacher is False). -> {term: scalar}."""
        return {}

    def start_iteration(self, iteration, total_iters):
        """Called by the trainer before each step (for methods whose loss follows a schedule)."""

    def param_groups(self):
        """Extra parameter groups for the student's SGD (connectors and the like)."""
        own = {id(p) for m in self.separately_trained() for p in m.parameters()}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in own]
        return [{"params": params}] if params else []

    def separately_trained(self):
        """Sub-modules trained by the method's own optimizers, hence left out of param_groups()."""
        return []

    def optimizers(self):
        """New optimizers for separately_trained() parts; the trainer builds them once and steps them every
        iteration after the student's, and saves their state in checkpoints."""
        return []

    def train_source(self, ctx):
        """A TrainSource replacing the labelled training loader, or None (the default) to train on it."""
        return None

    def features(self, out):
        return getattr(out, self.position)


def connector(c_in, c_out):
    """1x1 conv + BN + ReLU mapping student channels to the teacher's (FitNets-style regressor)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class FeatureMethod(Method):
    """A method that compares student and teacher features at --position, through a connector when the
    channel counts differ (and a bilinear resize when the spatial sizes do)."""

    positioned = True
    default_position = "backbone"

    def __init__(self, cfg, student_channels, teacher_channels, num_classes, ignore_index=255):
        super().__init__(cfg, student_channels, teacher_channels, num_classes, ignore_index)
        c_s, c_t = student_channels[self.position], teacher_channels[self.position]
        self.connector = connector(c_s, c_t) if c_s != c_t else nn.Identity()

    def pair(self, s, t):
        """-> (student feature mapped to the teacher's shape, teacher feature)."""
        fs, ft = self.connector(self.features(s)), self.features(t)
        if fs.shape[-2:] != ft.shape[-2:]:
            fs = F.interpolate(fs, size=ft.shape[-2:], mode="bilinear", align_corners=False)
        return fs, ft


def logit_kd(s_logits, t_logits, temperature, unit, weight=1.0):
    """The per-pixel KD term of a method, in `unit`, times `weight` (the method's lambda_kd, applied inside
    kernels.pixel_kl so that its backward does not rescale the gradient):

        pixel:   T^2 * sum_{b,h,w} KL(softmax(z_t/T) || softmax(z_s/T)) / (B*H*W)      (kernels.pixel_kl)
        element: the same / C, i.e. divided by B*C*H*W

    `pixel` is CIRKD's CriterionKD (F.kl_div(..., 'batchmean') over the [B*H*W, C] permuted logits). `element`
    is torch.nn.KLDivLoss()'s default reduction, an element mean over B*C*H*W, which is what the code behind
    the CWD, APD and angular papers' tables takes (TorchDistiller SemSeg-distill utils/criterion.py
    CriterionKD; APD tool/train.py CriterionKD), so their lambda_kd = 10 is C times weaker in `pixel` units
    (11x on CamVid, 19x on Cityscapes, 150x on ADE20K). See bench/results/angular_camvid_cpu.md.
    """
    return kernels.pixel_kl(s_logits, t_logits, temperature,
                            scale=weight / s_logits.shape[1] if unit == "element" else weight)


def labels_at(labels, size):
    """Nearest-neighbour downsampling of [B, H, W] labels to `size` (no new label values)."""
    if labels.shape[-2:] == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def segmentation_ce(logits, labels, ignore_index=255):
    """Pixel-mean cross-entropy of feature-resolution logits upsampled (bilinear, align_corners=False) to the label
    size: mean over the valid pixels (labels in [0, K), not ignore_index); 0 (not NaN) when none is valid.

    kernels.upsampled_cross_entropy: on the fused path the full-resolution logits are never built (interpolated on
    the fly, fp32 whatever the logits' dtype); on the CPU its torch reference, F.interpolate + F.cross_entropy.
    """
    return kernels.upsampled_cross_entropy(logits, labels, ignore_index)


class NoDistillation(Method):
    """`none`: cross-entropy only (the student alone, and how teachers are trained)."""

    needs_teacher = False
