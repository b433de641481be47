"""Distillation loss math: the only API `engine/` uses. Knows nothing of `engine/`.

Each op lives in one file: its plain-torch reference, its Triton kernels, their launchers, a
`torch.library` custom op (so `torch.compile` traces through it) and the public function below. CUDA
tensors run the fused kernels, anything else the reference; `SEGKD_KERNELS=torch|triton|auto` forces a
path (see `kernels/_dispatch.py`, which also explains `TRITON_INTERPRET` for running kernels on CPU), and
`SEGKD_KERNELS=cuda` runs the C++ kernels of csrc/ (kernels/_cpp.py) for the ops that have them.
"""
from kernels.angular import angular_loss
from kernels.bn_stat import bn_stat_distance
from kernels.channel_kl import channel_kl
from kernels.conv_act import conv_bias_relu
from kernels.ifvd import class_centre_mse
from kernels.masked_avg_pool import masked_avg_pool
from kernels.pairwise import pairwise_similarity_loss
from kernels.pixel_kl import pixel_kl
from kernels.prototype import prototype_ce, prototype_kl, prototype_logits
from kernels.upsampled_ce import upsampled_cross_entropy, upsampled_pixel_kl

# the loss ops (what a method or the task loss calls), and the inference ops of the frozen teacher's forward
LOSS_OPS = ("pixel_kl", "channel_kl", "angular_loss", "masked_avg_pool", "bn_stat_distance", "prototype_logits",
            "prototype_ce", "prototype_kl", "pairwise_similarity_loss", "class_centre_mse", "upsampled_cross_entropy",
            "upsampled_pixel_kl")
INFERENCE_OPS = ("conv_bias_relu",)
__all__ = [*LOSS_OPS, *INFERENCE_OPS]
