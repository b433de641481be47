"""Datasets and loaders: `build_dataset(name, split, ...)`, `build_train_loader`, `build_val_loader`.

Every dataset returns `{"image": float32 [3, H, W] normalised, "label": int64 [H, W] (255 = ignore),
"index": int}` and carries `name`, `num_classes`, `class_names`, `palette`, `ignore_index`, `mean`, `std`.
The loaders yield the same structure batched, from a torch DataLoader or a DALI pipeline (`loader=`).
"""
from engine.data.ade20k import ADE20K
from engine.data.base import SegmentationDataset
from engine.data.camvid import CamVid
from engine.data.cityscapes import Cityscapes
from engine.data.files import BadSampleError, FileSegmentation, SkipLog
from engine.data.loader import LOADERS, build_train_loader, build_val_loader, resolve_loader
from engine.data.nyuv2 import NYUv2
from engine.data.pascal_context import PascalContext, PascalContext59
from engine.data.synthetic import SyntheticSegmentation
from engine.data.voc import PascalVOC

DATASETS = {"synthetic": SyntheticSegmentation, "camvid": CamVid, "cityscapes": Cityscapes, "ade20k": ADE20K,
            "voc": PascalVOC, "pascal_context": PascalContext, "pascal_context59": PascalContext59, "nyuv2": NYUv2}


def build_dataset(name, split, *, root="", train=False, crop=(64, 64), scale=(0.5, 2.0), flip=True, rotate=0.0,
                  seed=0, skip_bad=False):
    """The dataset `name` (a key of DATASETS) for `split`; train=True turns on the augmentation of transforms.py.

    `seed` is the augmentation seed of the run (sample key k is augmented from (seed, k)); it does not change
    the images of `synthetic`, which are fixed. `skip_bad` skips unreadable files of on-disk datasets (counted,
    see engine/data/files.py); `synthetic` has none.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
    klass = DATASETS[name]
    extra = {"skip_bad": skip_bad} if issubclass(klass, FileSegmentation) else {}
    return klass(split, root=root, train=train, crop=crop, scale=scale, flip=flip, rotate=rotate, seed=seed,
                 **extra)


__all__ = ["DATASETS", "LOADERS", "build_dataset", "build_train_loader", "build_val_loader", "resolve_loader",
           "SegmentationDataset", "FileSegmentation", "BadSampleError", "SkipLog", "SyntheticSegmentation",
           "CamVid", "Cityscapes", "ADE20K", "PascalVOC", "PascalContext", "PascalContext59", "NYUv2"]
