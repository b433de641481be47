"""What every on-disk dataset shares: matching image/label file lists, label value checks and mapping, reading
for the torch path (decoded pixels) and for the DALI path (encoded bytes), and skipping bad files.

A subclass lists its files (`self.set_files(images, labels)`) and declares its raw label values:
`label_lut` (uint8 [256], raw value -> class index or 255) and `valid_labels` (the raw values allowed; any other
value is an error naming the file and the value). Labels are read with PIL in both paths: a palette-mode PNG
reads as its palette indices, never as colours (DALI's image decoder expands palettes to RGB).

Bad input:
- a listed file that does not exist is named when the dataset is built;
- an image or label that cannot be read (truncated, corrupt, not an image) raises `BadSampleError` naming the
  file, or, with `skip_bad=True`, is skipped: the sample takes the next readable image instead (index i + 1,
  i + 2, ... modulo N, augmented from the same key), and the file is recorded in a `SkipLog` shared by all
  processes of the run (workers included), which counts distinct bad files;
- an image and label of different sizes raise a ValueError naming both files (never skipped: a mismatch is a
  broken dataset, not a damaged file).
"""
import io
import os
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from engine.data.base import SegmentationDataset
from engine.data.transforms import IGNORE_INDEX

LABEL_MODES = ("L", "P", "I", "I;16")
JPEG_END = b"\xff\xd9"
PNG_END = b"IEND\xaeB`\x82"


class BadSampleError(ValueError):
    """An image or label file that cannot be read. `path` is the file.

    A DataLoader worker's exception reaches the main process rebuilt from one string, the worker's whole
    traceback ("Caught BadSampleError in DataLoader worker process 1. Original Traceback ..."). Built that way
    (one argument), the error keeps only its own last line, so a worker's bad sample reads exactly as with
    --workers 0; __reduce__ rebuilds it exactly wherever it is pickled whole.
    """

    def __init__(self, path, reason=None):
        if reason is None:  # rebuilt from a worker's traceback text: its last line is "...BadSampleError: <msg>"
            last = str(path).strip().splitlines()[-1]
            text = last.split("BadSampleError: ", 1)[-1]
            super().__init__(text)
            self.path = text.removeprefix("cannot read ").split(": ", 1)[0]
            self.reason = text.split(": ", 1)[-1].rsplit(" (--skip-bad-samples", 1)[0]
            return
        super().__init__(f"cannot read {path}: {reason} (--skip-bad-samples skips and counts such files)")
        self.path, self.reason = str(path), str(reason)

    def __reduce__(self):
        return type(self), (self.path, self.reason)


class SkipLog:
    """Append-only record of skipped files, one `path<TAB>reason` line each, in a file every process can write.

    A plain file rather than shared memory: DataLoader workers and DALI's Python workers may be forked or
    spawned, and both can open a path. `count()` is the number of distinct files.
    """

    def __init__(self, path=None):
        self.path = str(path or Path(tempfile.gettempdir()) / f"segkd-skipped-{os.getpid()}-{uuid.uuid4().hex[:8]}.log")

    def record(self, error):
        with open(self.path, "a") as f:  # one short write with O_APPEND: lines of processes never interleave
            f.write(f"{error.path}\t{error.reason}\n")
        print(f"segkd: skipping unreadable sample {error.path}: {error.reason} "
              f"({self.count()} bad file(s) skipped so far)", file=sys.stderr, flush=True)

    def files(self):
        try:
            lines = Path(self.path).read_text().splitlines()
        except FileNotFoundError:
            return []
        return sorted({line.split("\t", 1)[0] for line in lines if line})

    def count(self):
        return len(self.files())


