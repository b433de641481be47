"""Segmentation models: backbone -> decoder head -> dropout -> 1x1 classifier, and the named constructors.

The full-size models follow the distillation literature's teacher / student pairs (CIRKD, Yang et al.,
CVPR 2022): PSPNet / DeepLabV3 on dilated ResNet-18/50/101 or MobileNetV2, output stride 8. The
`*_small` (teacher) and `*_tiny` (student) variants are CPU-sized ResNets for the default run; their sizes
live in SMALL and TINY below, the one place to retune them.
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch.nn as nn
from torch import Tensor

from .heads import DeepLabHead, PSPHead
from .mobilenetv2 import mobilenet_v2
from .resnet import (BasicBlock, ResNet, pspnet_dilations, resnet18, resnet18d, resnet50, resnet50d, resnet101,
                     resnet101d)


class SegOutput(NamedTuple):
    backbone: Tensor  # [B, Cb, h, w] last backbone feature
    decoder: Tensor   # [B, Cd, h, w] decoder feature, before dropout + classifier
    logits: Tensor    # [B, K, h, w] at feature resolution, h = ceil(H / 8), w = ceil(W / 8)
    aux: Optional[Tensor] = None  # [B, K, h, w] auxiliary head's logits: training mode with an aux head only


class FCNHead(nn.Sequential):
    """The auxiliary head of PSPNet (Zhao et al., CVPR 2017, sec. 4.1: "deep supervision" on res4b22, weight 0.4),
    as semseg's and APD's model/pspnet.py build it: 3x3 conv (no bias) -> BN -> ReLU -> Dropout2d(0.1) -> 1x1 conv
    to the classes. [B, C, h, w] -> [B, K, h, w]. CIRKD's `_FCNHead` differs in width only (C / 4 channels)."""

    def __init__(self, in_channels, num_classes, width=256, dropout=0.1):
        super().__init__(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(inplace=True), nn.Dropout2d(dropout), nn.Conv2d(width, num_classes, 1))


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
        self.aux = None
        self.num_classes = num_classes
        self.channels = {"backbone": backbone.out_channels, "decoder": head.out_channels, "logits": num_classes}

    def add_aux_head(self):
        """Give the model an auxiliary FCNHead on the backbone's `aux_channels` feature (ResNet layer3,
        MobileNetV2 features.13), used in training mode only (--aux-weight); returns self."""
        self.aux = FCNHead(self.backbone.aux_channels, self.num_classes)
        return self

    def forward(self, x):
        aux = None
        if self.aux is not None and self.training:
            mid, feat = self.backbone.forward_with_mid(x)  # [B, Ca, h, w], [B, Cb, h, w]
            aux = self.aux(mid)                            # [B, K, h, w]
        else:
            feat = self.backbone(x)                        # [B, Cb, h, w]
        dec = self.head(feat)                              # [B, Cd, h, w]
        logits = self.classifier(self.dropout(dec))        # [B, K, h, w]
        return SegOutput(feat, dec, logits, aux)


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


# Deep-stem ResNets (conv1..conv3 3x3 stem) in the key layout of the ImageNet checkpoints that CIRKD and APD
# load (resnet18-imagenet.pth, resnet101-imagenet.pth, resnet50_v2.pth, resnet101_v2.pth); see resnet.py.
# `*_r{18,50,101}d` dilate as winycg/CIRKD models/base_models/resnetv1b.py does (CIRKD's DeepLabV3 and
# PSPNet; APD on Pascal Context). `pspnet_*d_apd` dilate as dvlab-research/APD model/pspnet.py (from
# hszhao/semseg model/pspnet.py) does on ADE20K and Cityscapes, its released PSPNet-R18 / R101 pairs.

def pspnet_r18d(num_classes):
    return Segmentor(resnet18d(), PSPHead(512, 512), num_classes)


def pspnet_r50d(num_classes):
    return Segmentor(resnet50d(), PSPHead(2048, 512), num_classes)


def pspnet_r101d(num_classes):
    return Segmentor(resnet101d(), PSPHead(2048, 512), num_classes)


def deeplabv3_r18d(num_classes):
    return Segmentor(resnet18d(), DeepLabHead(512, 256), num_classes)


def deeplabv3_r50d(num_classes):
    return Segmentor(resnet50d(), DeepLabHead(2048, 256), num_classes)


def deeplabv3_r101d(num_classes):
    return Segmentor(resnet101d(), DeepLabHead(2048, 256), num_classes)


def pspnet_r18d_apd(num_classes):
    return Segmentor(resnet18d(pspnet_dilations), PSPHead(512, 512), num_classes)


def pspnet_r50d_apd(num_classes):
    return Segmentor(resnet50d(pspnet_dilations), PSPHead(2048, 512), num_classes)


def pspnet_r101d_apd(num_classes):
    return Segmentor(resnet101d(pspnet_dilations), PSPHead(2048, 512), num_classes)


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
    "pspnet_r18d": pspnet_r18d,
    "pspnet_r50d": pspnet_r50d,
    "pspnet_r101d": pspnet_r101d,
    "deeplabv3_r18d": deeplabv3_r18d,
    "deeplabv3_r50d": deeplabv3_r50d,
    "deeplabv3_r101d": deeplabv3_r101d,
    "pspnet_r18d_apd": pspnet_r18d_apd,
    "pspnet_r50d_apd": pspnet_r50d_apd,
    "pspnet_r101d_apd": pspnet_r101d_apd,
}


def without_aux(state):
    """A Segmentor state dict without its auxiliary head (`aux.*`): what a trained model is used with (a frozen
    teacher, evaluation, export), where the head is not run."""
    return {k: v for k, v in state.items() if not k.startswith("aux.")}


def build_model(name, num_classes, aux=False) -> Segmentor:
    """MODELS[name](num_classes), with an auxiliary head when `aux`; errors name the bad value."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    model = MODELS[name](num_classes)
    return model.add_aux_head() if aux else model
