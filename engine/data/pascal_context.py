"""PASCAL-Context (Mottaghi et al., CVPR 2014): VOC 2010 images labelled densely with 459 classes, of which the
59 most frequent are the benchmark; everything else is background.

    <root>/JPEGImages/<stem>.jpg
    <root>/SegmentationClassContext/<stem>.png        single-channel 0..59 (0 = background), made by --convert
    <root>/ImageSets/SegmentationContext/{train,val}.txt     4998 / 5105 images

`root` is the `VOC2010` folder or a folder holding `VOC2010/` or `VOCdevkit/VOC2010/`. Two datasets read it:
`pascal_context` has 60 classes, background being class 0; `pascal_context59` has the 59 classes only,
background becoming the ignore index 255 and class k the index k - 1. (Both conventions are in use: CWD reports
60 classes, CIRKD 59.) The label PNGs are the same for both, and the same as mmsegmentation's converter writes.

Conversion, once, from the per-image `.mat` label maps of the dataset's `trainval.tar.gz` (variable `LabelMap`,
ids 1..459 of its `labels.txt`):

    python -m engine.data.pascal_context --convert --source trainval/ --root VOCdevkit/VOC2010

writes `SegmentationClassContext/<stem>.png` (the 59 classes' ids -> 1..59 in alphabetical order of their
names, every other id -> 0) and the split lists: VOC 2010's `ImageSets/Main/{train,val}.txt` restricted to the
images that have a label map.
"""
import argparse
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from engine.data.files import FileSegmentation, read_list
from engine.data.transforms import IGNORE_INDEX
from engine.data.voc import colormap, find_devkit_folder

CLASS_NAMES = ("aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
               "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup",
               "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
               "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
               "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
               "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood")
# Their ids among the 459 classes of labels.txt (alphabetical there too, so class k has the k-th smallest id).
CONTEXT_IDS = (2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115,
               144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347,
               349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458)
LABEL_DIR = "SegmentationClassContext"
LIST_DIR = Path("ImageSets") / "SegmentationContext"


def _valid():
    ok = np.zeros(256, bool)
    ok[:len(CLASS_NAMES) + 1] = ok[IGNORE_INDEX] = True
    return ok


class PascalContext(FileSegmentation):
    """PASCAL-Context, 60 classes (background = 0); see the module docstring."""
    name = "pascal_context"
    class_names = ("background",) + CLASS_NAMES
    palette = colormap(len(CLASS_NAMES) + 1)
    valid_labels = _valid()
    valid_text = f"0..{len(CLASS_NAMES)} (0 = background), {IGNORE_INDEX}"

    def __init__(self, split, *, root="", train=False, crop=(64, 64), scale=(0.5, 2.0), flip=True, rotate=0.0,
                 seed=0, skip_bad=False, skip_log=None):
        super().__init__(split, train=train, crop=crop, scale=scale, flip=flip, rotate=rotate, seed=seed,
                         skip_bad=skip_bad, skip_log=skip_log)
        if not str(root):
            raise ValueError(f"{self.name} needs its folder: pass root (--data-root) pointing at VOC2010/")
        self.root = find_devkit_folder(root, "VOC2010")
        label_dir = self.root / LABEL_DIR
        if not label_dir.is_dir():
            raise FileNotFoundError(f"{self.name}: {label_dir} is missing; convert the label maps once with "
                                    f"python -m engine.data.pascal_context --convert --source trainval/ "
                                    f"--root {self.root}")
        list_file = self.root / LIST_DIR / f"{split}.txt"
        self.set_files(*read_list(list_file, self.root / "JPEGImages", label_dir), listed_in=list_file)


def _lut59():
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    lut[1:len(CLASS_NAMES) + 1] = np.arange(len(CLASS_NAMES))
    return lut


class PascalContext59(PascalContext):
    """PASCAL-Context, 59 classes, background ignored; see the module docstring."""
    name = "pascal_context59"
    class_names = CLASS_NAMES
    palette = colormap(len(CLASS_NAMES) + 1)[1:]
    label_lut = _lut59()


# ---------------------------------------------------------------- conversion

MAT_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
MI_INT8, MI_MATRIX, MI_COMPRESSED = 1, 14, 15
NUMERIC_CLASSES = set(range(6, 16))  # mxDOUBLE .. mxUINT64


def _element(buf, pos, order, pad):
    """(type, body bytes, next position) of the MAT-file data element at `pos`."""
    typ, size = struct.unpack_from(order + "II", buf, pos)
    if typ >> 16:  # small data element: 2-byte size, 2-byte type, up to 4 bytes of data, 8 bytes in all
        return typ & 0xFFFF, buf[pos + 4:pos + 4 + (typ >> 16)], pos + 8
    end = pos + 8 + size
    return typ, buf[pos + 8:end], end + ((-size) % 8 if pad else 0)


