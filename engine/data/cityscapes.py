"""Cityscapes (Cordts et al., CVPR 2016), fine annotations, 19 evaluation classes.

    <root>/leftImg8bit/{train,val,test}/<city>/<stem>_leftImg8bit.png     RGB frames (2048 x 1024)
    <root>/gtFine/{train,val,test}/<city>/<stem>_gtFine_labelIds.png      single-channel label ids 0..33

2975 train, 500 val, 1525 test images (the test labels are blank). The 34 label ids map to the 19 train ids of
cityscapesScripts' `labels.py` (road 7 -> 0, ..., bicycle 33 -> 18); the other ids (void, ego vehicle, parking,
rail track, guard rail, ...) and 255 become the ignore index 255. Other values are an error naming the file.
"""
from pathlib import Path

import numpy as np

from engine.data.files import FileSegmentation
from engine.data.transforms import IGNORE_INDEX

CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
               "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
               "bicycle")
PALETTE = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
           (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
           (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)]
# label id of each train id, in train-id order (cityscapesScripts labels.py)
LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
NUM_IDS = 34
SPLITS = ("train", "val", "test")
IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"


def _label_lut():
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    lut[list(LABEL_IDS)] = np.arange(len(LABEL_IDS))
    return lut


def _valid():
    ok = np.zeros(256, bool)
    ok[:NUM_IDS] = ok[IGNORE_INDEX] = True
    return ok


class Cityscapes(FileSegmentation):
    """Cityscapes fine; see the module docstring."""
    name = "cityscapes"
    class_names = CLASS_NAMES
    palette = PALETTE
    label_lut = _label_lut()
    valid_labels = _valid()
    valid_text = f"label ids 0..{NUM_IDS - 1}, {IGNORE_INDEX}"

    def __init__(self, split, *, root="", train=False, crop=(64, 64), scale=(0.5, 2.0), flip=True, rotate=0.0,
                 seed=0, skip_bad=False, skip_log=None):
        super().__init__(split, train=train, crop=crop, scale=scale, flip=flip, rotate=rotate, seed=seed,
                         skip_bad=skip_bad, skip_log=skip_log)
        if not str(root):
            raise ValueError("cityscapes needs its folder: pass root (--data-root) holding leftImg8bit/ and gtFine/")
        if split not in SPLITS:
            raise ValueError(f"cityscapes has splits {SPLITS}, got {split!r}")
        self.root = Path(root)
        image_dir, label_dir = self.root / "leftImg8bit" / split, self.root / "gtFine" / split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"cityscapes {split} split: folder {folder} is missing")
        images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        if not images:
            raise ValueError(f"cityscapes {split} split: no <city>/*{IMAGE_SUFFIX} images in {image_dir}")
        labels = [label_dir / p.parent.name / (p.name[:-len(IMAGE_SUFFIX)] + LABEL_SUFFIX) for p in images]
        self.set_files(images, labels)
