"""On-disk datasets: listing, label mapping and class counts on tiny fake trees in each layout; conversion of
PASCAL-Context; bad input (missing, truncated and unreadable files, size mismatches) on the torch path."""
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import (ADE20K, BadSampleError, Cityscapes, PascalContext, PascalContext59, PascalVOC,
                         build_dataset, build_train_loader)
from engine.data.pascal_context import CONTEXT_IDS, convert, read_mat
from fake_datasets import (make_ade20k, make_camvid, make_cityscapes, make_pascal_context, make_voc, save,
                           smooth_image, write_mat)

# cityscapesScripts labels.py: (label id, train id) of the 19 evaluated classes, written out independently of
# the dataset's table
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def mapped(raw, table, default=255):
    """Apply a {raw value: class} dict pixel by pixel (the slow, obvious way)."""
    out = np.full(raw.shape, default, np.int64)
    for value, cls in table.items():
        out[raw == value] = cls
    return out


def class_counts(ds):
    """Pixels per class over the whole split, plus ignored pixels, from the dataset's samples."""
    counts = np.zeros(256, np.int64)
    for i in range(len(ds)):
        counts += np.bincount(ds[i]["label"].numpy().ravel(), minlength=256)
    return counts[:ds.num_classes], counts[255]


# ---------------------------------------------------------------- Cityscapes

def test_cityscapes_listing_mapping_and_counts(tmp_path):
    root, raw = make_cityscapes(tmp_path)
    ds = Cityscapes("train", root=root)
    assert ds.num_classes == 19 and ds.class_names[0] == "road" and ds.class_names[-1] == "bicycle"
    assert len(ds) == 4 and len(Cityscapes("val", root=root)) == 2
    assert [p.name for p in ds.images] == sorted(p.name for p in ds.images)
    assert all(p.name.endswith("_leftImg8bit.png") for p in ds.images)
    assert all(p.name.endswith("_gtFine_labelIds.png") for p in ds.labels)  # not the instanceIds beside them
    want_counts = np.zeros(19, np.int64)
    for i, path in enumerate(ds.labels):
        stem = path.name[:-len("_gtFine_labelIds.png")]
        want = mapped(raw[("train", stem)], CITYSCAPES_TRAIN_IDS)
        assert np.array_equal(ds[i]["label"].numpy(), want)
        want_counts += np.bincount(want[want < 255], minlength=19)
    counts, ignored = class_counts(ds)
    assert np.array_equal(counts, want_counts) and ignored > 0 and (counts > 0).sum() >= 10


def test_cityscapes_rejects_unknown_ids(tmp_path):
    root, _ = make_cityscapes(tmp_path)
    ds = Cityscapes("val", root=root)
    bad = np.zeros((16, 32), np.uint8)
    bad[2, 3] = 40
    Image.fromarray(bad).save(ds.labels[1])
    with pytest.raises(ValueError, match=rf"{ds.labels[1].name} contains value\(s\) \[40\]"):
        ds[1]
    with pytest.raises(FileNotFoundError, match="leftImg8bit/train is missing"):
        Cityscapes("train", root=tmp_path / "nowhere")


# ---------------------------------------------------------------- ADE20K

def test_ade20k_listing_mapping_and_sizes(tmp_path):
    folder, raw = make_ade20k(tmp_path)
    for root in (tmp_path, folder):  # the folder itself or the one holding it
        ds = ADE20K("val", root=root)
        assert len(ds) == 3 and ds.num_classes == 150 and ds.class_names[:3] == ("wall", "building", "sky")
    assert [p.name for p in ADE20K("train", root=folder).images] == [f"ADE_train_{i:08d}.jpg" for i in (1, 2, 3)]
    table = {k: k - 1 for k in range(1, 151)}  # 0 (other) -> ignore
    sizes = set()
    for i, path in enumerate(ds.labels):
        sample = ds[i]
        want = mapped(raw[("validation", path.stem)], table)
        assert np.array_equal(sample["label"].numpy(), want)
        sizes.add(tuple(sample["label"].shape))
        assert sample["image"].shape[1:] == sample["label"].shape
    assert len(sizes) == 3  # images of different sizes stay at their size
    counts, ignored = class_counts(ds)
    assert counts.sum() + ignored == sum(h * w for h, w in sizes) and ignored > 0


