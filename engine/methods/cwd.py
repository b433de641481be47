"""`cwd`: channel-wise distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021): each channel's activation map, softmax-normalised over H*W, is a distribution.

    L = CE + cwd_weight * T^2 / (B*C) * sum_{b,c} KL(softmax_hw(z_t,c / T) || softmax_hw(z_s,c / T))

(kernels.channel_kl). Defaults T = 4, weight 3 on logits: CWD's own (their code divides by N*C exactly
as here). `--position backbone|decoder` distils features instead, through a connector if needed.
"""
from dataclasses import dataclass

import kernels
from engine.methods.base import FeatureMethod
from engine.settings import at_least, positive, setting


@dataclass
class CWDSettings:
    cwd_weight: float = setting(3.0, "cwd: weight of the channel-wise KL", check=at_least(0))
    cwd_temperature: float = setting(4.0, "cwd: temperature of the spatial softmax", check=positive)


class CWD(FeatureMethod):
    settings = CWDSettings
    default_position = "logits"

    def forward(self, s, t, batch):
        fs, ft = self.pair(s, t)
        return {"cwd": kernels.channel_kl(fs, ft, self.cfg.cwd_temperature, scale=self.cfg.cwd_weight)}
