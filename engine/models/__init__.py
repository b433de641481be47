"""Segmentation models: dilated (output stride 8) ResNet / MobileNetV2 backbones with torchvision's
parameter names, deep-stem ResNets (`*_r18d`, ...) with those of CIRKD's / APD's ImageNet checkpoints,
PSPNet and DeepLabV3 heads.

    model = build_model("pspnet_r18", num_classes=19)
    load_pretrained_backbone(model, "resnet18-f37072fd.pth")   # torchvision ImageNet weights
    load_pretrained_backbone(build_model("deeplabv3_r18d", 19), "resnet18-imagenet.pth")  # CIRKD's / APD's
    out = model(x)          # SegOutput(backbone, decoder, logits), each [B, C, ceil(H/8), ceil(W/8)]
    model.channels          # {"backbone": 512, "decoder": 512, "logits": 19}
"""
from .cost import model_cost
from .pretrained import load_pretrained_backbone
from .segmentor import MODELS, SMALL, TINY, SegOutput, Segmentor, SmallSize, build_model, without_aux

__all__ = ["model_cost", "MODELS", "SMALL", "TINY", "SegOutput", "Segmentor", "SmallSize", "build_model",
           "load_pretrained_backbone", "without_aux"]
