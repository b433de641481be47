"""Loading ImageNet weights into a segmentation backbone: torchvision's checkpoints, and the deep-stem
ResNet checkpoints of the segmentation codebases (see resnet.py), whose keys are loaded as they are."""
import os
from collections.abc import Mapping

import torch

SHOWN = 8  # keys listed per kind of mismatch in an error message


def _listing(title, items):
    items = sorted(items)
    more = f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:SHOWN]) + more


def _state_dict_of(obj, path):
    """The tensor mapping inside a checkpoint: a plain state dict, or one under "state_dict" / "model"."""
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"pretrained backbone checkpoint {path!r} is not a state dict (a mapping of names to "
                         f"tensors, possibly under 'state_dict' or 'model'); got {type(obj).__name__}")
    # DataParallel / DDP checkpoints prefix every key with "module.".
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _stem_hint(state, expected):
    """One line when the file and the backbone disagree on the ResNet stem, the likely cause of a mismatch."""
    file_deep, model_deep = "conv3.weight" in state, "conv3.weight" in expected
    if file_deep and not model_deep and "conv1.weight" in expected:
        return ("\n  the file has a deep 3x3 stem (conv1, conv2, conv3: resnet18-imagenet.pth, resnet101_v2.pth, "
                "...): load it into a deep-stem model (*_r18d, *_r50d, *_r101d, pspnet_*d_apd)")
    if model_deep and not file_deep and "conv1.weight" in state:
        return ("\n  the model has a deep 3x3 stem but the file has not (a torchvision checkpoint?): load it into "
                "the model without the 'd' suffix (pspnet_r18, deeplabv3_r101, ...)")
    return ""


def load_pretrained_backbone(model, path):
    """Load an ImageNet checkpoint into `model.backbone`: torchvision's resnet18/50/101 and mobilenet_v2
    into the 7x7-stem models, the deep-stem checkpoints of CIRKD / APD / semseg (resnet18-imagenet.pth,
    resnet101-imagenet.pth, resnet50_v2.pth, resnet101_v2.pth; conv1..conv3 stem) into the `*d` models.

    Keys of the ImageNet classifier that the backbone does not have (the backbone's `imagenet_only`
    prefixes: `fc.*`; `classifier.*` and `features.18.*`) are dropped, the rest must match the backbone
    exactly in names and shapes. BatchNorm `num_batches_tracked` may be absent: torchvision's older
    checkpoints predate it, and BatchNorm itself accepts them the same way (the counter restarts at 0).
    Nothing is loaded unless everything matches.

    Raises FileNotFoundError for a missing file, ValueError for an unreadable one or one that does not
    match; both name the file, the ValueError lists missing / unexpected keys and shape mismatches.
    """
    path = os.fspath(path)
    backbone = getattr(model, "backbone", model)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained backbone checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types (pickle, zip, EOF, ...); all mean "unreadable"
        raise ValueError(f"cannot read pretrained backbone checkpoint {path!r}: {type(e).__name__}: {e}") from e
    state = _state_dict_of(obj, path)
    state = {k: v for k, v in state.items() if not k.startswith(backbone.imagenet_only)}

    expected = backbone.state_dict()
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v)
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    wrong_shape = [f"{k} file {list(state[k].shape)} vs model {list(expected[k].shape)}"
                   for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        msg = (f"pretrained backbone checkpoint {path!r} does not fit the {type(backbone).__name__} backbone "
               f"(ignored ImageNet-only keys {', '.join(p + '*' for p in backbone.imagenet_only)}):")
        if missing:
            msg += _listing("missing keys", missing)
        if unexpected:
            msg += _listing("unexpected keys", unexpected)
        if wrong_shape:
            msg += _listing("shape mismatches", wrong_shape)
        msg += _stem_hint(state, expected)
        raise ValueError(msg)
    backbone.load_state_dict(state, strict=True)
