"""Dilated ResNet backbones (output stride 8): torchvision's 7x7 stem, or the deep 3x3 stem of the
segmentation codebases' ImageNet checkpoints.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (v1.5: the stride of a bottleneck
sits on its 3x3 conv, as in torchvision and in all the codebases below). Output stride 8 as in Yu & Koltun,
"Dilated Residual Networks" (CVPR 2017): layer3 and layer4 keep stride 1 (their downsample 1x1 conv too)
and dilate their 3x3 convs by 2 and 4. Which 3x3 convs get which dilation differs between codebases; see
the three `*_dilations` rules below. Every 3x3 conv has padding = dilation, so the rule adds no
parameters and changes no name.

Stems (both followed by a 3x3 stride-2 max pool):
  "7x7"  torchvision: conv1 7x7 3->w s2, bn1. Keys are torchvision's resnet18/50/101 keys minus `fc.*`.
  "deep" conv1 3x3 3->w s2, bn1, conv2 3x3 w->w, bn2, conv3 3x3 w->2w, bn3 (w = 64), so layer1 starts from
         2w = 128 channels and its first block has a downsample even in ResNet-18 (128 -> 64). This is
         the stem of the ResNets released with PSPNet (Zhao et al., CVPR 2017; He et al., "Bag of Tricks
         for Image Classification with CNNs", CVPR 2019, call it ResNet-C, there with widths 32, 32, 64),
         with the flat key layout of the ImageNet checkpoints those codebases load
         (resnet18-imagenet.pth, resnet50_v2.pth, resnet101_v2.pth, resnet101-imagenet.pth):
         hszhao/semseg model/resnet.py (ResNet(deep_base=True)), used unchanged by dvlab-research/APD
         model/resnet.py; CSAILVision/semantic-segmentation-pytorch mit_semseg/models/resnet.py (the
         origin of resnet18-imagenet.pth); winycg/CIRKD models/base_models/resnetv1b.py
         (ResNetV1b(deep_stem=True), `resnet*_v1s`). All four name the stem conv1/bn1/conv2/bn2/conv3/bn3
         at the top level, blocks as torchvision does, and (except CIRKD's module) keep the `fc.*`
         classifier; `fc.*` is dropped at load (`imagenet_only`).
"""
import torch.nn as nn


def conv3x3(cin, cout, stride=1, dilation=1, groups=1):
    """3x3 conv whose padding equals its dilation, so that at stride 1 it keeps H, W."""
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


# Dilation rules: (n3x3, i, dilation, previous) -> one dilation per 3x3 conv of block i of a stage, first
# the conv that carries the stage's stride (BasicBlock conv1, Bottleneck conv2), then BasicBlock conv2.
# `dilation` is the stage's (1, 1, 2, 4 for layer1..4), `previous` the stage before's (1, 1, 1, 2).

def torchvision_dilations(n3x3, i, dilation, previous):
    """torchvision `replace_stride_with_dilation=[False, True, True]` (torchvision/models/resnet.py),
    extended to BasicBlock: every 3x3 conv of block 0 keeps the previous dilation, the others use the new
    one. layer3: (1, 1), (2, 2); layer4: (2, 2), (4, 4)."""
    return ((previous if i == 0 else dilation),) * n3x3


def cirkd_dilations(n3x3, i, dilation, previous):
    """winycg/CIRKD models/base_models/resnetv1b.py `ResNetV1b._make_layer(dilation=2 / 4)` (GluonCV's
    ResNetV1b): in block 0 the strided conv keeps the previous dilation and BasicBlock's conv2 takes the
    new one; every other 3x3 conv takes the new one. BasicBlock layer3: (1, 2), (2, 2); layer4: (2, 4),
    (4, 4). Bottleneck: as torchvision. dvlab-research/APD model/pspnet.py dilates this way too, but only on
    Pascal Context (its `args.classes == 60` branch)."""
    return ((previous if i == 0 else dilation),) + (dilation,) * (n3x3 - 1)


def pspnet_dilations(n3x3, i, dilation, previous):
    """hszhao/semseg model/pspnet.py and dvlab-research/APD model/pspnet.py (ADE20K, Cityscapes): module
    surgery after construction sets dilation d (2 in layer3, 4 in layer4) and stride 1 on the strided conv
    of every block (`key_conv`: Bottleneck conv2; BasicBlock conv1, in APD, which adds ResNet-18) and leaves
    BasicBlock conv2 at dilation 1. BasicBlock layer3: (2, 1) in every block; layer4: (4, 1).
    Bottleneck: 2 in every block of layer3, 4 in layer4 (block 0 included, unlike torchvision)."""
    return (dilation,) + (1,) * (n3x3 - 1)