def void_first_labels(num_classes, ignore_too=False):
    """(label_lut, valid_labels) of an encoding whose 0 is void and 1..num_classes the classes (ADE20K, NYUv2's 13):
    0 -> IGNORE_INDEX, k -> k - 1; valid: 0..num_classes, and IGNORE_INDEX itself when `ignore_too`."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    lut[1:num_classes + 1] = np.arange(num_classes)
    valid = np.zeros(256, bool)
    valid[:num_classes + 1] = True
    valid[IGNORE_INDEX] |= ignore_too
    return lut, valid


def _complete(fmt, data):
    """Whether encoded bytes end the way a whole file of that format does (trailing NUL padding allowed)."""
    tail = bytes(data[-4096:]).rstrip(b"\x00")
    if fmt == "JPEG":
        return tail.endswith(JPEG_END)
    if fmt == "PNG":
        return tail.endswith(PNG_END)
    return True  # other formats: left to the decoder


class FileSegmentation(SegmentationDataset):
    """Base of datasets read from image/label files; see the module docstring."""
    label_lut = np.arange(256, dtype=np.uint8)
    valid_labels = np.ones(256, bool)
    valid_text = ""       # how the valid raw values are described in errors

    def __init__(self, split, *, train=False, crop=(64, 64), scale=(0.5, 2.0), flip=True, rotate=0.0, seed=0,
                 skip_bad=False, skip_log=None):
        super().__init__(split, train=train, crop=crop, scale=scale, flip=flip, rotate=rotate, seed=seed)
        self.skip_bad = bool(skip_bad)
        self.skip_log = skip_log or (SkipLog() if skip_bad else None)
        self.bad = set()  # indices found unreadable by this process
        self.images, self.labels = [], []

    def set_files(self, images, labels, listed_in=None):
        """Adopt matching lists of paths; a missing file is named (with the list file that names it, if any)."""
        images, labels = [Path(p) for p in images], [Path(p) for p in labels]
        if len(images) != len(labels):
            raise ValueError(f"{self.name}: {len(images)} images but {len(labels)} labels")
        if not images:
            raise ValueError(f"{self.name} {self.split} split: no images found"
                             + (f" (list {listed_in} is empty)" if listed_in else ""))
        source = f" listed in {listed_in}" if listed_in else ""
        for image, label in zip(images, labels):
            if not image.is_file():
                raise FileNotFoundError(f"{self.name}: image {image}{source} does not exist")
            if not label.is_file():
                raise FileNotFoundError(f"{self.name}: image {image} has no label; expected {label}{source}")
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    # ------------------------------------------------------------ reading
    def read_image(self, i):
        """Decoded uint8 [H, W, 3] of image i (PIL, EXIF orientation ignored like DALI's decoder here)."""
        path = self.images[i]
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... depending on the damage
            raise BadSampleError(path, e) from e

    def read_encoded(self, i):
        """(encoded bytes uint8 [n], (H, W)) of image i, for a decoder elsewhere (DALI).

        Checks what can be checked without decoding: the header parses and the file ends with its format's end
        marker. A file whose tail looks wrong is decoded once with PIL to tell truncation from harmless
        trailing bytes, so the check never rejects an image the torch path accepts.
        """
        path = self.images[i]
        try:
            data = np.fromfile(path, np.uint8)
            with Image.open(io.BytesIO(data.tobytes())) as im:
                fmt, (w, h) = im.format, im.size
        except Exception as e:
            raise BadSampleError(path, e) from e
        if not _complete(fmt, data):
            self.read_image(i)  # raises BadSampleError if it really is truncated
        return data, (h, w)

    def read_label(self, i):
        """uint8 [H, W] class indices (255 = ignore) of label i, mapped through `label_lut`."""
        path = self.labels[i]
        try:
            with Image.open(path) as im:
                mode = im.mode
                raw = np.asarray(im) if mode in LABEL_MODES else None  # mode P: palette indices, not colours
        except Exception as e:
            raise BadSampleError(path, e) from e
        if raw is None:
            raise ValueError(f"{self.name} label {path} has mode {mode}: expected one channel of class indices")
        if raw.dtype != np.uint8:
            if raw.min() < 0 or raw.max() > 255:
                bad = int(raw.max() if raw.max() > 255 else raw.min())
                raise ValueError(f"{self.name} label {path} contains value {bad}; valid: {self.valid_text}")
            raw = raw.astype(np.uint8)
        counts = np.bincount(raw.ravel(), minlength=256)
        counts[self.valid_labels] = 0
        if counts.any():
            raise ValueError(f"{self.name} label {path} contains value(s) {np.flatnonzero(counts).tolist()}; "
                             f"valid: {self.valid_text}")
        return self.label_lut[raw]

    def check_sizes(self, i, image_hw, label):
        if label.shape != tuple(image_hw):
            h, w = image_hw
            raise ValueError(f"{self.name}: image {self.images[i]} is {w}x{h} but its label {self.labels[i]} is "
                             f"{label.shape[1]}x{label.shape[0]} (width x height)")

    def load(self, i):
        rgb, label = self.read_image(i), self.read_label(i)
        self.check_sizes(i, rgb.shape[:2], label)
        return rgb, label

    def load_encoded(self, i):
        """(encoded image bytes, (H, W), uint8 [H, W] label): `load` for a pipeline that decodes by itself."""
        data, hw = self.read_encoded(i)
        label = self.read_label(i)
        self.check_sizes(i, hw, label)
        return data, hw, label

    # ------------------------------------------------------------ skipping
    def first_readable(self, i, read):
        """(j, read(j)) for the first j in i, i + 1, ... (mod N) that reads, recording every bad file on the way;
        plain read(i) when skipping is off."""
        if not self.skip_bad:
            return i, read(i)
        n = len(self)
        for step in range(n):
            j = (i + step) % n
            if j in self.bad:
                continue
            try:
                return j, read(j)
            except BadSampleError as e:
                self.bad.add(j)
                self.skip_log.record(e)
        raise RuntimeError(f"{self.name} {self.split}: every one of the {n} samples is unreadable "
                           f"(see {self.skip_log.path})")

    def load_checked(self, i):
        j, (rgb, label) = self.first_readable(i, self.load)
        return j, rgb, label


def read_list(list_file, image_dir, label_dir, image_suffix=".jpg", label_suffix=".png"):
    """(images, labels) named by a split list (one stem per line, as in VOC's ImageSets); each file is checked to
    exist by `FileSegmentation.set_files`, whose error names the list."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"split list {list_file} does not exist")
    stems = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    return ([Path(image_dir) / f"{s}{image_suffix}" for s in stems],
            [Path(label_dir) / f"{s}{label_suffix}" for s in stems])
