"""Tiny fake dataset trees in each standard on-disk layout, for the dataset and loader tests.

Images are smooth (gradients plus a few flat shapes, like photographs and unlike noise) so that two resampling
implementations can be compared pixel by pixel; labels are random raw values of the dataset's encoding, returned
so that a test can check the mapping against them.
"""
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from engine.data.pascal_context import CONTEXT_IDS
from engine.data.voc import colormap


def smooth_image(rng, h, w):
    """uint8 [h, w, 3]: a colour gradient with a few flat rectangles."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    a, b, c = rng.uniform(40, 200, 3)
    img = np.stack([a + 50 * x, b + 50 * y, c + 40 * (x - y)], -1)
    for _ in range(3):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        img[y0:y0 + rng.integers(2, h // 2 + 2), x0:x0 + rng.integers(2, w // 2 + 2)] = rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def blocky_label(rng, h, w, values):
    """[h, w] of the given raw values in blocks of a few pixels (so that rescaling keeps every value)."""
    small = rng.choice(np.asarray(values), ((h + 3) // 4, (w + 3) // 4))
    return np.kron(small, np.ones((4, 4), small.dtype))[:h, :w]


def save(array, path, mode=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    im.save(path, quality=95) if path.suffix == ".jpg" else im.save(path)
    return path


def make_camvid(root, splits=(("train", 3), ("val", 2)), size=(24, 32), seed=7):
    """SegNet layout: jpg and png frames, labels 0..11 (11 = void)."""
    rng = np.random.default_rng(seed)
    root = Path(root) / "camvid"
    for split, count in splits:
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(count):
            ext = ".png" if i % 2 else ".jpg"
            save(smooth_image(rng, *size), root / split / f"f{i:03d}{ext}")
            save(rng.integers(0, 12, size, dtype=np.uint8), root / f"{split}annot" / f"f{i:03d}.png")
    return root


def make_cityscapes(root, splits=(("train", 2, 2), ("val", 1, 2)), size=(16, 32), seed=1):
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine/<split>/<city>/*_gtFine_labelIds.png (ids 0..33)."""
    rng = np.random.default_rng(seed)
    root = Path(root) / "cityscapes"
    raw = {}
    for split, cities, per_city in splits:
        for c in range(cities):
            city = f"city{c}"
            for i in range(per_city):
                stem = f"{city}_{i:06d}_000019"
                save(smooth_image(rng, *size), root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
                label = blocky_label(rng, *size, list(range(34))).astype(np.uint8)
                raw[(split, stem)] = label
                save(label, root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
                # cityscapesScripts writes more files beside the label ids: they must be ignored
                save(label, root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png")
    return root, raw


def make_ade20k(root, counts=(("training", 3), ("validation", 3)), seed=2):
    """ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*; images of different sizes."""
    rng = np.random.default_rng(seed)
    root = Path(root) / "ADEChallengeData2016"
    raw = {}
    for folder, count in counts:
        tag = "train" if folder == "training" else "val"
        for i in range(count):
            h, w = 20 + 4 * i, 28 - 2 * i
            stem = f"ADE_{tag}_{i + 1:08d}"
            save(smooth_image(rng, h, w), root / "images" / folder / f"{stem}.jpg")
            label = blocky_label(rng, h, w, list(range(151))).astype(np.uint8)
            raw[(folder, stem)] = label
            save(label, root / "annotations" / folder / f"{stem}.png")
    return root, raw


def make_voc(root, lists=(("train_aug", 4), ("train", 2), ("val", 2)), size=(20, 24), aug=True, seed=3):
    """VOCdevkit/VOC2012 with JPEGImages, SegmentationClass (palette PNGs of VOC's colour map),
    SegmentationClassAug (plain index PNGs) where `aug`, and ImageSets/Segmentation lists."""
    rng = np.random.default_rng(seed)
    root = Path(root) / "VOCdevkit" / "VOC2012"
    palette = [v for c in colormap(256) for v in c]
    raw = {}
    for name, count in lists:
        stems = [f"2007_{name}_{i:04d}" for i in range(count)]
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{s}\n" for s in stems))
        for s in stems:
            save(smooth_image(rng, *size), root / "JPEGImages" / f"{s}.jpg")
            label = blocky_label(rng, *size, list(range(21)) + [255]).astype(np.uint8)
            raw[s] = label
            im = Image.fromarray(label, "P")
            im.putpalette(palette)
            (root / "SegmentationClass").mkdir(exist_ok=True)
            im.save(root / "SegmentationClass" / f"{s}.png")
            if aug:
                save(label, root / "SegmentationClassAug" / f"{s}.png")
    return root, raw


def write_mat(path, variables, compress=True):
    """A MATLAB level-5 MAT-file (little-endian) holding uint16 matrices, written from the format's
    specification: 128-byte header, then one miMATRIX element per variable (zlib-compressed if `compress`)."""

    def element(typ, payload):  # tag, data, padding to 8 bytes
        if len(payload) <= 4:    # small data element format: size and type share the tag word
            return struct.pack("<HH", typ, len(payload)) + payload.ljust(4, b"\0")
        return struct.pack("<II", typ, len(payload)) + payload + b"\0" * (-len(payload) % 8)

    out = b"MATLAB 5.0 MAT-file, written by segkd tests".ljust(116) + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    for name, array in variables.items():
        array = np.asarray(array, "<u2")
        body = (element(6, struct.pack("<II", 11, 0))                   # array flags: class mxUINT16
                + element(5, struct.pack(f"<{array.ndim}i", *array.shape))  # dimensions
                + element(1, name.encode())                             # name
                + element(4, array.tobytes(order="F")))                 # real part, column-major uint16
        matrix = struct.pack("<II", 14, len(body)) + body
        out += struct.pack("<II", 15, len(z := zlib.compress(matrix))) + z if compress else matrix
    Path(path).write_bytes(out)


def make_pascal_context(root, train=3, val=2, size=(18, 22), seed=4):
    """VOCdevkit/VOC2010 with JPEGImages and ImageSets/Main lists, plus trainval/<stem>.mat label maps over the
    459 ids (one image of Main/train.txt has no label map, as in the real release)."""
    rng = np.random.default_rng(seed)
    voc = Path(root) / "VOCdevkit" / "VOC2010"
    source = Path(root) / "trainval"
    source.mkdir(parents=True)
    ids = {}
    lists = {"train": [f"2008_{i:06d}" for i in range(train + 1)],
             "val": [f"2009_{i:06d}" for i in range(val)]}
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for split, stems in lists.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
        for s in stems:
            save(smooth_image(rng, *size), voc / "JPEGImages" / f"{s}.jpg")
            if s == lists["train"][-1]:
                continue  # listed in Main but without a label map
            # a mix of the 59 classes' ids, other ids of the 459 and 0 (unlabelled)
            values = list(CONTEXT_IDS[::5]) + [1, 3, 100, 459, 0]
            label = blocky_label(rng, *size, values).astype(np.uint16)
            ids[s] = label
            variables = {"a": np.zeros((1, 1)), "LabelMap": label} if len(ids) % 2 else {"LabelMap": label}
            write_mat(source / f"{s}.mat", variables, compress=len(ids) % 3 != 0)
    return voc, source, ids, lists


def make_nyuv2(root, train=(3, 4, 6), test=(1, 2, 9), size=(24, 32), seed=5):
    """The DFAD layout of NYUv2: nyuv2-meta-data/splits.mat (trainNdxs, testNdxs: 1-based uint16 columns),
    480_640/IMAGE/<n - 1>.png and nyuv2-meta-data/<split>_labels_13/new_nyu_class13_<nnnn>.png (0 = void, 1..13;
    one label in each split also holds 255). Returns (root, {n: raw label})."""
    rng = np.random.default_rng(seed)
    root = Path(root) / "NYUv2"
    meta = root / "nyuv2-meta-data"
    meta.mkdir(parents=True)
    write_mat(meta / "splits.mat", {"trainNdxs": np.reshape(train, (-1, 1)), "testNdxs": np.reshape(test, (-1, 1))})
    raw = {}
    for split, idx in (("train", train), ("test", test)):
        for j, n in enumerate(idx):
            save(smooth_image(rng, *size), root / "480_640" / "IMAGE" / f"{n - 1}.png")
            label = blocky_label(rng, *size, list(range(14)) + ([255] if j == 0 else [])).astype(np.uint8)
            label[0, 0], label[0, -1] = 0, 13  # every label has void and the last class
            raw[n] = label
            save(label, meta / f"{split}_labels_13" / f"new_nyu_class13_{n:04d}.png")
    return root, raw
