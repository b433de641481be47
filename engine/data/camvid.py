"""CamVid in the SegNet layout (Brostow et al., PRL 2009; split of Badrinarayanan et al., SegNet, 2017).

    <root>/{train,val,test}/<stem>.{png,jpg}        RGB frames (480 x 360)
    <root>/{train,val,test}annot/<stem>.png         single-channel labels 0..11

367 train, 101 val, 233 test images. Labels 0..10 are the 11 classes below; 11 is void and becomes the ignore
index 255 (255 itself is accepted as ignore too). Any other value is an error naming the file and the value,
checked every time a label is loaded (one bincount of 256 bins).
"""
from pathlib import Path

import numpy as np

from engine.data.files import FileSegmentation
from engine.data.transforms import IGNORE_INDEX

CLASS_NAMES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
               "Pedestrian", "Bicyclist")
# The SegNet colour coding of the classes.
PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
           (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]
VOID = 11
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _label_lut():
    """uint8 [256]: identity except void -> 255 (values other than classes, void and 255 are rejected first)."""
    lut = np.arange(256, dtype=np.uint8)
    lut[VOID] = IGNORE_INDEX
    return lut


def _valid():
    ok = np.zeros(256, bool)
    ok[:len(CLASS_NAMES)] = ok[VOID] = ok[IGNORE_INDEX] = True
    return ok


class CamVid(FileSegmentation):
    """CamVid, SegNet layout; see the module docstring."""
    name = "camvid"
    class_names = CLASS_NAMES
    palette = PALETTE
    label_lut = _label_lut()
    valid_labels = _valid()
    valid_text = f"0..{len(CLASS_NAMES) - 1}, {VOID} (void), {IGNORE_INDEX} (ignore)"

    def __init__(self, split, *, root="", train=False, crop=(64, 64), scale=(0.5, 2.0), flip=True, rotate=0.0,
                 seed=0, skip_bad=False, skip_log=None):
        super().__init__(split, train=train, crop=crop, scale=scale, flip=flip, rotate=rotate, seed=seed,
                         skip_bad=skip_bad, skip_log=skip_log)
        if not str(root):
            raise ValueError("camvid needs its folder: pass root (--data-root) pointing at the SegNet layout "
                             "<root>/{train,val,test}[annot]/")
        if split not in SPLITS:
            raise ValueError(f"camvid has splits {SPLITS}, got {split!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"camvid data root {self.root} does not exist or is not a folder")
        image_dir, label_dir = self.root / split, self.root / f"{split}annot"
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"camvid {split} split: folder {folder} is missing")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"camvid {split} split: no .png/.jpg images in {image_dir}")
        stems = [p.stem for p in images]
        if len(set(stems)) != len(stems):
            twice = sorted({s for s in stems if stems.count(s) > 1})
            raise ValueError(f"camvid {split} split: several images share the stem(s) {twice[:5]} in {image_dir}")
        self.set_files(images, [label_dir / f"{p.stem}.png" for p in images])
