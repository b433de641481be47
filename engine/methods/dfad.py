"""`dfad`: Data-Free Adversarial Distillation (Fang et al., arXiv 1912.11006; the authors' CamVid code).

A generator G (engine/datafree/generator.py) plays against the student S; the teacher T is frozen in eval mode.

    student step (every iteration):   x = G(z).detach(), z ~ N(0, I)     L_S = mean |S(x) - T(x)|         (L1)
    generator step (every k-th):      x = G(z'), fresh z'                L_G = -log(1 + mean |S(x) - T(x)|)
                                                                              + bn_weight * R_BN(T; x)  (optional)

L1 is the mean over the logits' elements at feature resolution (the logits every segkd model returns;
DFAD's code compares the logits upsampled to the input size, which averages the same values). R_BN is
DeepInversion's batch-statistics prior over the teacher's BN layers with a larger weight on the first
(engine/datafree/bn_hooks.py). The generator minimises L_G, i.e. climbs the discrepancy: the student is
trained where it disagrees with the teacher most.

One `--iters` iteration is one student step on a fresh generated batch; after iterations k-1, 2k-1, ...
(every k-th) comes one generator step, so --iters 5000 with k = 5 is 1000 DFAD rounds. The schedule and the
step count follow student steps. Defaults (DFAD's): k = 5, batch 64, student SGD lr 0.1, momentum 0.9, weight
decay 5e-4, generator Adam lr 1e-3, nz = 256, S = 128. The schedule: DFAD's code keeps both learning rates
constant without its --scheduler and, with it (the README's commands), multiplies both by 0.1 after 100 and 200
of its 300 epochs; segkd's --schedule step --step-parts 3 does the same to both (the `dfad_camvid` recipe),
its default poly schedule decays the student's alone and leaves the generator's constant.

Each student step's latent is drawn from a generator seeded by (seed, rank, iteration), so a resumed run
replays the same latents; the checkpoint carries G, its BN statistics and its Adam state. Under DDP every
rank generates its own batch and the generator's gradients are averaged over the ranks.
"""
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine import dist
from engine.datafree.bn_hooks import batch_prior, bn_inputs
from engine.datafree.generator import Generator
from engine.methods.base import Method, TrainSource
from engine.precision import autocast
from engine.settings import at_least, parse_size, positive, setting

STUDENT_STREAM, GENERATOR_STREAM = 0, 1


@dataclass
class DFADSettings:
    """Where dfad's training inputs come from (docs/datafree.md)."""
    gen_nz: int = setting(256, "dfad: size nz of the generator's latent z ~ N(0, 1)", check=at_least(1))
    gen_size: tuple = setting((128, 128), "dfad: generated image HEIGHT,WIDTH, multiples of 16 (replaces --crop in "
                                          "training)", parse=parse_size)
    gen_batch: int = setting(64, "dfad: generated images per student step and per generator step, per process "
                                 "(replaces --batch-size in training)", check=at_least(2))
    gen_every: int = setting(5, "dfad: k, student steps (iterations) per generator step", check=at_least(1))
    gen_lr: float = setting(1e-3, "dfad: Adam learning rate of the generator (constant; decayed with the "
                                  "student's under --schedule step)", check=positive)
    dfad_lr: float = setting(0.1, "dfad: student SGD learning rate (replaces --lr; --schedule applies, --poly-power "
                                  "0 keeps it constant as DFAD's code does without its --scheduler)", check=positive)
    dfad_weight_decay: float = setting(5e-4, "dfad: student SGD weight decay (replaces --weight-decay)",
                                       check=at_least(0))
    bn_weight: float = setting(0.0, "dfad: weight of the DeepInversion BN-statistics term in the generator loss "
                                    "(0: off)", check=at_least(0))
    bn_first_weight: float = setting(10.0, "dfad: multiplier of the first teacher BN layer in that term "
                                           "(DeepInversion: 10)", check=at_least(0))


class DFAD(Method):
    settings = DFADSettings

    def forward(self, s, t, batch):
        return {"l1": F.l1_loss(s.logits.float(), t.logits.float())}

    def train_source(self, ctx):
        return GeneratorSource(ctx)