class BasicBlock(nn.Module):
    expansion = 1
    n3x3 = 2  # 3x3 convs per block, the length of its `dilation` tuple

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        d1, d2 = (dilation, dilation) if isinstance(dilation, int) else dilation
        self.conv1 = conv3x3(inplanes, planes, stride, d1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, d2)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4
    n3x3 = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        (d,) = (dilation,) if isinstance(dilation, int) else dilation
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, d)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk without avgpool/fc, dilated to output stride 8.

    `width` is the stem width and the width of layer1 (64 in ResNet-18/50/101); layers 2..4 double it
    each time, so the output has 8 * width * expansion channels. `stem` is "7x7" or "deep" and
    `dilations` one of the rules above (see the module docstring).
    x [B, 3, H, W] -> [B, out_channels, ceil(H/8), ceil(W/8)].
    """

    # Keys of an ImageNet checkpoint that are not part of this backbone.
    imagenet_only = ("fc.",)

    def __init__(self, block, layers, width=64, stem="7x7", dilations=torchvision_dilations):
        super().__init__()
        if stem == "7x7":
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.inplanes = width
        elif stem == "deep":
            self.conv1 = conv3x3(3, width, stride=2)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = conv3x3(width, width)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = conv3x3(width, width * 2)
            self.bn3 = nn.BatchNorm2d(width * 2)
            self.inplanes = width * 2
        else:
            raise ValueError(f"unknown ResNet stem {stem!r}; valid: '7x7', 'deep'")
        self.stem, self.dilations, self.dilation = stem, dilations, 1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2, dilate=True)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2, dilate=True)
        self.out_channels = width * 8 * block.expansion
        self.aux_channels = width * 4 * block.expansion  # layer3's, the input of an auxiliary head

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        # Same bookkeeping (and so the same keys) as torchvision's ResNet._make_layer; the dilation of each
        # 3x3 conv comes from self.dilations.
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = []
        for i in range(blocks):
            dilation = self.dilations(block.n3x3, i, self.dilation, previous_dilation)
            if i == 0:
                layers.append(block(self.inplanes, planes, stride, downsample, dilation))
                self.inplanes = planes * block.expansion
            else:
                layers.append(block(self.inplanes, planes, dilation=dilation))
        return nn.Sequential(*layers)

    def forward(self, x):
        return self.forward_with_mid(x)[1]

    def forward_with_mid(self, x):
        """-> (layer3's output [B, 4w*e, H/8, W/8], the input of an auxiliary head; layer4's [B, 8w*e, H/8, W/8])."""
        x = self.relu(self.bn1(self.conv1(x)))                 # [B, w, H/2, W/2]
        if self.stem == "deep":
            x = self.relu(self.bn2(self.conv2(x)))
            x = self.relu(self.bn3(self.conv3(x)))             # [B, 2w, H/2, W/2]
        x = self.maxpool(x)                                    # [B, w or 2w, H/4, W/4]
        x = self.layer2(self.layer1(x))                        # [B, 2w*e, H/8, W/8]
        mid = self.layer3(x)                                   # [B, 4w*e, H/8, W/8]
        return mid, self.layer4(mid)                           # [B, 8w*e, H/8, W/8]


def resnet18():
    return ResNet(BasicBlock, (2, 2, 2, 2))


def resnet50():
    return ResNet(Bottleneck, (3, 4, 6, 3))


def resnet101():
    return ResNet(Bottleneck, (3, 4, 23, 3))


def resnet18d(dilations=cirkd_dilations):
    """Deep-stem ResNet-18 in the key layout of resnet18-imagenet.pth (CIRKD, APD)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), stem="deep", dilations=dilations)


def resnet50d(dilations=cirkd_dilations):
    """Deep-stem ResNet-50 in the key layout of semseg's resnet50_v2.pth."""
    return ResNet(Bottleneck, (3, 4, 6, 3), stem="deep", dilations=dilations)


def resnet101d(dilations=cirkd_dilations):
    """Deep-stem ResNet-101 in the key layout of resnet101_v2.pth (semseg, APD), resnet101-imagenet.pth
    (CIRKD)."""
    return ResNet(Bottleneck, (3, 4, 23, 3), stem="deep", dilations=dilations)
