"""Decoder heads: PSPNet's pyramid pooling and DeepLabV3's ASPP (CIRKD / torchvision structure).

Each head maps the backbone feature [B, Cb, h, w] to the decoder feature [B, out_channels, h, w], the
feature that distillation methods read at position "decoder"; dropout and the 1x1 classifier come after
it, in the Segmentor. Upsampling is bilinear with align_corners=False (torchvision's choice; CIRKD uses
True, which only shifts the sub-pixel grid of the pooled maps).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn_relu(cin, cout, kernel=1, dilation=1):
    padding = (kernel - 1) // 2 * dilation
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PyramidPooling(nn.Module):
    """Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017, section 3.2.

    For each bin size b: adaptive average pool to b x b -> 1x1 conv to C/4 -> BN -> ReLU -> bilinear
    upsample back to h x w; the branches are concatenated with the input:
    [B, C, h, w] -> [B, C + len(bins) * (C // 4), h, w]  (2C for the usual four bins).
    """

    def __init__(self, in_channels, bins=(1, 2, 3, 6)):
        super().__init__()
        branch = in_channels // 4
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *conv_bn_relu(in_channels, branch)) for b in bins)
        self.out_channels = in_channels + len(bins) * branch

    def forward(self, x):
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size, mode="bilinear", align_corners=False) for stage in self.stages]
        return torch.cat([x, *pooled], dim=1)


class PSPHead(nn.Sequential):
    """Pyramid pooling -> 3x3 conv -> BN -> ReLU: [B, C, h, w] -> [B, out_channels, h, w]."""

    def __init__(self, in_channels, out_channels=512, bins=(1, 2, 3, 6)):
        ppm = PyramidPooling(in_channels, bins)
        super().__init__(ppm, *conv_bn_relu(ppm.out_channels, out_channels, kernel=3))
        self.out_channels = out_channels


class ASPP(nn.Module):
    """Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation" (DeepLabV3), 2017, sec. 3.3.

    Five parallel branches of `width` channels each: 1x1 conv, three 3x3 convs with dilation `rates`
    (12, 24, 36 at output stride 8), and image pooling (global average -> 1x1 conv -> upsample);
    every conv is followed by BN -> ReLU. The concatenation [B, 5 * width, h, w] is projected by
    1x1 conv -> BN -> ReLU -> Dropout(dropout) to [B, width, h, w]. Module names follow torchvision's.
    """

    def __init__(self, in_channels, rates=(12, 24, 36), width=256, dropout=0.5):
        super().__init__()
        self.convs = nn.ModuleList([conv_bn_relu(in_channels, width)])
        self.convs.extend(conv_bn_relu(in_channels, width, kernel=3, dilation=r) for r in rates)
        self.convs.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(in_channels, width)))
        self.project = nn.Sequential(*conv_bn_relu(width * (len(rates) + 2), width), nn.Dropout(dropout))

    def forward(self, x):
        size = x.shape[-2:]
        *branches, pooling = self.convs
        feats = [branch(x) for branch in branches]
        feats.append(F.interpolate(pooling(x), size, mode="bilinear", align_corners=False))  # [B, width, 1, 1] -> h, w
        return self.project(torch.cat(feats, dim=1))  # [B, 5 * width, h, w] -> [B, width, h, w]


class DeepLabHead(nn.Sequential):
    """ASPP -> 3x3 conv -> BN -> ReLU (torchvision's DeepLabHead without its classifier):
    [B, C, h, w] -> [B, width, h, w]."""

    def __init__(self, in_channels, width=256, rates=(12, 24, 36), aspp_dropout=0.5):
        super().__init__(ASPP(in_channels, rates, width, aspp_dropout), *conv_bn_relu(width, width, kernel=3))
        self.out_channels = width
