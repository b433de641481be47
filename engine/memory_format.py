"""--channels-last: the memory format of the models and the images they are fed."""
import torch


def resolve_channels_last(setting, device):
    """--channels-last auto|on|off -> bool. auto: on with CUDA, where cuDNN's bf16/fp16 convolutions run
    NHWC natively; off on CPU, where the tiny default models gain nothing and pay layout conversions."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"--channels-last {setting!r} is not one of auto, on, off")
    return device.type == "cuda" if setting == "auto" else setting == "on"


def images_to(batch_image, channels_last):
    """An image batch [B, 3, H, W] in the models' memory format."""
    if channels_last and batch_image.dim() == 4:
        return batch_image.contiguous(memory_format=torch.channels_last)
    return batch_image
