"""What every dataset shares: the sample dict, key -> (index, augmentation) mapping and normalisation.

A dataset subclass provides `__len__`, the class metadata and `load(i) -> (rgb uint8 [H, W, 3],
label uint8 [H, W] with 255 = ignore)`; this base turns it into samples.

Keys: in training mode the sampler passes `key = epoch * N + i`; the image is `i = key % N` and its random
augmentation is a pure function of `(seed, key)`. Data order and augmentation therefore do not depend on the
number of DataLoader workers or on their RNG state, a new epoch augments the same image differently, and a
resumed run reproduces the stream bit-exactly. In eval mode the key is the index and nothing is random.
"""
import numpy as np
import torch

from engine.data import transforms
from engine.data.transforms import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

# Kept apart from the data-order stream (engine/data/loader.py) so the two never share an RNG seed.
AUG_STREAM = 0xA6


def augment_rng(seed, key):
    """The numpy Generator of sample `key`'s augmentation under run seed `seed`."""
    return np.random.default_rng([seed, AUG_STREAM, key])


class SegmentationDataset(torch.utils.data.Dataset):
    """Base of all datasets; see the module docstring. Subclasses set the class attributes below."""
    name = ""
    class_names = ()
    palette = ()          # one (R, G, B) per class, for pictures
    ignore_index = IGNORE_INDEX
    mean = IMAGENET_MEAN  # normalisation, also what a picture is un-normalised with
    std = IMAGENET_STD
    eval_resize = 0       # eval mode: --val-resize N (0: off) of the side eval_resize_side (transforms.resize_for_eval)
    eval_resize_side = "short"

    def __init__(self, split, *, train=False, crop=(64, 64), scale=(0.5, 2.0), flip=True, rotate=0.0, seed=0):
        self.split = split
        self.train = train
        self.crop = (int(crop), int(crop)) if np.isscalar(crop) else tuple(int(c) for c in crop)
        self.scale = (float(scale[0]), float(scale[1]))
        self.flip = bool(flip)
        self.rotate = float(rotate)
        self.seed = int(seed)
        if len(self.crop) != 2 or min(self.crop) <= 0:
            raise ValueError(f"crop must be a positive (height, width), got {crop!r}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale range must satisfy 0 < min <= max, got {scale!r}")
        if self.rotate < 0:
            raise ValueError(f"rotate must be >= 0 degrees, got {rotate!r}")

    @property
    def num_classes(self):
        return len(self.class_names)

    def load(self, i):
        raise NotImplementedError

    def load_checked(self, i):
        """(index used, rgb, label): `load(i)`, or for a dataset that skips unreadable files the next readable
        sample (see engine/data/files.py)."""
        return (i, *self.load(i))

    def __len__(self):
        raise NotImplementedError

    def params(self, key, image_hw):
        """The AugParams of training key `key` for an image of size `image_hw`."""
        return transforms.sample_params(augment_rng(self.seed, key), image_hw, self.crop, self.scale,
                                        self.flip, self.rotate)

    def __getitem__(self, key):
        key = int(key)
        n = len(self)
        if key < 0 or (not self.train and key >= n):
            raise IndexError(f"{self.name} {self.split}: key {key} out of range for {n} images")
        i, rgb, label = self.load_checked(key % n)
        if self.train:
            image, label = transforms.augment(rgb, label, self.params(key, rgb.shape[:2]), self.crop,
                                              self.mean, self.std)
        else:
            if self.eval_resize:
                rgb, label = transforms.resize_for_eval(rgb, label, self.eval_resize, self.eval_resize_side)
            image, label = transforms.eval_transform(rgb, label, self.mean, self.std)
        return {"image": torch.from_numpy(image),                      # float32 [3, H, W]
                "label": torch.from_numpy(label.astype(np.int64)),     # int64 [H, W], 255 = ignore
                "index": i}

    def __repr__(self):
        mode = f"train crop={self.crop} scale={self.scale} flip={self.flip} rotate={self.rotate}" \
            if self.train else "eval"
        return f"{type(self).__name__}({self.split!r}, {len(self)} images, {self.num_classes} classes, {mode})"
