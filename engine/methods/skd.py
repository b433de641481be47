"""`skd`: the pair-wise term of structured knowledge distillation (Liu et al., "Structured Knowledge
Distillation for Semantic Segmentation", CVPR 2019 / TPAMI 2020): the student matches the teacher's cosine
similarity between every pair of pixels of a feature map.

    f = maxpool_{k x k, stride k, ceil_mode}(feature)           k = skd_pool (CIRKD: 2; 1 = no pooling)
    F = f / max(||f||_2 over channels, 1e-12)                     per pixel, F: [C, N], N = h' * w'
    A = F^T F                                                     [N, N] pixel-pair cosine similarities
    L = CE + skd_weight * 1/(B N^2) * sum_{b,i,j} (A_s - A_t)_ij^2        (kernels.pairwise_similarity_loss)

Source: winycg/CIRKD (commit dab64db) losses/skd.py, CriterionStructuralKD.forward: MaxPool2d((2, 2), (2, 2),
padding=0, ceil_mode=True) on both features, F.normalize(p=2, dim=1), bmm(F^T, F) for each, then
`((S_sim_map - T_sim_map)**2).mean()` over [B, N, N], i.e. exactly the normalisation above. train_kd.py
l. 343-344 applies it to `s_outputs[-1], t_outputs[-1]`, which models/deeplabv3.py (_DeepLabHead.forward)
returns as `x_feat_after_aspp`: ASPP then the 3x3 conv + BN + ReLU and its Dropout(0.1) (`self.block[0:4]`), before
the classifier, i.e. this engine's "decoder" feature, the default position here (taken before the dropout, as
for ifvd and apd). Weight: scripts/train_kd/train_skd.sh passes
`--lambda-skd 10` (as did train_scripts/train_kd/train_skd.sh at commit 2d8ad0f), the default here.

The loss compares N x N similarity maps, so the two channel counts need not agree: no connector. It is
computed from three C x C Gram matrices, never the N x N maps (see kernels/pairwise.py), so pooling is not
needed for memory; it is kept as the default because it changes the loss (the published weight goes with
it). Student and teacher features of different spatial sizes: the student's is resized (bilinear) first.

SKD's pixel-wise term is `kd` (CIRKD: --lambda-kd 1 at T = 1), and its adversarial holistic term is a method of
its own: `--method kd+skd` is the pixel-wise + pair-wise SKD; CIRKD's tables also add `adv` (`--method
kd+skd+adv`, the recipe skd_cityscapes_r18).
"""
from dataclasses import dataclass

import torch.nn.functional as F

import kernels
from engine.methods.base import Method
from engine.settings import at_least, setting


@dataclass
class SKDSettings:
    skd_weight: float = setting(10.0, "skd: weight of the pair-wise similarity loss (CIRKD's --lambda-skd 10)",
                                check=at_least(0))
    skd_pool: int = setting(2, "skd: max-pool size and stride (ceil_mode) applied to both features before the "
                               "similarities, as CIRKD's 2x2; 1 = none", check=at_least(1))


class SKD(Method):
    settings = SKDSettings
    positioned = True
    default_position = "decoder"

    def pool(self, x):
        k = self.cfg.skd_pool
        return x if k == 1 else F.max_pool2d(x, kernel_size=k, stride=k, padding=0, ceil_mode=True)

    def forward(self, s, t, batch):
        fs, ft = self.features(s), self.features(t)  # [B, C_s, h, w], [B, C_t, h, w]
        if fs.shape[-2:] != ft.shape[-2:]:
            fs = F.interpolate(fs, size=ft.shape[-2:], mode="bilinear", align_corners=False)
        loss = kernels.pairwise_similarity_loss(self.pool(fs), self.pool(ft))
        return {"skd": self.cfg.skd_weight * loss}
