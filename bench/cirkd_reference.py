"""The baseline of bench/train_throughput.py: a distillation training loop written the way research code is.

The loop and the KD / CWD criteria follow CIRKD (github.com/winycg/CIRKD, `train_kd.py`, `losses/kd.py`,
`losses/cwd.py`, `losses/task.py`), the code most segmentation-KD papers since 2022 start from:

- fp32, NCHW, no autocast; a plain `torch.utils.data.DataLoader` (pin_memory, `num_workers` workers, an
  iteration-based random batch sampler) and blocking `images.to(device)` copies;
- the teacher under `torch.no_grad()` in eval mode, the student in train mode;
- task cross-entropy plus each weighted distillation term; poly LR written into every parameter group
  before each step (`adjust_lr`); `optimizer.zero_grad()`, `losses.backward()`, `optimizer.step()` with
  `torch.optim.SGD`'s default implementation;
- per step, every loss term is "reduced" (`reduce_mean_tensor`: an all_reduce under DDP, a copy otherwise)
  and read on the host with `.item()` for the log. CIRKD reads them every `--log-iter` (10) steps; the
  issue's baseline reads them every step, as mmcv's `BaseModel._parse_losses` (mmsegmentation, mmrazor's
  CWD) does: `log_every` sets it.

CAD (angular distillation) and APD (adaptive perspective distillation) have no CIRKD criterion; they are
written here in the same eager style: reshapes and `F.normalize` for the channel angles, a per-class loop of
masked sums for the prototypes (as CIRKD's `losses/ifvd.py` builds class centres), an einsum for the
pixel-to-prototype cosines and CIRKD's permute-based KL for the observations.

Every criterion computes the same value as segkd's method of the same name (engine/methods/*.py with the
kernels in kernels/*.py), with the weights of engine.config.MethodConfig; where CIRKD's code normalises
differently, the comment says what was changed so that they agree. tests/bench/test_train_throughput.py checks it.
"""
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ABSENT = -1e4  # logit of a class absent from the image (segkd's kernels/prototype.py): softmax weight 0 in fp32


# ----------------------------------------------------------------------------- criteria (CIRKD losses/*.py)

class SegCrossEntropyLoss(nn.Module):
    """CIRKD losses/task.py: logits upsampled to the label size, nn.CrossEntropyLoss (mean over labelled pixels).

    CIRKD upsamples with align_corners=True; segkd's segmentation_ce uses align_corners=False, and so does this
    copy, so that the two loops optimise the same loss.
    """

    def __init__(self, ignore_index=255):
        super().__init__()
        self.task_loss = nn.CrossEntropyLoss(ignore_index=ignore_index)

    def forward(self, inputs, targets):
        B, H, W = targets.size()
        inputs = F.interpolate(inputs, (H, W), mode='bilinear', align_corners=False)
        return self.task_loss(inputs, targets)


class CriterionKD(nn.Module):
    """CIRKD losses/kd.py, unchanged: NHWC rows, log_softmax / softmax, KL with batchmean over pixels, * T^2.

    batchmean over the B*H*W rows is segkd's pixel mean (kernels.pixel_kl), so the values agree as they are.
    """

    def __init__(self, temperature=1):
        super().__init__()
        self.temperature = temperature

    def forward(self, pred, soft):
        B, C, h, w = soft.size()
        scale_pred = pred.permute(0, 2, 3, 1).contiguous().view(-1, C)
        scale_soft = soft.permute(0, 2, 3, 1).contiguous().view(-1, C)
        p_s = F.log_softmax(scale_pred / self.temperature, dim=1)
        p_t = F.softmax(scale_soft / self.temperature, dim=1)
        return F.kl_div(p_s, p_t, reduction='batchmean') * (self.temperature ** 2)


class ChannelNorm(nn.Module):
    """CIRKD losses/cwd.py: softmax over the H*W positions of each channel."""

    def forward(self, featmap):
        n, c, h, w = featmap.shape
        featmap = featmap.reshape((n, c, -1))
        return featmap.softmax(dim=-1)


class CriterionCWD(nn.Module):
    """CIRKD losses/cwd.py with norm_type='channel', divergence='kl' (the setting train_kd.py builds):
    sum of KL over channels / (N*C) * T^2, the softmax taken, then `.log()`-ed. The same normalisation as
    segkd's kernels.channel_kl, so the values agree as they are (up to log(softmax) vs log_softmax rounding).
    The 1x1 conv only runs when the channel counts differ (never on logits, where train_kd.py and segkd use it).
    """

    def __init__(self, s_channels, t_channels, temperature=4.0):
        super().__init__()
        self.normalize = ChannelNorm()
        self.criterion = nn.KLDivLoss(reduction='sum')
        self.temperature = temperature
        self.conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)

    def forward(self, preds_S, preds_T):
        n, c, h, w = preds_S.shape
        if preds_S.size(1) != preds_T.size(1):
            preds_S = self.conv(preds_S)
            n, c = preds_S.shape[:2]
        norm_s = self.normalize(preds_S / self.temperature)
        norm_t = self.normalize(preds_T.detach() / self.temperature)
        norm_s = norm_s.log()
        loss = self.criterion(norm_s, norm_t)
        loss /= n * c
        return loss * (self.temperature ** 2)