# ---------------------------------------------------------------- PASCAL VOC

def test_voc_aug_lists_and_labels(tmp_path):
    folder, raw = make_voc(tmp_path)
    ds = PascalVOC("train", root=tmp_path)  # VOCdevkit/VOC2012 is found below the root
    assert ds.root == folder and ds.num_classes == 21 and ds.class_names[15] == "person"
    assert len(ds) == 4 and all("train_aug" in p.name for p in ds.images)  # train -> train_aug.txt with SBD
    assert all(p.parent.name == "SegmentationClassAug" for p in ds.labels)
    assert len(PascalVOC("val", root=folder)) == 2 and len(PascalVOC("train_aug", root=folder)) == 4
    for i, path in enumerate(ds.labels):
        assert np.array_equal(ds[i]["label"].numpy(), raw[path.stem])


def test_voc_palette_pngs_read_as_indices(tmp_path):
    folder, raw = make_voc(tmp_path, aug=False)
    ds = PascalVOC("train", root=folder)
    assert len(ds) == 2 and all(p.parent.name == "SegmentationClass" for p in ds.labels)  # train.txt, no Aug
    for i, path in enumerate(ds.labels):
        with Image.open(path) as im:
            assert im.mode == "P"
            colours = np.asarray(im.convert("RGB"))
        assert not np.array_equal(colours[..., 0], raw[path.stem])  # decoding to colours would be wrong
        assert np.array_equal(ds[i]["label"].numpy(), raw[path.stem])
    counts, ignored = class_counts(ds)
    want = np.bincount(np.concatenate([raw[p.stem].ravel() for p in ds.labels]), minlength=256)
    assert np.array_equal(counts, want[:21]) and ignored == want[255]


def test_voc_list_naming_a_missing_file(tmp_path):
    folder, _ = make_voc(tmp_path)
    lst = folder / "ImageSets" / "Segmentation" / "val.txt"
    lst.write_text(lst.read_text() + "2007_missing_0001\n")
    with pytest.raises(FileNotFoundError) as e:
        PascalVOC("val", root=folder)
    assert "2007_missing_0001.jpg" in str(e.value) and str(lst) in str(e.value)
    save(smooth_image(np.random.default_rng(0), 20, 24), folder / "JPEGImages" / "2007_missing_0001.jpg")
    with pytest.raises(FileNotFoundError) as e:  # the image exists now, its label does not
        PascalVOC("val", root=folder)
    assert str(folder / "SegmentationClassAug" / "2007_missing_0001.png") in str(e.value) and str(lst) in str(e.value)
    with pytest.raises(FileNotFoundError, match="nosuch.txt"):
        PascalVOC("nosuch", root=folder)


# ---------------------------------------------------------------- PASCAL-Context

def test_read_mat_variables(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 460, (5, 7)).astype(np.uint16)
    for compress in (True, False):
        write_mat(tmp_path / "x.mat", {"b": np.ones((1, 2)), "LabelMap": a}, compress=compress)
        got = read_mat(tmp_path / "x.mat", "LabelMap")
        assert got.shape == (5, 7) and np.array_equal(got, a)  # column-major storage read back row-major
    with pytest.raises(KeyError, match=r"no numeric variable 'Other'.*'b', 'LabelMap'"):
        read_mat(tmp_path / "x.mat", "Other")
    (tmp_path / "y.mat").write_bytes(b"not a mat file" * 20)
    with pytest.raises(ValueError, match="y.mat is not a level-5 MAT-file"):
        read_mat(tmp_path / "y.mat", "LabelMap")


