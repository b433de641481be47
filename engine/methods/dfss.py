"""`dfss`: distribution-guided data-free distillation (Sun and Wu, "Seeing the Whole Picture: Distribution-Guided
Data-Free Distillation for Semantic Segmentation", 2025), in the reading of docs/datafree.md.

1. ADS (engine/datafree/ads.py): score every image of the unlabelled pool --aux-data by the distance of the
   teacher's BN-layer input statistics from the layers' running statistics; keep the --ads-keep lowest.
2. WDPD (engine/datafree/wdpd.py): train the student on the kept images with per-image KD weighted by
   w(t) normalised over the batch,

       L = kd_weight * sum_b w_b(t) / sum_b' w_b'(t) * KL_b,   KL_b = T^2 mean_pixels KL(p_t || p_s) of image b

   with w(t) moving from the reliability w0 = 1 - (d - d_min) / (d_max - d_min) to uniform by --wdpd-alpha of
   training (or a threshold curriculum that admits images in order of distance).

The KD term uses --temperature and --kd-weight like `kd`. Feature terms of another method join with
`--method dfss+cad` (any label-free method): they are computed on the same pool batches as batch means, not
weighted per image. Batches come from the pool through the key-based augmentation of the labelled datasets
(--crop, --scale-min/max, --flip, --rotate, --batch-size, --workers).
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import kernels
from engine import dist
from engine.datafree import wdpd
from engine.datafree.ads import check_view, keep_count, pool_scores, score_pool, scoring_pool, select
from engine.datafree.bn_hooks import parse_layers
from engine.datafree.pool import ImagePool, PoolBatchSampler, list_images, pool_digest, pool_loader
from engine.methods.base import Method, TrainSource
from engine.settings import at_least, fraction, positive, setting


@dataclass
class DFSSSettings:
    """Where dfss's training inputs come from (docs/datafree.md); its KD term uses kd's --kd-weight and the
    shared --temperature."""
    aux_data: str = setting("", "dfss: folder of unlabelled auxiliary images (searched recursively for "
                                ".jpg/.jpeg/.png)")
    ads_layers: str = setting("all", "dfss: teacher BN layers whose input statistics score an image: all|first|"
                                     "last-K (in execution order)")
    ads_keep: float = setting(0.5, "dfss: images kept from the pool, the lowest-scored: a fraction if <= 1, a "
                                   "count if > 1", check=positive)
    ads_batch: int = setting(16, "dfss: images per scoring batch", check=at_least(1))
    ads_view: str = setting("crop", "dfss: what the teacher scores: crop (each image resized to cover --crop, "
                                    "centre crop: the input size its BN statistics were gathered at) or whole "
                                    "(the whole image)")
    ads_max_side: int = setting(0, "dfss: --ads-view whole: images with a longer side above this are downscaled "
                                   "for scoring (0: never)", check=at_least(0))
    wdpd_alpha: float = setting(0.5, "dfss: fraction of --iters after which the sample weights are uniform "
                                     "(0: uniform from the start)", check=fraction)
    wdpd_schedule: str = setting("linear", "dfss: linear (weights move from w0 to uniform) or threshold (samples "
                                           "admitted in order of distance)")
    wdpd_start: float = setting(0.25, "dfss: threshold schedule: fraction of the kept images admitted at the start")


class DFSS(Method):
    settings = DFSSSettings

    def forward(self, s, t, batch):
        b, dev = s.logits.shape[0], s.logits.device
        w = batch.get("weight")
        w = torch.ones(b, device=dev) if w is None else w.to(dev, torch.float32)           # [B]
        # One launch: pixel_kl's per-image weights give sum_b w_b * KL_b, each KL_b a mean over image b's pixels.
        kd = kernels.pixel_kl(s.logits, t.logits, self.cfg.temperature, weights=wdpd.normalise(w),
                              scale=self.cfg.kd_weight)  # kd_weight inside the op: no rescaling in the backward
        return {"kd": kd}

    def train_source(self, ctx):
        return PoolSource(ctx)


class PoolSource(TrainSource):
    """The ADS-selected part of the pool, sampled per iteration, each batch carrying its WDPD weights."""

    prefetch = True  # the weights follow the iteration number only

    def __init__(self, ctx):
        df = ctx.cfg.method
        if not df.aux_data:
            raise ValueError("--method dfss needs --aux-data DIR: a folder of unlabelled images to select from")
        wdpd.check_schedule(df.wdpd_schedule, df.wdpd_alpha, df.wdpd_start)
        check_view(df.ads_view)
        parse_layers(df.ads_layers)
        keep_count(1, df.ads_keep)
        self.ctx, self.df = ctx, df
        self.root = Path(df.aux_data)
        self.files = list_images(self.root)  # a missing or empty folder fails here, before any training
        self.selection = None                # (kept files, lowest distance first; their distances float64 [n])

    def select(self):
        """Score (or read the cached scores of) the pool on rank 0, keep the lowest, draw the pictures; every
        rank gets the same selection."""
        ctx, df = self.ctx, self.df
        picked = None
        if ctx.env.is_main:
            from engine.datafree.pictures import plot_histogram, plot_selection

            scores = pool_scores(ctx.teacher.model, ctx.cfg.model.teacher_ckpt, self.root, self.files,
                                 pool_digest(self.root, self.files), layers=df.ads_layers, view=df.ads_view,
                                 crop=ctx.cfg.data.crop, max_side=df.ads_max_side, batch_size=df.ads_batch,
                                 device=ctx.env.device,
                                 workers=ctx.cfg.data.workers, fallback_dir=ctx.cache_dir, echo=ctx.echo)
            kept = select(scores, df.ads_keep)
            out = Path(ctx.out)
            out.mkdir(parents=True, exist_ok=True)
            plot_selection(self.root, self.files, scores, kept, out / "ads_selection.png")
            plot_histogram(scores, kept, out / "ads_scores.png")
            mask = np.zeros(len(scores), bool)
            mask[kept] = True
            (out / "ads_scores.json").write_text(json.dumps(
                {"root": str(self.root), "files": self.files, "scores": scores.tolist(), "kept": mask.tolist()}))
            ctx.echo(f"ADS: kept {len(kept)} of {len(scores)} pool images (scores {scores[kept].min():.4g} .. "
                     f"{scores[kept].max():.4g}; dropped up to {scores.max():.4g}); pictures in {out}")
            picked = ([self.files[i] for i in kept], scores[kept].tolist())
        files, d = dist.broadcast_object(picked)
        self.selection = (files, torch.tensor(d, dtype=torch.float64))

    def batches(self, start_iter):
        if self.selection is None:
            self.select()
        ctx, df, cfg = self.ctx, self.df, self.ctx.cfg
        files, d = self.selection
        n, total = len(files), cfg.optim.iters
        w0 = wdpd.reliability(d)
        data = ImagePool(self.root, files, train=True, crop=cfg.data.crop, scale=(cfg.data.scale_min,
                         cfg.data.scale_max), flip=cfg.data.flip, rotate=cfg.data.rotate, seed=cfg.run.seed)
        sampler = PoolBatchSampler(
            n, cfg.data.batch_size, lambda it: wdpd.admitted(n, it, total, df.wdpd_alpha, df.wdpd_start,
                                                             df.wdpd_schedule),
            seed=cfg.run.seed, rank=ctx.env.rank, world_size=ctx.env.world_size, start_iter=start_iter)
        loader = iter(pool_loader(data, sampler, cfg.data.workers))

        def stream():
            it = start_iter
            for batch in loader:
                w = wdpd.weights_at(w0, it, total, df.wdpd_alpha, df.wdpd_schedule)   # [n] float64
                batch["weight"] = w[batch["index"]].float()                          # [B], normalised in forward
                yield batch
                it += 1
        return stream()

    def profile_notes(self):
        """ADS scoring throughput, measured now on up to 4 scoring batches of the pool (the cache is bypassed)."""
        ctx, df = self.ctx, self.df
        n = min(len(self.files), 4 * df.ads_batch)
        data = scoring_pool(self.root, self.files[:n], df.ads_view, ctx.cfg.data.crop, df.ads_max_side)
        t0 = time.perf_counter()
        score_pool(ctx.teacher.model, data, df.ads_layers, df.ads_batch, ctx.env.device, ctx.cfg.data.workers)
        rate = n / (time.perf_counter() - t0)  # score_pool returns host values: the device work is done
        return {"ADS scoring": f"{rate:.1f} images/s ({n} pool images, batches of {df.ads_batch}, --ads-view "
                               f"{df.ads_view}, decoding included); rank 0 scores the pool once, then it is cached"}

    def state_dict(self):
        if self.selection is None:
            self.select()
        files, d = self.selection
        return {"root": str(self.root), "files": list(files), "distances": d.clone()}

    def load_state_dict(self, state):
        missing = [f for f in state["files"] if not (self.root / f).is_file()]
        if missing:
            raise ValueError(f"cannot resume dfss: {len(missing)} selected image(s) are not in --aux-data "
                             f"{self.root} (e.g. {missing[0]}; the checkpoint selected from {state['root']})")
        self.selection = (list(state["files"]), state["distances"].to(torch.float64))
