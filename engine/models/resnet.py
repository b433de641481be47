"""Dilated ResNet backbones (output stride 8) with torchvision's parameter names.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (v1.5: the stride of a bottleneck
sits on its 3x3 conv, as in torchvision). Output stride 8 as in Yu & Koltun, "Dilated Residual Networks"
(CVPR 2017) and torchvision's `replace_stride_with_dilation=[False, True, True]`: layer3 and layer4 keep
stride 1 and dilate their 3x3 convs by 2 and 4; the first block of each keeps the previous dilation.

The state_dict keys are torchvision's `resnet18/50/101` keys minus `fc.*`, so ImageNet checkpoints load
as they are (see `load_pretrained_backbone`). torchvision refuses dilation in BasicBlock; here both 3x3
convs of a BasicBlock are dilated (padding = dilation), which adds no parameters and keeps the names.
"""
import torch.nn as nn


def conv3x3(cin, cout, stride=1, dilation=1, groups=1):
    """3x3 conv whose padding equals its dilation, so that at stride 1 it keeps H, W."""
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
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

    `width` is the stem width and the width of layer1 (torchvision: 64); layers 2..4 double it each time,
    so the output has 8 * width * expansion channels. x [B, 3, H, W] -> [B, out_channels, ceil(H/8), ceil(W/8)].
    """

    # Keys of a torchvision ImageNet checkpoint that are not part of this backbone.
    imagenet_only = ("fc.",)

    def __init__(self, block, layers, width=64):
        super().__init__()
        self.inplanes, self.dilation = width, 1
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2, dilate=True)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2, dilate=True)
        self.out_channels = width * 8 * block.expansion

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        # Same bookkeeping as torchvision's ResNet._make_layer, so that dilations (and keys) agree.
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [B, w, H/4, W/4]
        x = self.layer2(self.layer1(x))                        # [B, 2w*e, H/8, W/8]
        return self.layer4(self.layer3(x))                     # [B, 8w*e, H/8, W/8]


def resnet18():
    return ResNet(BasicBlock, (2, 2, 2, 2))


def resnet50():
    return ResNet(Bottleneck, (3, 4, 6, 3))


def resnet101():
    return ResNet(Bottleneck, (3, 4, 23, 3))
