"""`apd`: Adaptive Perspective Distillation (Tian et al., "Adaptive Perspective Distillation for Semantic
Segmentation", TPAMI 2022).

Decoder features (default position) are projected and L2-normalised,
    f_t = n(P_t(F_t)),  P_t = [1x1 conv d_t->d_s, ReLU, 1x1 conv d_s->d_s]
    f_s = n(P_s(F_s)),  P_s = [1x1 conv d_s->d_s, ReLU, 1x1 conv d_s->d_s]
per-image class prototypes A^i = masked average of f over the ground-truth pixels of class i (labels
downsampled to feature resolution by nearest neighbour; kernels.masked_avg_pool), and observations
    p_a = softmax over the classes present in the image of cos(f, A^i) / tau        (kernels.prototype_logits)

    L_t   = CE(observation logits of the teacher, labels)        -> updates P_t alone (Adam, lr 1e-5, betas 0.9/0.99)
    L_rec = 1 - mean over present (b, i) of cos(A_s^i, A_t^i)
    L_ob  = KL(p_a,t || p_a,s) summed over pixels and classes    (kernels.prototype_kl), divided by
              element: the number of (b, present class, pixel) entries, sum_b K_b * h*w   (default)
              pixel:   the number of pixels B*h*w (mean_b K_b times stronger)
    L_kd  = per-pixel KD on logits at temperature T, unit --apd-kd-unit (engine.methods.base.logit_kd):
              element: divided by B*C*H*W (default); pixel: by B*H*W (C times stronger)
    student loss = CE + lambda_kd * (L_kd + L_ob) + lambda_rec * L_rec,  lambda_kd = lambda_rec = 10, tau = 0.1

The unit of L_kd and L_ob follows the released code behind the paper's tables (dvlab-research/APD
tool/train.py: kl_weight = pred_kmeans_weight = 10, both terms torch.nn.KLDivLoss() with its default element
mean). For L_ob it is segkd's per-image analogue: the code's prototypes are per class over the whole per-GPU
batch, so its element mean divides by the N classes present in the batch (N >= each K_b); segkd's prototypes
are per image (issue 14 tracks the code's batch-level prototypes as a convention). In the pixel unit the same weight of 10 makes L_kd C times
stronger, which put apd below the student alone on CamVid (issue 19, bench/results/angular_camvid_cpu.md).

No gradient of L_kd, L_rec or L_ob reaches P_t, A_t or p_a,t: the teacher side enters them detached.
The term `apd/teacher_proj` (L_t) is added to the trainer's total only so one backward serves both: its
gradient reaches P_t alone (the teacher is frozen and runs without autograd), whose Adam is the method's own.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from engine.methods.base import KD_UNITS, Method, labels_at, logit_kd, segmentation_ce
from engine.settings import at_least, one_of, positive, setting


@dataclass
class APDSettings:
    apd_kd_weight: float = setting(10.0, "apd: lambda_kd, weight of (L_kd + L_ob)", check=at_least(0))
    apd_kd_unit: str = setting("element", "apd: unit of L_kd and L_ob: element (means over every class entry, "
                                          "KLDivLoss()'s default, as the authors' code) or pixel (means over "
                                          "pixels: C times stronger L_kd)", check=one_of(*KD_UNITS))
    apd_rec_weight: float = setting(10.0, "apd: lambda_rec, weight of the prototype reconstruction term",
                                    check=at_least(0))
    apd_tau: float = setting(0.1, "apd: temperature of the prototype cosine similarities", check=positive)
    apd_teacher_lr: float = setting(1e-5, "apd: Adam learning rate of the teacher projector P_t", check=positive)


def projector(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 1))


class APD(Method):
    settings = APDSettings
    positioned = True
    default_position = "decoder"

    def __init__(self, cfg, student_channels, teacher_channels, num_classes, ignore_index=255):
        super().__init__(cfg, student_channels, teacher_channels, num_classes, ignore_index)
        d_s, d_t = student_channels[self.position], teacher_channels[self.position]
        self.teacher_proj = projector(d_t, d_s)  # P_t
        self.student_proj = projector(d_s, d_s)  # P_s

    def separately_trained(self):
        return [self.teacher_proj]

    def optimizers(self):
        return [torch.optim.Adam(self.teacher_proj.parameters(), lr=self.cfg.apd_teacher_lr, betas=(0.9, 0.99))]

    def forward(self, s, t, batch):
        cfg, tau = self.cfg, self.cfg.apd_tau
        f_s = F.normalize(self.student_proj(self.features(s)).float(), dim=1, eps=1e-6)  # [B, d_s, h, w]
        f_t = F.normalize(self.teacher_proj(self.features(t).float()), dim=1, eps=1e-6)
        labels = labels_at(batch["label"], f_s.shape[-2:])  # [B, h, w]
        a_s, counts = kernels.masked_avg_pool(f_s, labels, self.num_classes, self.ignore_index)  # [B, K, d_s]
        a_t, _ = kernels.masked_avg_pool(f_t, labels, self.num_classes, self.ignore_index)
        present = counts > 0  # [B, K]

        l_t = segmentation_ce(kernels.prototype_logits(f_t, a_t, present, tau), labels, self.ignore_index)
        cos = F.cosine_similarity(a_s, a_t.detach(), dim=2, eps=1e-6)  # [B, K]
        l_rec = 1 - (cos * present).sum() / present.sum().clamp_min(1)
        l_ob = kernels.prototype_kl(f_s, f_t.detach(), a_s, a_t.detach(), present, tau)
        if cfg.apd_kd_unit == "element":  # pixel mean * B / sum_b K_b = mean over the [K_b, h, w] entries
            l_ob = l_ob * present.shape[0] / present.sum().clamp_min(1)
        l_kd = logit_kd(s.logits, t.logits, cfg.temperature, cfg.apd_kd_unit)
        return {
            "kd": cfg.apd_kd_weight * l_kd,
            "ob": cfg.apd_kd_weight * l_ob,
            "rec": cfg.apd_rec_weight * l_rec,
            "teacher_proj": l_t,
        }
