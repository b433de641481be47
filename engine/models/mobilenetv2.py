"""Dilated MobileNetV2 backbone (output stride 8) with torchvision's parameter names.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018. Its section 6.3
uses the dilated trunk for DeepLabV3 at output stride 8; here the stride-2 blocks `features.7` and
`features.14` get stride 1, blocks 7..13 use dilation 2 and blocks 14..17 dilation 4 in their depthwise
convs. The backbone ends at `features.17` (320 channels): torchvision's `features.18` (1x1 conv to 1280)
and `classifier.*` belong to the ImageNet classifier and are not built.
"""
import torch.nn as nn

# torchvision's inverted_residual_setting: expansion t, output channels c, repeats n, stride s.
SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def conv_bn_relu6(cin, cout, kernel=3, stride=1, dilation=1, groups=1):
    """torchvision's Conv2dNormActivation(..., activation_layer=ReLU6): keys `.0.weight`, `.1.*`."""
    padding = (kernel - 1) // 2 * dilation
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, dilation=dilation, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t = 1) -> 3x3 depthwise (strided / dilated) -> 1x1 linear projection."""

    def __init__(self, inp, oup, stride, expand_ratio, dilation=1):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [conv_bn_relu6(inp, hidden, kernel=1)] if expand_ratio != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, stride=stride, dilation=dilation, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, bias=False),
                   nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """`features.0..17` of torchvision's mobilenet_v2 at output stride 8.

    x [B, 3, H, W] -> [B, 320, ceil(H/8), ceil(W/8)].
    """

    imagenet_only = ("classifier.", "features.18.")

    def __init__(self):
        super().__init__()
        features = [conv_bn_relu6(3, 32, stride=2)]
        inp, current_stride, dilation = 32, 2, 1
        for t, c, n, s in SETTING:
            for i in range(n):
                stride = s if i == 0 else 1
                if stride == 2 and current_stride == 8:
                    # Past output stride 8 a stride-2 block becomes stride 1 and it and every later block
                    # dilate by the stride that was dropped (features.7: 2, features.14: 4).
                    stride, dilation = 1, dilation * 2
                current_stride *= stride
                features.append(InvertedResidual(inp, c, stride, t, dilation))
                inp = c
        self.features = nn.Sequential(*features)
        self.out_channels = inp
        self.aux_channels = 96  # features.13, see forward_with_mid

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.features(x)  # [B, 320, H/8, W/8]

    def forward_with_mid(self, x):
        """-> (features.13's output [B, 96, H/8, W/8], the last feature): the input of the auxiliary head, the
        end of the stride-16 stage of the undilated network, the place of a ResNet's layer3."""
        mid = self.features[:14](x)
        return mid, self.features[14:](mid)


def mobilenet_v2():
    return MobileNetV2()
