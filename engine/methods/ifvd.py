"""`ifvd`: intra-class feature variation distillation (Wang et al., "Intra-class Feature Variation
Distillation for Semantic Segmentation", ECCV 2020).

Each network's feature map F [B, C, h, w] (default: the decoder feature, --position) is compared with its own
class centres: the labels are downsampled to h x w by nearest neighbour (y), the centre of class k in image b
is the mean feature of its pixels there, and each pixel gets its cosine similarity to its own class's centre,

    mu_{b,k}  = sum_{p: y_bp = k} F_{b,:,p} / |{p: y_bp = k}|                  (kernels.masked_avg_pool)
    M_{b,p}   = cos(F_{b,:,p}, mu_{b,y_bp})      for y_bp in [0, K)
              = cos(F_{b,:,p}, F_{b,:,p})        otherwise (ignore label: 1, or 0 for an all-zero feature)
    cos(x, z) = x.z / (max(|x|, 1e-8) * max(|z|, 1e-8))                         (torch.nn.CosineSimilarity)
    L = CE + ifvd_weight * (1 / (B*h*w)) * sum_{b,p} (M^s_{b,p} - M^t_{b,p})^2   (nn.MSELoss(), every pixel)

The student's and the teacher's maps each come from their own features, so the channel counts may differ and
there is no connector; the gradient reaches the student's features both directly and through its centres.

Source: CriterionIFV of the authors' code (YukangWang/IFVD utils/criterion.py), copied unchanged into
TorchDistiller (SemSeg-distill/utils/criterion.py) and CIRKD (losses/ifvd.py), which this follows term by
term: labels resized by nn.Upsample(mode='nearest') to the student's feature size; `center_feat = feat.clone()`
then overwritten class by class for k in range(num_classes), so a pixel of no class (ignore 255) keeps its own
feature as "centre"; centres divide by (count + 1e-6), which a cosine similarity cannot see (it is invariant to
the positive factor count / (count + 1e-6)), hence masked_avg_pool's division by the count; the MSE is
nn.MSELoss()'s mean over all B*h*w pixels, ignored ones included (they add 0 unless one side's feature is 0).
CIRKD applies it to `s_outputs[-1]`, DeepLabV3's head feature before the classifier (train_kd.py), and
TorchDistiller / IFVD to PSPNet's `x_feat_after_psp`: our `decoder` position. Both taps are taken after the
head's Dropout(0.1) in training mode; SegOutput.decoder is before it (not reproduced, as for apd).

Weight: 20, CIRKD's scripts/train_kd/train_ifvd.sh (`--lambda-ifv 20.`, with --lambda-kd 1.0 in CIRKD's
pixel-mean KD unit and adversarial terms), the value behind CIRKD's IFVD baselines. The authors' IFVD options.py
(and TorchDistiller's) default to lambda_ifv = 200 next to lambda_kd = 10 in KLDivLoss()'s element unit.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from engine.methods.base import Method, labels_at
from engine.settings import at_least, setting

COS_EPS = 1e-8  # torch.nn.CosineSimilarity's default, as in the reference code


@dataclass
class IFVDSettings:
    ifvd_weight: float = setting(20.0, "ifvd: weight of the MSE between the pixel-to-class-centre cosine maps "
                                       "(CIRKD's lambda_ifv; the IFVD authors' code uses 200)", check=at_least(0))


def class_centre_similarity(feat, labels, num_classes, ignore_index=255):
    """M [B, h, w] fp32: each pixel's cosine similarity to the mean feature of its class in its image (see the
    module docstring); a pixel labelled outside [0, K) or `ignore_index` is compared with itself.

    feat: [B, C, h, w] (NCHW or channels-last, any float dtype); labels: [B, h, w] integer at feature resolution.
    The [B, C, h, w] map of centres is never built: the dot products come from one batched matmul of the
    [B, K, C] centres with the features, gathered at each pixel's label.
    """
    b, c = feat.shape[:2]
    # fp32 throughout, autocast or not (the torch path of the centres is a bmm): the maps differ by small amounts
    with torch.autocast(feat.device.type, enabled=False):
        centres, _ = kernels.masked_avg_pool(feat, labels, num_classes, ignore_index)  # [B, K, C] fp32
        f = feat.float().reshape(b, c, -1)  # [B, C, hw]: a view of fp32 NCHW / channels-last, a copy of 16-bit
        y = labels.reshape(b, -1)  # [B, hw]
        valid = (y >= 0) & (y < num_classes) & (y != ignore_index)
        idx = torch.where(valid, y, 0).long()  # [B, hw]
        dots = torch.bmm(centres, f).gather(1, idx[:, None])[:, 0]  # [B, K, hw] -> [B, hw]
        f_norm = torch.linalg.vector_norm(f, dim=1)  # [B, hw]
        f_den = f_norm.clamp_min(COS_EPS)
        c_den = torch.linalg.vector_norm(centres, dim=2).clamp_min(COS_EPS).gather(1, idx)  # [B, K] -> [B, hw]
        self_sim = (f_norm / f_den) ** 2  # cos(f, f): 1, or 0 for an all-zero feature, as the reference
        sim = torch.where(valid, dots / (f_den * c_den), self_sim)
    return sim.reshape(b, *feat.shape[2:])


class IFVD(Method):
    settings = IFVDSettings
    positioned = True
    default_position = "decoder"

    def forward(self, s, t, batch):
        fs, ft = self.features(s), self.features(t)
        if ft.shape[-2:] != fs.shape[-2:]:  # the reference resizes labels to the student's size for both
            ft = F.interpolate(ft.float(), size=fs.shape[-2:], mode="bilinear", align_corners=False)
        labels = labels_at(batch["label"], fs.shape[-2:])  # [B, h, w]
        m_s = class_centre_similarity(fs, labels, self.num_classes, self.ignore_index)
        with torch.no_grad():  # the teacher is frozen: its map is a target
            m_t = class_centre_similarity(ft, labels, self.num_classes, self.ignore_index)
        return {"ifvd": self.cfg.ifvd_weight * F.mse_loss(m_s, m_t)}
