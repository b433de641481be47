"""`fitnet`: naive feature distillation, the mean squared error between features (Romero et al., FitNets,
ICLR 2015; as the raw-feature baseline of Liu et al., WACV 2024).

    L = CE + fitnet_weight * (1 / (B*C*H*W)) * sum (r(F_s) - F_t)^2

r is a 1x1 conv + BN + ReLU connector when channel counts differ. Default position: last backbone stage;
default weight 1 (the mean over all elements, as F.mse_loss with reduction='mean').
"""
from dataclasses import dataclass

import torch.nn.functional as F

from engine.methods.base import FeatureMethod
from engine.settings import at_least, setting


@dataclass
class FitNetSettings:
    fitnet_weight: float = setting(1.0, "fitnet: weight of the feature MSE", check=at_least(0))


class FitNet(FeatureMethod):
    settings = FitNetSettings

    def forward(self, s, t, batch):
        fs, ft = self.pair(s, t)
        return {"fitnet": self.cfg.fitnet_weight * F.mse_loss(fs.float(), ft.float())}
