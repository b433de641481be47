"""Segmentation models: dilated (output stride 8) ResNet / MobileNetV2 backbones with torchvision's
parameter names, PSPNet and DeepLabV3 heads.

    model = build_model("pspnet_r18", num_classes=19)
    load_pretrained_backbone(model, "resnet18-f37072fd.pth")   # torchvision ImageNet weights
    out = model(x)          # SegOutput(backbone, decoder, logits), each [B, C, ceil(H/8), ceil(W/8)]
    model.channels          # {"backbone": 512, "decoder": 512, "logits": 19}
"""
from .cost import model_cost
from .pretrained import load_pretrained_backbone
from .segmentor import MODELS, SMALL, TINY, SegOutput, Segmentor, SmallSize, build_model

__all__ = ["model_cost", "MODELS", "SMALL", "TINY", "SegOutput", "Segmentor", "SmallSize", "build_model",
           "load_pretrained_backbone"]
