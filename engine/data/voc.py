"""PASCAL VOC 2012 segmentation (Everingham et al., IJCV 2010) with the SBD augmentation (Hariharan et al.,
ICCV 2011): 21 classes (background included), 255 = ignore (object boundaries and difficult regions).

    <root>/JPEGImages/<stem>.jpg
    <root>/SegmentationClassAug/<stem>.png           single-channel 0..20, 255 (VOC + SBD, 12031 labels)
    <root>/SegmentationClass/<stem>.png              VOC's own palette-mode PNGs (read as indices, not colours)
    <root>/ImageSets/Segmentation/{train_aug,train,val,trainval}.txt

`root` is the `VOC2012` folder or a folder holding `VOC2012/` or `VOCdevkit/VOC2012/`. Labels come from
`SegmentationClassAug/` where it exists, else `SegmentationClass/`. Split `train` reads `train_aug.txt` (10582
images) when it and `SegmentationClassAug/` exist, else `train.txt` (1464); `val` reads `val.txt` (1449); any
other name reads `ImageSets/Segmentation/<name>.txt`.
"""
from pathlib import Path

import numpy as np

from engine.data.files import FileSegmentation, read_list
from engine.data.transforms import IGNORE_INDEX

CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def colormap(n):
    """The PASCAL VOC colour map: colour of index i spreads i's bits, 3 at a time, over the top bits of R, G, B
    (the palette of VOC's own label PNGs)."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for bit in range(7, -1, -1):
            r |= (c & 1) << bit
            g |= ((c >> 1) & 1) << bit
            b |= ((c >> 2) & 1) << bit
            c >>= 3
        colours.append((r, g, b))
    return colours


def _valid():
    ok = np.zeros(256, bool)
    ok[:len(CLASS_NAMES)] = ok[IGNORE_INDEX] = True
    return ok


def find_devkit_folder(root, name):
    """`root` itself, root/<name> or root/VOCdevkit/<name>: the first holding JPEGImages/."""
    root = Path(root)
    for folder in (root, root / name, root / "VOCdevkit" / name):
        if (folder / "JPEGImages").is_dir():
            return folder
    raise FileNotFoundError(f"no JPEGImages/ folder in {root}, {root / name} or {root / 'VOCdevkit' / name}")


class PascalVOC(FileSegmentation):
    """PASCAL VOC 2012 (+ SBD); see the module docstring."""
    name = "voc"
    class_names = CLASS_NAMES
    palette = colormap(len(CLASS_NAMES))
    valid_labels = _valid()
    valid_text = f"0..{len(CLASS_NAMES) - 1}, {IGNORE_INDEX} (ignore)"

    def __init__(self, split, *, root="", train=False, crop=(64, 64), scale=(0.5, 2.0), flip=True, rotate=0.0,
                 seed=0, skip_bad=False, skip_log=None):
        super().__init__(split, train=train, crop=crop, scale=scale, flip=flip, rotate=rotate, seed=seed,
                         skip_bad=skip_bad, skip_log=skip_log)
        if not str(root):
            raise ValueError("voc needs its folder: pass root (--data-root) pointing at VOC2012/ (or VOCdevkit's parent)")
        self.root = find_devkit_folder(root, "VOC2012")
        aug = self.root / "SegmentationClassAug"
        label_dir = aug if aug.is_dir() else self.root / "SegmentationClass"
        lists = self.root / "ImageSets" / "Segmentation"
        name = split
        if split == "train" and label_dir == aug and (lists / "train_aug.txt").is_file():
            name = "train_aug"
        list_file = lists / f"{name}.txt"
        if not list_file.is_file():
            have = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
            raise FileNotFoundError(f"voc split {split!r}: list {list_file} does not exist (lists found: {have})")
        self.set_files(*read_list(list_file, self.root / "JPEGImages", label_dir), listed_in=list_file)