def test_pascal_context_conversion_and_both_class_sets(tmp_path):
    voc, source, ids, lists = make_pascal_context(tmp_path)
    with pytest.raises(FileNotFoundError, match="--convert"):
        PascalContext("train", root=voc)
    assert convert(source, tmp_path) == {"train": 3, "val": 2}  # Main/train.txt minus the image without a map
    order = {raw_id: k + 1 for k, raw_id in enumerate(sorted(CONTEXT_IDS))}  # alphabetical = id order
    for stem, raw in ids.items():
        png = np.asarray(Image.open(voc / "SegmentationClassContext" / f"{stem}.png"))
        assert np.array_equal(png, mapped(raw, order, default=0))  # every other id, and 0, -> background
    listed = (voc / "ImageSets" / "SegmentationContext" / "train.txt").read_text().split()
    assert listed == lists["train"][:-1]

    ds60, ds59 = PascalContext("train", root=tmp_path), PascalContext59("train", root=voc)
    assert (ds60.num_classes, ds59.num_classes) == (60, 59) and ds60.class_names[0] == "background"
    assert ds60.class_names[1:] == ds59.class_names and ds59.class_names[36] == "person"
    for i, path in enumerate(ds60.labels):
        want60 = mapped(ids[path.stem], order, default=0)
        assert np.array_equal(ds60[i]["label"].numpy(), want60)
        assert np.array_equal(ds59[i]["label"].numpy(), np.where(want60 == 0, 255, want60 - 1))
    counts60, _ = class_counts(ds60)
    counts59, ignored59 = class_counts(ds59)
    assert np.array_equal(counts59, counts60[1:]) and ignored59 == counts60[0] > 0


def test_pascal_context_conversion_checks_sizes(tmp_path):
    voc, source, ids, _ = make_pascal_context(tmp_path)
    stem = next(iter(ids))
    write_mat(source / f"{stem}.mat", {"LabelMap": np.zeros((5, 5))})
    with pytest.raises(ValueError) as e:
        convert(source, voc)
    assert f"{stem}.mat is 5x5" in str(e.value) and f"{stem}.jpg is 22x18" in str(e.value)


# ---------------------------------------------------------------- bad input, torch path

def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_truncated_and_unreadable_files_are_named(tmp_path):
    root = make_camvid(tmp_path, splits=(("train", 6),))
    ds = build_dataset("camvid", "train", root=root)
    _truncate(ds.images[2])                                  # f002.jpg
    with pytest.raises(BadSampleError, match="f002.jpg"):
        ds[2]
    ds.labels[4].write_bytes(b"\x89PNG\r\n\x1a\n garbage")   # f004.png label
    with pytest.raises(BadSampleError, match=str(ds.labels[4])):
        ds[4]
    assert ds[3]["index"] == 3


def test_skip_bad_samples_substitutes_and_counts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the skip logs go
    root = make_camvid(tmp_path, splits=(("train", 6),))
    ds = build_dataset("camvid", "train", root=root, train=True, crop=(16, 16), skip_bad=True)
    _truncate(ds.images[2])
    _truncate(ds.images[3], 0.3)
    assert ds[2]["index"] == 4 and ds[3]["index"] == 4 and ds[8]["index"] == 4  # next readable, any epoch
    assert ds.skip_log.count() == 2 and {p.split("/")[-1] for p in ds.skip_log.files()} == {"f002.jpg", "f003.png"}
    err = capsys.readouterr().err
    assert "f002.jpg" in err and "2 bad file(s) skipped so far" in err
    # worker processes record into the same log: a loader with 2 workers over all keys sees the same 2 files
    fresh = build_dataset("camvid", "train", root=root, train=True, crop=(16, 16), skip_bad=True)
    loader = build_train_loader(fresh, 2, workers=2, seed=0)
    seen = torch.cat([next(loader)["index"] for _ in range(6)])
    assert not ({2, 3} & set(seen.tolist())) and fresh.skip_log.count() == 2


def test_size_mismatch_names_both_files(tmp_path):
    folder, _ = make_ade20k(tmp_path)
    ds = ADE20K("train", root=folder, skip_bad=True)        # a mismatch is an error even when skipping
    save(np.zeros((5, 6), np.uint8), ds.labels[1])
    with pytest.raises(ValueError) as e:
        ds[1]
    assert str(ds.images[1]) in str(e.value) and str(ds.labels[1]) in str(e.value) and "6x5" in str(e.value)