def _matrix(body, order):
    """(name, array or None) of an miMATRIX element's body; None for non-numeric and complex variables."""
    typ, flags, pos = _element(body, 0, order, True)
    flags = struct.unpack_from(order + "I", flags)[0]
    typ, dims, pos = _element(body, pos, order, True)
    dims = np.frombuffer(dims, order + "i4")
    typ, name, pos = _element(body, pos, order, True)
    name = bytes(name).decode("ascii", "replace")
    if (flags & 0xFF) not in NUMERIC_CLASSES or flags & 0x800:
        return name, None
    typ, real, pos = _element(body, pos, order, True)
    if typ not in MAT_TYPES:
        return name, None
    return name, np.frombuffer(real, order + MAT_TYPES[typ]).reshape(tuple(dims), order="F")


def read_mat(path, name):
    """Numeric variable `name` of a MATLAB level-5 MAT-file (MATLAB's default format before v7.3; what scipy's
    loadmat reads), from the format's specification; compressed variables are inflated with zlib."""
    path = Path(path)
    data = path.read_bytes()
    if data[:19] == b"MATLAB 7.3 MAT-file" or len(data) < 128:
        raise ValueError(f"{path} is not a level-5 MAT-file (a v7.3 file is HDF5: save it with -v7)")
    order = {b"IM": "<", b"MI": ">"}.get(data[126:128])
    if order is None:
        raise ValueError(f"{path} is not a level-5 MAT-file: bad endian indicator {data[126:128]!r}")
    pos, seen = 128, []
    while pos + 8 <= len(data):
        typ, body, pos = _element(data, pos, order, False)
        if typ == MI_COMPRESSED:
            typ, body, _ = _element(zlib.decompress(body), 0, order, False)
        if typ == MI_MATRIX:
            var, array = _matrix(body, order)
            seen.append(var)
            if var == name and array is not None:
                return array
    raise KeyError(f"{path} has no numeric variable {name!r} (variables: {seen})")


def context_lut(max_id=65535):
    """int [max_id + 1]: label id (1..459) -> 1..59 for the 59 classes, 0 for every other id."""
    lut = np.zeros(max_id + 1, np.uint8)
    lut[list(CONTEXT_IDS)] = np.arange(1, len(CONTEXT_IDS) + 1)
    return lut


def convert(source, root, variable="LabelMap"):
    """Write SegmentationClassContext/*.png and the train/val lists under the VOC2010 folder; returns
    {split: number of images listed}. See the module docstring."""
    root = find_devkit_folder(root, "VOC2010")
    source = Path(source)
    mats = sorted(source.glob("*.mat"))
    if not mats:
        raise FileNotFoundError(f"no .mat label maps in {source} (expected trainval/<stem>.mat)")
    out = root / LABEL_DIR
    out.mkdir(exist_ok=True)
    lut = context_lut()
    for mat in mats:
        ids = read_mat(mat, variable)
        if ids.ndim != 2 or ids.min() < 0 or ids.max() > 65535:
            raise ValueError(f"{mat}: {variable} must be a 2-D map of label ids, got shape {ids.shape}, "
                             f"values {ids.min()}..{ids.max()}")
        image = root / "JPEGImages" / f"{mat.stem}.jpg"
        if image.is_file():
            with Image.open(image) as im:
                if im.size != (ids.shape[1], ids.shape[0]):
                    raise ValueError(f"{mat} is {ids.shape[1]}x{ids.shape[0]} but image {image} is "
                                     f"{im.size[0]}x{im.size[1]} (width x height)")
        Image.fromarray(lut[ids.astype(np.int64)]).save(out / f"{mat.stem}.png")
    converted = {m.stem for m in mats}
    (root / LIST_DIR).mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        main = root / "ImageSets" / "Main" / f"{split}.txt"
        if not main.is_file():
            raise FileNotFoundError(f"VOC 2010's split list {main} is missing: the PASCAL-Context splits are its "
                                    f"train/val lists")
        stems = [s.split()[0] for s in main.read_text().splitlines() if s.strip()]
        keep = [s for s in stems if s in converted]
        (root / LIST_DIR / f"{split}.txt").write_text("".join(f"{s}\n" for s in keep))
        counts[split] = len(keep)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert PASCAL-Context .mat label maps to the label PNGs segkd reads.")
    p.add_argument("--convert", action="store_true", required=True, help="run the conversion")
    p.add_argument("--source", required=True, help="folder of <stem>.mat files (trainval.tar.gz, extracted)")
    p.add_argument("--root", required=True, help="VOC2010 folder (or one holding VOCdevkit/VOC2010)")
    args = p.parse_args(argv)
    counts = convert(args.source, args.root)
    print(f"wrote {LABEL_DIR}/ and {LIST_DIR}/train.txt ({counts['train']} images), val.txt ({counts['val']})",
          file=sys.stderr)
    return counts


if __name__ == "__main__":
    main()
