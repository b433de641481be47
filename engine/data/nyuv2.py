"""NYU Depth v2, the 13-class setting (Silberman et al., ECCV 2012; the 13 classes of Couprie et al., ICLR 2013,
as labelled by Handa et al.'s nyuv2-meta-data), in the layout the DFAD code reads (Fang et al., 2019,
VainF/Data-Free-Adversarial-Distillation `dataset/nyu.py`), so a folder prepared for that code works as it is:

    <root>/nyuv2-meta-data/splits.mat                                         trainNdxs (795), testNdxs (654)
    <root>/480_640/IMAGE/<n - 1>.png                                          RGB 640x480: 0.png .. 1448.png
    <root>/nyuv2-meta-data/{train,test}_labels_13/new_nyu_class13_<nnnn>.png  single-channel 0..13, 640x480

`n` is the 1-based index of an image among the 1449 labelled images of `nyu_depth_v2_labeled.mat`, as listed in
`splits.mat` (MATLAB level-5 file, uint16 column vectors; read without scipy); the image file is named `n - 1`,
the label file `n` zero-padded to 4 digits. `root` is that folder (DFAD's `data/NYUv2`) or the folder holding
`NYUv2/`.

Preparing it: clone github.com/ankurhanda/nyuv2-meta-data into `<root>/nyuv2-meta-data` and extract
`train_labels_13/nyuv2_train_class13.tgz` and `test_labels_13/nyuv2_test_class13.tgz` where they lie (each holds
its PNGs without a folder); the `*_eigen.tgz` archive beside them (224x224 crops) is not used. `480_640/IMAGE/`
holds the RGB images of `nyu_depth_v2_labeled.mat` (variable `images`, 480x640x3 uint8 per image in MATLAB's
order; an HDF5 / v7.3 file, so h5py reads it transposed as [1449, 3, 640, 480]), image n saved as `<n - 1>.png`.

Splits `train` (795 images) and `test` (654). NYUv2 has no validation split: `val` reads the test split, the one
DFAD reports, so the trainer's default `--val-split val` and `--val-split test` evaluate the same 654 images.
Labels: 0 is void and becomes the ignore index 255, k = 1..13 becomes class k - 1 in the order of the meta-data's
`class13Mapping.mat` (bed .. window; DFAD does the same with its `[255, 0, 1, ..., 12]` lookup); 255 is accepted
as ignore too. Any other value is an error naming the file and the value.
"""
from pathlib import Path

import numpy as np

from engine.data.files import FileSegmentation, void_first_labels
from engine.data.pascal_context import read_mat
from engine.data.transforms import IGNORE_INDEX
from engine.data.voc import colormap

CLASS_NAMES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table",
               "tv", "wall", "window")
SPLITS = {"train": "train", "val": "test", "test": "test"}  # split -> the split of splits.mat it reads
META = "nyuv2-meta-data"
IMAGE_DIR = Path("480_640") / "IMAGE"


def split_indices(splits_mat, split):
    """The 1-based image indices (int list) of `split` ("train" or "test") in NYUv2's `splits.mat`."""
    try:
        idx = read_mat(splits_mat, f"{split}Ndxs")
    except KeyError as e:  # no such variable: one line naming the file and what it holds
        raise ValueError(str(e.args[0])) from None
    idx = np.asarray(idx).ravel().astype(np.int64)
    if idx.size == 0 or idx.min() < 1 or len(set(idx.tolist())) != idx.size:
        raise ValueError(f"{splits_mat}: {split}Ndxs must hold distinct 1-based image indices, got "
                         f"{idx.size} values in [{idx.min(initial=0)}, {idx.max(initial=0)}]")
    return idx.tolist()


class NYUv2(FileSegmentation):
    """NYUv2, 13 classes, DFAD layout; see the module docstring."""
    name = "nyuv2"
    class_names = CLASS_NAMES
    palette = colormap(len(CLASS_NAMES) + 1)[1:]  # DFAD's colours: the PASCAL colour map of k + 1
    label_lut, valid_labels = void_first_labels(len(CLASS_NAMES), ignore_too=True)  # 0 void, k -> k - 1, 255 ok
    valid_text = f"0 (void), 1..{len(CLASS_NAMES)}, {IGNORE_INDEX} (ignore)"

    def __init__(self, split, *, root="", train=False, crop=(64, 64), scale=(0.5, 2.0), flip=True, rotate=0.0,
                 seed=0, skip_bad=False, skip_log=None):
        super().__init__(split, train=train, crop=crop, scale=scale, flip=flip, rotate=rotate, seed=seed,
                         skip_bad=skip_bad, skip_log=skip_log)
        if not str(root):
            raise ValueError(f"nyuv2 needs its folder: pass root (--data-root) pointing at the folder holding "
                             f"{IMAGE_DIR}/ and {META}/")
        if split not in SPLITS:
            raise ValueError(f"nyuv2 has splits {tuple(SPLITS)}, got {split!r}")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"nyuv2 data root {root} does not exist or is not a folder")
        if not (root / META).exists() and (root / "NYUv2").is_dir():
            root = root / "NYUv2"
        self.root = root
        source = SPLITS[split]
        splits_mat = root / META / "splits.mat"
        image_dir, label_dir = root / IMAGE_DIR, root / META / f"{source}_labels_13"
        if not splits_mat.is_file():
            raise FileNotFoundError(f"nyuv2: split file {splits_mat} is missing (it comes with {META})")
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"nyuv2 {split} split: folder {folder} is missing")
        idx = split_indices(splits_mat, source)
        self.set_files([image_dir / f"{n - 1}.png" for n in idx],
                       [label_dir / f"new_nyu_class13_{n:04d}.png" for n in idx], listed_in=splits_mat)