class CriterionCAD(nn.Module):
    """Channel angular distillation (Liu et al., WACV 2024), eager: each channel's H*W map L2-normalised,
    squared distance summed over H*W, mean over (batch, channel), which is segkd's per-sample
    (1/C) sum_c averaged over the batch (kernels.angular_loss mode 'channel').

    `connector` is the same 1x1 conv + BN + ReLU, under the same name, as segkd's FeatureMethod, so a test can
    load one's weights into the other.
    """

    def __init__(self, s_channels, t_channels):
        super().__init__()
        self.connector = (nn.Sequential(nn.Conv2d(s_channels, t_channels, 1, bias=False),
                                        nn.BatchNorm2d(t_channels), nn.ReLU(inplace=True))
                          if s_channels != t_channels else nn.Identity())

    def forward(self, feat_S, feat_T):
        feat_S = self.connector(feat_S)
        if feat_S.shape[-2:] != feat_T.shape[-2:]:
            feat_S = F.interpolate(feat_S, size=feat_T.shape[-2:], mode='bilinear', align_corners=False)
        b, c = feat_T.shape[:2]
        s = F.normalize(feat_S.view(b, c, -1), p=2, dim=2, eps=1e-6)
        t = F.normalize(feat_T.view(b, c, -1), p=2, dim=2, eps=1e-6)
        return (s - t).pow(2).sum(2).mean()


def _projector(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 1))


class CriterionAPD(nn.Module):
    """Adaptive perspective distillation (Tian et al., TPAMI 2022), eager, on decoder features:
    projected + normalised features, per-image class prototypes by a per-class loop of masked means,
    pixel-to-prototype cosines / tau by einsum, and

        l_t   = CE(teacher observation logits, labels)     (trains teacher_proj alone, by Adam)
        l_rec = 1 - mean over present (image, class) of cos(A_s, A_t)
        l_ob  = CIRKD's CriterionKD (T = 1) between the student's and the teacher's observation logits
        l_kd  = CriterionKD(T) on the logits
    and with kd_unit "element" (segkd's default, the APD code's KLDivLoss() mean) l_kd / C and l_ob / mean_b K_b.

    Absent classes get the logit ABSENT, as in segkd, so both observations are softmaxes over the same classes.
    The projectors have segkd's APD names and shapes. Returns (l_kd, l_ob, l_rec, l_t), unweighted.
    """

    def __init__(self, s_channels, t_channels, num_classes, tau=0.1, temperature=1.0, ignore_index=255,
                 kd_unit="element"):
        super().__init__()
        self.kd_unit = kd_unit
        self.teacher_proj = _projector(t_channels, s_channels)
        self.student_proj = _projector(s_channels, s_channels)
        self.num_classes, self.tau, self.ignore_index = num_classes, tau, ignore_index
        self.criterion_kd = CriterionKD(temperature)
        self.criterion_ob = CriterionKD(1.0)
        self.criterion_t = nn.CrossEntropyLoss(ignore_index=ignore_index)

    def prototypes(self, feat, labels):
        """feat [B, C, h, w], labels [B, h, w] -> (prototypes [B, K, C], present [B, K]).

        Sum / (count + 1e-6) as IFVD-style code writes it (segkd divides by the count): every use below is a
        cosine, which the scale does not change.
        """
        protos, present = [], []
        for k in range(self.num_classes):
            mask = (labels == k).unsqueeze(1).float()  # [B, 1, h, w]
            protos.append((mask * feat).sum((2, 3)) / (mask.sum((2, 3)) + 1e-6))  # [B, C]
            present.append(mask.sum((1, 2, 3)) > 0)  # [B]
        return torch.stack(protos, 1), torch.stack(present, 1)

    def observe(self, feat, protos, present):
        """cos(f, A_k) / tau for present classes, ABSENT for the others -> [B, K, h, w]."""
        protos = F.normalize(protos, p=2, dim=2, eps=1e-6)
        logits = torch.einsum('bkc,bchw->bkhw', protos, feat) / self.tau
        return logits.masked_fill(~present[:, :, None, None], ABSENT)

    def forward(self, s_out, t_out, targets):
        f_s = F.normalize(self.student_proj(s_out.decoder), p=2, dim=1, eps=1e-6)  # [B, d_s, h, w]
        f_t = F.normalize(self.teacher_proj(t_out.decoder), p=2, dim=1, eps=1e-6)
        labels = F.interpolate(targets.unsqueeze(1).float(), size=f_s.shape[-2:], mode='nearest')[:, 0].long()
        a_s, present = self.prototypes(f_s, labels)
        a_t, _ = self.prototypes(f_t, labels)
        l_t = self.criterion_t(self.observe(f_t, a_t, present), labels)
        # boolean indexing, as such code selects the present classes (a host sync: nonzero)
        l_rec = 1 - F.cosine_similarity(a_s[present], a_t.detach()[present], dim=1, eps=1e-6).mean()
        l_ob = self.criterion_ob(self.observe(f_s, a_s, present), self.observe(f_t.detach(), a_t.detach(), present))
        l_kd = self.criterion_kd(s_out.logits, t_out.logits)
        if self.kd_unit == "element":
            l_kd, l_ob = l_kd / s_out.logits.shape[1], l_ob * present.shape[0] / present.sum().clamp_min(1)
        return l_kd, l_ob, l_rec, l_t


