"""`lad`, `cad`, `pad`: angular distillation (Liu et al., "Rethinking Knowledge Distillation with Raw
Features for Semantic Segmentation", WACV 2024): match the direction of the features, not their magnitude.

    L = CE + lambda_ad * L_ad + lambda_kd * L_kd

L_ad = kernels.angular_loss(r(F_s), F_t, mode) with mode layer (LAD: one vector per sample), channel
(CAD: one vector per channel over H*W) or point (PAD: one vector per pixel over C); each per-sample value
lies in [0, 4], averaged over the batch (see kernels/angular.py). L_kd = per-pixel KD on logits at
temperature T, in the unit --ad-kd-unit (engine.methods.base.logit_kd):
    element (default): T^2 * sum KL / (B*C*H*W), torch.nn.KLDivLoss()'s default mean
    pixel:             T^2 * sum KL / (B*H*W), CIRKD's CriterionKD ('batchmean' over pixels), C times stronger
Defaults lambda_ad = 10, lambda_kd = 10 (the paper's), features from the last backbone stage; r is a
1x1 conv + BN + ReLU connector when the channel counts differ. The KD term is part of the method: `cad+kd`
adds a second, Hinton KD term on top; `--ad-kd-weight 0` leaves the angular term alone.

The unit of L_kd follows the code behind the paper's numbers, not a reading of its text: the paper takes
lambda_kd = 10 "following" CWD and SKD, and CWD's released code (TorchDistiller SemSeg-distill, lambda_kd = 10)
reduces its KD with torch.nn.KLDivLoss()'s element mean. In the pixel unit the same lambda_kd is C times
stronger; on CamVid (C = 11) that is what put cad below the student alone, with the Tree class collapsing
(issue 19; the controlled runs are in bench/results/angular_camvid_cpu.md).
"""
from dataclasses import dataclass

import kernels
from engine.methods.base import KD_UNITS, FeatureMethod, logit_kd
from engine.settings import at_least, one_of, setting


@dataclass
class AngularSettings:
    """Shared by lad, cad and pad."""
    ad_weight: float = setting(10.0, "lad/cad/pad: lambda_ad, weight of the angular term", check=at_least(0))
    ad_kd_weight: float = setting(10.0, "lad/cad/pad: lambda_kd, weight of the per-pixel KD term that is part of "
                                        "the method", check=at_least(0))
    ad_kd_unit: str = setting("element", "lad/cad/pad: unit of the KD term: element (mean over B*C*H*W, "
                                         "KLDivLoss()'s default, as the authors' code) or pixel (mean over "
                                         "B*H*W, as CIRKD's CriterionKD: C times stronger)",
                              check=one_of(*KD_UNITS))


class _Angular(FeatureMethod):
    settings = AngularSettings
    mode = "layer"

    def forward(self, s, t, batch):
        fs, ft = self.pair(s, t)
        terms = {"ad": self.cfg.ad_weight * kernels.angular_loss(fs, ft, self.mode)}
        if self.cfg.ad_kd_weight:
            terms["kd"] = logit_kd(s.logits, t.logits, self.cfg.temperature, self.cfg.ad_kd_unit,
                                   self.cfg.ad_kd_weight)
        return terms


class LAD(_Angular):
    mode = "layer"


class CAD(_Angular):
    mode = "channel"


class PAD(_Angular):
    mode = "point"
