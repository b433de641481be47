"""`apd`: Adaptive Perspective Distillation (Tian et al., "Adaptive Perspective Distillation for Semantic
Segmentation", TPAMI 2022).

Decoder features (default position) are projected and L2-normalised,
    f_t = n(P_t(F_t)),  P_t = [1x1 conv d_t->d_s, ReLU, 1x1 conv d_s->d_s]
    f_s = n(P_s(F_s)),  P_s = [1x1 conv d_s->d_s, ReLU, 1x1 conv d_s->d_s]
(n is applied inside the ops that read f: the projector outputs are never normalised into a copy of their own),
class prototypes A^i = masked average of f over the ground-truth pixels of class i (labels downsampled to
feature resolution by nearest neighbour; kernels.masked_avg_pool(normalize=True)), and observations
    p_a = softmax over the present classes of cos(f, A^i) / tau        (kernels.prototype_logits)
The student loss is CE + lambda_kd * (L_kd + L_ob) + lambda_rec * L_rec (lambda_kd = lambda_rec = 10,
tau = 0.1); L_t trains P_t alone (Adam, lr 1e-5, betas 0.9/0.99, constant lr). --apd-convention picks the
form of the terms:

paper (default: segkd's form, every apd result so far). Prototypes per image: A_b^i over the pixels of image
b, present classes K_b per image.
    L_t   = CE(observation logits of the teacher over the K_b present classes at feature resolution, labels
              downsampled to it), mean over the valid pixels                     (kernels.prototype_ce)
    L_rec = 1 - mean over present (b, i) of cos(A_s,b^i, A_t,b^i)
    L_ob  = KL(p_a,t || p_a,s) summed over pixels and classes    (kernels.prototype_kl), divided by
              element: the number of (b, present class, pixel) entries, sum_b K_b * h*w   (default)
              pixel:   the number of pixels B*h*w (mean_b K_b times stronger)
    L_kd  = per-pixel KD on the feature-resolution logits at temperature T, unit --apd-kd-unit
              (engine.methods.base.logit_kd): element: divided by B*C*H*W (default); pixel: by B*H*W

code: the released code behind the paper's tables, dvlab-research/APD tool/train.py (CriterionKmeansInterWhole
for L_t, L_ob, L_rec; CriterionKD for L_kd; the configs config/*/*_release_psp18_psp101.yaml set kmeans_temp
10 = 1/tau, kmeans_norm, pred_kmeans_weight = kl_weight = proto_align_weight = 10, teacher_lr 1e-5; its
projectors, 512->512->512 on both nets' 512-d PSP decoder features, are P_s and P_t at d_s = d_t = 512). One
prototype per class over every pixel of the (per-GPU) batch, A^i = sum_b count_b^i A_b^i / sum_b count_b^i
(the code's mean over the class's pixels of all images); the N classes present in the batch observe.
    L_t   = CE over all K class channels at label resolution: channel i holds cos(f_t, A_t^i) / tau for a class
              present in the batch and 0 for an absent one (the code's one-hot conv leaves it empty), and the
              [B, K, h, w] map is upsampled bilinearly (align_corners=True) to the labels before the CE
    L_rec = 0.5 * mean over the N present classes of (1 - cos(A_s^i, A_t^i))
    L_ob  = KL(p_a,t || p_a,s) over the N batch classes, summed over pixels and classes, divided by
              element: B*N*h*w, torch.nn.KLDivLoss()'s element mean as in the code   (default)
              pixel:   B*h*w (N times stronger)
    L_kd  = per-pixel KD on the logits upsampled bilinearly (align_corners=True) to the label size, unit as
              above (the code's CriterionKD interpolates before its KLDivLoss()); kernels.upsampled_pixel_kl,
              which interpolates on the fly, as kernels.upsampled_cross_entropy does for this L_t
Both conventions exclude ignore-labelled pixels from the prototypes and the CE, and let every pixel (ignored
or not) observe in L_ob, as the code does. The rest of the code's recipe is the trainer's: P_s and the head at
10x the backbone lr (--head-lr-mult 10), the auxiliary CE (--aux-weight 0.4). Not reproduced: the code taps
the student's feature after the head's Dropout2d(0.1), the mask its classifier sees (SegOutput.decoder is
before it), and skips a batch without a labelled pixel (here L_t, L_ob, L_rec are then 0).

The unit of L_kd and L_ob follows the code (kl_weight = pred_kmeans_weight = 10, both terms
torch.nn.KLDivLoss() with its default element mean). In the paper convention L_ob's element unit is the
per-image analogue of the code's batch mean (N >= each K_b). In the pixel unit the same weight of 10 makes
L_kd C times stronger, which put apd below the student alone on CamVid (issue 19,
bench/results/angular_camvid_cpu.md).

No gradient of L_kd, L_rec or L_ob reaches P_t, A_t or p_a,t: the teacher side enters them detached.
The term `apd/teacher_proj` (L_t) is added to the trainer's total only so one backward serves both: its
gradient reaches P_t alone (the teacher is frozen and runs without autograd), whose Adam is the method's own.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from engine.methods.base import KD_UNITS, Method, labels_at, logit_kd
from engine.settings import at_least, one_of, positive, setting

CONVENTIONS = ("paper", "code")


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
    apd_convention: str = setting("paper", "apd: form of the loss terms: paper (per-image prototypes, "
                                           "L_rec = 1 - mean cos, L_t over the present classes and L_kd at "
                                           "feature resolution; segkd's results so far) or code (the authors' "
                                           "tool/train.py: prototypes per class over the batch, "
                                           "L_rec = 0.5 * mean(1 - cos), L_t over all K classes and L_kd at "
                                           "label resolution)", check=one_of(*CONVENTIONS))


def projector(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 1))


def projector_input(x, proj):
    """x as `proj` takes it: unchanged under autocast (the convolution casts it; an explicit upcast would write and
    read an fp32 copy of the features), else in the projector's weight dtype (a 16-bit teacher, fp32 projector)."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(proj[0].weight.dtype)