METHODS = ("none", "kd", "cad", "apd", "cwd")


def build_criteria(method, mcfg, s_channels, t_channels, num_classes, ignore_index=255):
    """The criteria of `method` (a name of METHODS) as an nn.ModuleDict; mcfg: engine.config.MethodConfig
    (weights and temperatures; positions are segkd's defaults). *_channels: the models' `channels` dicts."""
    if method not in METHODS:
        raise ValueError(f"reference loop: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if mcfg.position:
        raise ValueError("reference loop: --position is not supported (it distils at each method's default)")
    if method == "apd" and mcfg.apd_convention != "paper":  # CriterionAPD is segkd's paper convention alone
        raise ValueError(f"reference loop: --apd-convention {mcfg.apd_convention} is not supported (paper only)")
    crit = nn.ModuleDict()
    if method == "kd":
        crit["kd"] = CriterionKD(mcfg.temperature)
    elif method == "cad":
        crit["cad"] = CriterionCAD(s_channels["backbone"], t_channels["backbone"])
        crit["kd"] = CriterionKD(mcfg.temperature)
    elif method == "apd":
        crit["apd"] = CriterionAPD(s_channels["decoder"], t_channels["decoder"], num_classes, mcfg.apd_tau,
                                   mcfg.temperature, ignore_index, mcfg.apd_kd_unit)
    elif method == "cwd":
        crit["cwd"] = CriterionCWD(s_channels["logits"], t_channels["logits"], mcfg.cwd_temperature)
    return crit


def distill_losses(method, crit, mcfg, s_outputs, t_outputs, targets):
    """The weighted distillation terms of one step, named as segkd's method names them (train_kd.py's
    `kd_loss = self.args.lambda_kd * self.criterion_kd(...)` chain)."""
    losses = {}
    if method == "kd":
        losses["kd"] = mcfg.kd_weight * crit["kd"](s_outputs.logits, t_outputs.logits)
    elif method == "cad":
        losses["ad"] = mcfg.ad_weight * crit["cad"](s_outputs.backbone, t_outputs.backbone)
        if mcfg.ad_kd_weight:
            kd = crit["kd"](s_outputs.logits, t_outputs.logits)
            losses["kd"] = mcfg.ad_kd_weight * (kd / s_outputs.logits.shape[1] if mcfg.ad_kd_unit == "element" else kd)
    elif method == "apd":
        l_kd, l_ob, l_rec, l_t = crit["apd"](s_outputs, t_outputs, targets)
        losses["kd"] = mcfg.apd_kd_weight * l_kd
        losses["ob"] = mcfg.apd_kd_weight * l_ob
        losses["rec"] = mcfg.apd_rec_weight * l_rec
        losses["teacher_proj"] = l_t  # its gradient reaches teacher_proj alone (the teacher runs without autograd)
    elif method == "cwd":
        losses["cwd"] = mcfg.cwd_weight * crit["cwd"](s_outputs.logits, t_outputs.logits)
    return losses


# ----------------------------------------------------------------------------- the loop (CIRKD train_kd.py)

class ReferenceTrainer:
    """CIRKD train_kd.py's Trainer cut down to one method and no validation.

    teacher, student: nn.Modules returning SegOutput (the teacher's weights already loaded); dataset: a
    training dataset of engine.data; mcfg / ocfg: engine.config MethodConfig / OptimConfig.
    """

    def __init__(self, method, teacher, student, dataset, *, batch_size, workers, device, mcfg, ocfg,
                 max_iterations, log_every=1, seed=0):
        self.method, self.mcfg, self.ocfg = method, mcfg, ocfg
        self.device = torch.device(device)
        self.batch_size, self.max_iterations, self.log_every = batch_size, max_iterations, log_every
        self.num_gpus = dist.get_world_size() if dist.is_initialized() else 1
        generator = torch.Generator().manual_seed(seed)
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True,
                                                 num_samples=max_iterations * batch_size, generator=generator)
        self.train_loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                                        num_workers=workers, pin_memory=self.device.type == "cuda",
                                                        drop_last=True)
        self.t_model = teacher.to(self.device)
        for t_p in self.t_model.parameters():
            t_p.requires_grad = False
        self.t_model.eval()
        self.s_model = student.to(self.device)
        ignore = dataset.ignore_index
        self.criterion = SegCrossEntropyLoss(ignore_index=ignore).to(self.device)
        self.crit = build_criteria(method, mcfg, student.channels, teacher.channels, dataset.num_classes,
                                   ignore).to(self.device)
        params_list = nn.ModuleList([self.s_model])
        extra = []
        for name, c in self.crit.items():
            if name == "apd":  # APD's teacher projector: its own Adam, as segkd's (engine/methods/apd.py)
                params_list.append(c.student_proj)
                extra.append(torch.optim.Adam(c.teacher_proj.parameters(), lr=mcfg.apd_teacher_lr,
                                              betas=(0.9, 0.99)))
            else:
                params_list.append(c)
        self.optimizer = torch.optim.SGD(params_list.parameters(), lr=ocfg.lr, momentum=ocfg.momentum,
                                         weight_decay=ocfg.weight_decay)
        self.extra_optimizers = extra
        self.log = []

    def adjust_lr(self, base_lr, iter, max_iter, power):
        cur_lr = base_lr * ((1 - float(iter) / max_iter) ** power)
        for param_group in self.optimizer.param_groups:
            param_group['lr'] = cur_lr
        return cur_lr

    def reduce_mean_tensor(self, tensor):
        rt = tensor.detach().clone()
        if self.num_gpus > 1:
            dist.all_reduce(rt, op=dist.ReduceOp.SUM)
            rt /= self.num_gpus
        return rt

    def train_step(self, images, targets, iteration):
        """One iteration (1-based `iteration`, as CIRKD counts) -> the weighted terms, still tensors."""
        with torch.no_grad():
            t_outputs = self.t_model(images)
        s_outputs = self.s_model(images)
        task_loss = self.criterion(s_outputs.logits, targets)
        kd_losses = distill_losses(self.method, self.crit, self.mcfg, s_outputs, t_outputs, targets)
        losses = task_loss + sum(kd_losses.values())
        self.adjust_lr(base_lr=self.ocfg.lr, iter=iteration - 1, max_iter=self.max_iterations,
                       power=self.ocfg.poly_power)
        self.optimizer.zero_grad()
        for opt in self.extra_optimizers:
            opt.zero_grad()
        losses.backward()
        self.optimizer.step()
        for opt in self.extra_optimizers:
            opt.step()
        return {"ce": task_loss, **kd_losses}

    def train(self, warmup, steps):
        """Run warmup + steps iterations; time the last `steps` (data loading included).

        Returns {"step_ms", "img_s", "peak_mem_mb" (CUDA; 0 on CPU), "last_losses"}.
        """
        if steps < 1 or warmup < 0 or warmup + steps > self.max_iterations:
            raise ValueError(f"need steps >= 1, warmup >= 0 and warmup + steps <= max_iterations "
                             f"{self.max_iterations}; got warmup {warmup}, steps {steps}")
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.s_model.train()
        start = None
        for iteration, batch in enumerate(self.train_loader):
            iteration = iteration + 1
            if iteration == warmup + 1:
                if cuda:
                    torch.cuda.synchronize(self.device)
                start = time.perf_counter()
            images = batch["image"].to(self.device)
            targets = batch["label"].long().to(self.device)
            losses = self.train_step(images, targets, iteration)
            reduced = {k: self.reduce_mean_tensor(v) for k, v in losses.items()}
            if iteration % self.log_every == 0:
                self.log.append({k: v.item() for k, v in reduced.items()})
            if iteration == warmup + steps:
                break
        if cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        return {"step_ms": 1e3 * seconds / steps, "img_s": steps * self.batch_size * self.num_gpus / seconds,
                "peak_mem_mb": torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else 0.0,
                "last_losses": {k: v.item() for k, v in reduced.items()}}