class GeneratorSource(TrainSource):
    """Generated batches for the student, and the generator's own step after every k-th student step."""

    phase = "generator step"

    def __init__(self, ctx):
        df, env = ctx.cfg.method, ctx.env
        for flag, v in (("--gen-nz", df.gen_nz), ("--gen-batch", df.gen_batch), ("--gen-every", df.gen_every)):
            if v < 1:
                raise ValueError(f"{flag} must be >= 1, got {v}")
        if df.gen_batch < 2:
            raise ValueError(f"--gen-batch must be >= 2 (the generator and the student use batch statistics), "
                             f"got {df.gen_batch}")
        self.teacher, self.student = ctx.teacher, ctx.student
        self.device, self.rank, self.world = env.device, env.rank, env.world_size
        self.seed, self.dtype = ctx.cfg.run.seed, ctx.dtype
        self.k, self.batch_size, self.nz = df.gen_every, df.gen_batch, df.gen_nz
        self.bn_weight, self.bn_first = df.bn_weight, df.bn_first_weight
        self.generator = Generator(df.gen_nz, df.gen_size).to(self.device).train()
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=df.gen_lr)
        self.student_optim = {"lr": df.dfad_lr, "weight_decay": df.dfad_weight_decay}
        self.scheduled = (self.optimizer,)  # --schedule step decays the generator with the student (DFAD's code)
        zero = torch.zeros((), device=self.device)
        self.last = {"gen/l1": zero.clone()} | ({"gen/bn": zero.clone()} if self.bn_weight else {})
        ctx.echo(f"dfad: generator {df.gen_size[0]}x{df.gen_size[1]} (nz {df.gen_nz}), {df.gen_batch} generated "
                 f"images per step, one generator step per {df.gen_every} student steps; student SGD lr "
                 f"{df.dfad_lr}, weight decay {df.dfad_weight_decay}; generator Adam lr {df.gen_lr}"
                 + (f"; BN prior weight {df.bn_weight} (first layer x{df.bn_first_weight})" if df.bn_weight else ""))

    def latent(self, it, stream):
        """z [B, nz] of iteration `it`, a pure function of (seed, stream, rank, it)."""
        seed = int(np.random.SeedSequence([self.seed, stream, self.rank, it]).generate_state(1)[0])
        g = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn(self.batch_size, self.nz, generator=g, device=self.device)

    def batches(self, start_iter):
        def stream():
            it = start_iter
            while True:
                with torch.no_grad():  # detached: the student's step does not reach the generator
                    x = self.generator(self.latent(it, STUDENT_STREAM))
                yield {"image": x}  # outside the no_grad block: a suspended generator would keep it switched on
                it += 1
        return stream()

    def after_step(self, it):
        if (it + 1) % self.k == 0:
            self.generator_step(it)
        return dict(self.last)

    def generator_loss(self, z):
        """-> (L_G, L1, R_BN or None) on the images G(z), differentiable in G's parameters."""
        x = self.generator(z)                                               # [B, 3, H, W]
        with autocast(self.device, self.dtype):
            with bn_inputs(self.teacher.model) if self.bn_weight else nullcontext([]) as seen:
                t = self.teacher.model(x).logits                            # frozen, but lets gradients reach x
            s = self.student(x).logits
        l1 = F.l1_loss(s.float(), t.float())
        loss = -torch.log1p(l1)
        bn = batch_prior(seen, self.bn_first) if self.bn_weight else None
        if bn is not None:
            loss = loss + self.bn_weight * bn
        return loss, l1, bn

    def generator_step(self, it):
        loss, l1, bn = self.generator_loss(self.latent(it, GENERATOR_STREAM))
        params = [p for p in self.generator.parameters() if p.requires_grad]
        # Only the generator's gradients: the student's .grad stays as the student's own step left it.
        grads = torch.autograd.grad(loss, params)
        if self.world > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce_sum(flat).div_(self.world)
            grads = torch.split(flat, [g.numel() for g in grads])
        for p, g in zip(params, grads):
            p.grad = g.view_as(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last["gen/l1"] = l1.detach()
        if bn is not None:
            self.last["gen/bn"] = bn.detach()

    def profile_notes(self):
        return {"dfad": f"'data' is generating the student's batch; 'generator step' runs every {self.k}th "
                        "iteration (its mean per iteration is shown)"}

    def state_dict(self):
        return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict(),
                "last": {k: v.detach().cpu() for k, v in self.last.items()}}

    def load_state_dict(self, state):
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.last.update({k: v.to(self.device) for k, v in state["last"].items() if k in self.last})
