"""`kd`: per-pixel knowledge distillation on logits (Hinton et al., 2015; per-pixel form of SKD, CVPR 2019).

    L = CE + kd_weight * T^2 * mean_{pixels} KL(softmax(z_t/T) || softmax(z_s/T))     (kernels.pixel_kl)

Defaults: T = 1, kd_weight = 1. CIRKD's CriterionKD computes the same quantity (F.kl_div(..., 'batchmean')
over the [B*H*W, C] permuted logits, times T^2), so its lambda_kd = 1 carries over unchanged. Distilled at
feature resolution (the logits every model returns), not after upsampling: the same distributions, 64x cheaper.
"""
from dataclasses import dataclass

import kernels
from engine.methods.base import Method
from engine.settings import at_least, setting


@dataclass
class KDSettings:
    kd_weight: float = setting(1.0, "kd: weight of T^2-scaled per-pixel KL (CIRKD/SKD use 1 at T = 1); also dfss's "
                                    "KD weight", check=at_least(0))


class KD(Method):
    settings = KDSettings

    def forward(self, s, t, batch):
        return {"kd": kernels.pixel_kl(s.logits, t.logits, self.cfg.temperature, scale=self.cfg.kd_weight)}
