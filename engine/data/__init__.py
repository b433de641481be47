"""Datasets and loaders: `build_dataset(name, split, ...)`, `build_train_loader`, `build_val_loader`.

Every dataset returns `{"image": float32 [3, H, W] normalised, "label": int64 [H, W] (255 = ignore),
"index": int}` and carries `name`, `num_classes`, `class_names`, `palette`, `ignore_index`, `mean`, `std`.
"""
from engine.data.base import SegmentationDataset
from engine.data.camvid import CamVid
from engine.data.loader import build_train_loader, build_val_loader
from engine.data.synthetic import SyntheticSegmentation

DATASETS = {"synthetic": SyntheticSegmentation, "camvid": CamVid}


def build_dataset(name, split, *, root="", train=False, crop=(64, 64), scale=(0.5, 2.0), flip=True, rotate=0.0,
                  seed=0):
    """The dataset `name` (a key of DATASETS) for `split`; train=True turns on the augmentation of transforms.py.

    `seed` is the augmentation seed of the run (sample key k is augmented from (seed, k)); it does not change
    the images of `synthetic`, which are fixed.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](split, root=root, train=train, crop=crop, scale=scale, flip=flip, rotate=rotate,
                          seed=seed)


__all__ = ["DATASETS", "build_dataset", "build_train_loader", "build_val_loader", "SegmentationDataset",
           "SyntheticSegmentation", "CamVid"]
