"""Segmentation models: backbone -> decoder head -> dropout -> 1x1 classifier, and the named constructors.

The full-size models follow the distillation literature's teacher / student pairs (CIRKD, Yang et al.,
CVPR 2022): PSPNet / DeepLabV3 on dilated ResNet-18/50/101 or MobileNetV2, output stride 8. The
`*_small` (teacher) and `*_tiny` (student) variants are CPU-sized ResNets for the default run; their sizes
live in SMALL and TINY below, the one place to retune them.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch.nn as nn
from torch import Tensor

from .heads import DeepLabHead, PSPHead
from .mobilenetv2 import mobilenet_v2
from .resnet import BasicBlock, ResNet, resnet18, resnet50, resnet101


class SegOutput(NamedTuple):
    backbone: Tensor  # [B, Cb, h, w] last backbone feature
    decoder: Tensor   # [B, Cd, h, w] decoder feature, before dropout + classifier
    logits: Tensor    # [B, K, h, w] at feature resolution, h = ceil(H / 8), w = ceil(W / 8)


class Segmentor(nn.Module):
    """x [B, 3, H, W] -> SegOutput(backbone, decoder, logits), all at output stride 8.

    `classifier` is a bare 1x1 conv (its weight [K, Cd, 1, 1] is what methods that reuse the classifier
    read); the Dropout2d in front of it is a separate module, so that `classifier(decoder)` gives the
    eval-mode logits exactly.
    """

    def __init__(self, backbone, head, num_classes, dropout=0.1):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(head.out_channels, num_classes, 1)
        self.num_classes = num_classes
        self.channels = {"backbone": backbone.out_channels, "decoder": head.out_channels, "logits": num_classes}

    def forward(self, x):
        feat = self.backbone(x)                          # [B, Cb, h, w]
        dec = self.head(feat)                            # [B, Cd, h, w]
        logits = self.classifier(self.dropout(dec))      # [B, K, h, w]
        return SegOutput(feat, dec, logits)


@dataclass(frozen=True)
class SmallSize:
    """A CPU-sized dilated ResNet (BasicBlock, stem conv1 7x7 s2 + maxpool like ResNet-18) and its head."""

    layers: tuple   # BasicBlocks per stage (ResNet-18: 2, 2, 2, 2)
    width: int      # stem and layer1 width; stages are width, 2w, 4w, 8w (ResNet-18: 64)
    decoder: int    # decoder width: PSP's 3x3 conv, DeepLabV3's ASPP and 3x3 conv


SMALL = SmallSize(layers=(2, 2, 2, 2), width=32, decoder=128)  # teacher of the default run
TINY = SmallSize(layers=(1, 1, 1, 1), width=8, decoder=32)     # student of the default run


def _small_resnet(size):
    return ResNet(BasicBlock, size.layers, size.width)


def pspnet_r18(num_classes):
    return Segmentor(resnet18(), PSPHead(512, 512), num_classes)


def pspnet_r50(num_classes):
    return Segmentor(resnet50(), PSPHead(2048, 512), num_classes)


def pspnet_r101(num_classes):
    return Segmentor(resnet101(), PSPHead(2048, 512), num_classes)


def pspnet_mbv2(num_classes):
    return Segmentor(mobilenet_v2(), PSPHead(320, 512), num_classes)


def pspnet_small(num_classes, size=SMALL):
    backbone = _small_resnet(size)
    return Segmentor(backbone, PSPHead(backbone.out_channels, size.decoder), num_classes)


def pspnet_tiny(num_classes, size=TINY):
    return pspnet_small(num_classes, size)


def deeplabv3_r18(num_classes):
    return Segmentor(resnet18(), DeepLabHead(512, 256), num_classes)


def deeplabv3_r50(num_classes):
    return Segmentor(resnet50(), DeepLabHead(2048, 256), num_classes)


def deeplabv3_r101(num_classes):
    return Segmentor(resnet101(), DeepLabHead(2048, 256), num_classes)


def deeplabv3_mbv2(num_classes):
    return Segmentor(mobilenet_v2(), DeepLabHead(320, 256), num_classes)


def deeplabv3_small(num_classes, size=SMALL):
    backbone = _small_resnet(size)
    return Segmentor(backbone, DeepLabHead(backbone.out_channels, size.decoder), num_classes)


def deeplabv3_tiny(num_classes, size=TINY):
    return deeplabv3_small(num_classes, size)


MODELS = {
    "pspnet_r18": pspnet_r18,
    "pspnet_r50": pspnet_r50,
    "pspnet_r101": pspnet_r101,
    "pspnet_mbv2": pspnet_mbv2,
    "pspnet_small": pspnet_small,
    "pspnet_tiny": pspnet_tiny,
    "deeplabv3_r18": deeplabv3_r18,
    "deeplabv3_r50": deeplabv3_r50,
    "deeplabv3_r101": deeplabv3_r101,
    "deeplabv3_mbv2": deeplabv3_mbv2,
    "deeplabv3_small": deeplabv3_small,
    "deeplabv3_tiny": deeplabv3_tiny,
}


def build_model(name, num_classes) -> Segmentor:
    """MODELS[name](num_classes), with errors that name the bad value."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return MODELS[name](num_classes)
