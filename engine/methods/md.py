"""`md`: magnitude distillation, matching only the norm of the feature (Liu et al., "Rethinking Knowledge
Distillation with Raw Features for Semantic Segmentation", WACV 2024).

    L = CE + md_weight * mean_b (1/N) * (||F_t,b||_2 - ||r(F_s,b)||_2)^2,   N = C*H*W

The complement of angular distillation (lad/cad/pad), which matches only the direction. Default weight 1.
"""
from dataclasses import dataclass

from engine.methods.base import FeatureMethod
from engine.settings import at_least, setting


@dataclass
class MDSettings:
    md_weight: float = setting(1.0, "md: weight of the magnitude term", check=at_least(0))


class MD(FeatureMethod):
    settings = MDSettings

    def forward(self, s, t, batch):
        fs, ft = self.pair(s, t)
        n = fs[0].numel()
        gap = ft.float().flatten(1).norm(dim=1) - fs.float().flatten(1).norm(dim=1)  # [B]
        return {"md": self.cfg.md_weight * (gap.pow(2) / n).mean()}
