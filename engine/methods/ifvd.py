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

The loss is kernels.class_centre_mse (centres, both maps and the MSE: fused on the Triton path, in fp32
whatever the autocast dtype; the teacher's map is a constant target).

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

import torch.nn.functional as F

import kernels
from engine.methods.base import Method, labels_at
from engine.settings import at_least, setting

@dataclass
class IFVDSettings:
    ifvd_weight: float = setting(20.0, "ifvd: weight of the MSE between the pixel-to-class-centre cosine maps "
                                       "(CIRKD's lambda_ifv; the IFVD authors' code uses 200)", check=at_least(0))


class IFVD(Method):
    settings = IFVDSettings
    positioned = True
    default_position = "decoder"

    def forward(self, s, t, batch):
        fs, ft = self.features(s), self.features(t)
        if ft.shape[-2:] != fs.shape[-2:]:  # the reference resizes labels to the student's size for both
            ft = F.interpolate(ft.float(), size=fs.shape[-2:], mode="bilinear", align_corners=False)
        labels = labels_at(batch["label"], fs.shape[-2:])  # [B, h, w]
        loss = kernels.class_centre_mse(fs, ft.detach(), labels, self.num_classes, self.ignore_index)
        return {"ifvd": self.cfg.ifvd_weight * loss}