def batch_prototypes(protos, counts):
    """Per-image prototypes [B, K, d] and pixel counts [B, K] -> one prototype per class over every pixel of
    the batch [K, d] and its count [K]: sum_b count_b A_b / sum_b count_b (0 for a class absent everywhere).

    Built from the per-image sums, so the [B, d, h, w] features are never permuted into a batch-wide view.
    """
    n = counts.sum(0)  # [K]
    return (protos * counts[..., None]).sum(0) / n.clamp_min(1)[:, None], n


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
        cfg = self.cfg
        # f = P(F) unnormalised, in the step's dtype and layout: every consumer normalises each pixel as it reads it
        # (masked_avg_pool(normalize=True), prototype_logits, prototype_kl), so no normalised fp32 copy is made
        f_s = self.student_proj(self.features(s))  # [B, d_s, h, w]
        f_t = self.teacher_proj(projector_input(self.features(t), self.teacher_proj))
        labels = labels_at(batch["label"], f_s.shape[-2:])  # [B, h, w]
        a_s, counts = kernels.masked_avg_pool(f_s, labels, self.num_classes, self.ignore_index,
                                              normalize=True)  # [B, K, d_s], prototypes of n(f_s)
        a_t, _ = kernels.masked_avg_pool(f_t, labels, self.num_classes, self.ignore_index, normalize=True)
        terms = self.code_terms if cfg.apd_convention == "code" else self.paper_terms
        l_t, l_rec, l_ob, l_kd = terms(s, t, batch["label"], f_s, f_t, a_s, a_t, counts, labels)
        return {
            "kd": l_kd,  # lambda_kd applied inside pixel_kl
            "ob": l_ob,  # lambda_kd applied inside prototype_kl
            "rec": cfg.apd_rec_weight * l_rec,
            "teacher_proj": l_t,
        }

    def paper_terms(self, s, t, full_labels, f_s, f_t, a_s, a_t, counts, labels):
        """(L_t, L_rec, lambda_kd L_ob, lambda_kd L_kd) with per-image prototypes; see the module docstring."""
        cfg, tau = self.cfg, self.cfg.apd_tau
        present = counts > 0  # [B, K]
        # CE of the observation logits at feature resolution, fused: the [B, K, h, w] logits are never written
        l_t = kernels.prototype_ce(f_t, a_t, present, labels, tau, self.ignore_index)
        cos = F.cosine_similarity(a_s, a_t.detach(), dim=2, eps=1e-6)  # [B, K]
        l_rec = 1 - (cos * present).sum() / present.sum().clamp_min(1)
        # element unit: pixel mean * B / sum_b K_b = mean over the [K_b, h, w] entries; the factor and lambda_kd are
        # applied inside the op (a device tensor: no host sync), so its backward does not rescale dL/df_s
        scale = cfg.apd_kd_weight * (present.shape[0] / present.sum().clamp_min(1)) \
            if cfg.apd_kd_unit == "element" else cfg.apd_kd_weight
        l_ob = kernels.prototype_kl(f_s, f_t.detach(), a_s, a_t.detach(), present, tau, scale=scale)
        l_kd = logit_kd(s.logits, t.logits, cfg.temperature, cfg.apd_kd_unit, cfg.apd_kd_weight)
        return l_t, l_rec, l_ob, l_kd

    def code_terms(self, s, t, full_labels, f_s, f_t, a_s, a_t, counts, labels):
        """(L_t, L_rec, lambda_kd L_ob, lambda_kd L_kd) as dvlab-research/APD tool/train.py computes them; see the
        module docstring."""
        cfg, tau = self.cfg, self.cfg.apd_tau
        b = f_s.shape[0]
        a_s, n = batch_prototypes(a_s, counts)  # [K, d_s], [K]
        a_t, _ = batch_prototypes(a_t, counts)
        present = n > 0  # [K]
        n_present = present.sum().clamp_min(1)  # N, a tensor: no host sync
        # every image observes the batch's prototypes: expanded views, no copy
        a_s_b, a_t_b, present_b = a_s.expand(b, -1, -1), a_t.expand(b, -1, -1), present.expand(b, -1)

        logits_t = kernels.prototype_logits(f_t, a_t_b, present_b, tau)  # [B, K, h, w], ABSENT where absent
        logits_t = logits_t.masked_fill(~present[:, None, None], 0.0)  # absent classes: 0, as the code
        # upsampled (align_corners=True) inside the fused CE: the label-size logits are never written
        l_t = kernels.upsampled_cross_entropy(logits_t, full_labels, self.ignore_index, align_corners=True)

        cos = F.cosine_similarity(a_s, a_t.detach(), dim=1, eps=1e-6)  # [K]
        l_rec = 0.5 * ((1 - cos) * present).sum() / n_present

        # / (B*h*w), and / N in the element unit; lambda_kd and that factor applied inside the op
        scale = cfg.apd_kd_weight / n_present if cfg.apd_kd_unit == "element" else cfg.apd_kd_weight
        l_ob = kernels.prototype_kl(f_s, f_t.detach(), a_s_b, a_t_b.detach(), present_b, tau, scale=scale)

        # the code's CriterionKD on logits interpolated to the label size, fused: no label-size logits are written
        weight = cfg.apd_kd_weight / s.logits.shape[1] if cfg.apd_kd_unit == "element" else cfg.apd_kd_weight
        l_kd = kernels.upsampled_pixel_kl(s.logits, t.logits, full_labels.shape[-2:], cfg.temperature, scale=weight,
                                          align_corners=True)
        return l_t, l_rec, l_ob, l_kd
