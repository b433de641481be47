"""NYUv2 (13 classes) in the DFAD layout: listing through splits.mat, val = test, the 0 -> void, k -> k - 1 label
mapping, errors naming the missing folder or file, and augmented training samples through build_dataset."""
import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import NYUv2, build_dataset, build_train_loader
from fake_datasets import make_nyuv2, write_mat

# class13Mapping.mat of ankurhanda/nyuv2-meta-data, labels 1..13, written out independently of the module
NAMES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table", "tv",
         "wall", "window")
TABLE = {0: 255, 255: 255, **{k: k - 1 for k in range(1, 14)}}


def mapped(raw):
    out = np.full(raw.shape, -1, np.int64)
    for value, cls in TABLE.items():
        out[raw == value] = cls
    return out


def test_listing_follows_splits_mat(tmp_path):
    root, _ = make_nyuv2(tmp_path, train=(3, 4, 6, 11), test=(1, 2, 9))
    for where in (root, tmp_path):  # the NYUv2 folder itself or the one holding it
        ds = NYUv2("train", root=where)
        assert len(ds) == 4 and ds.num_classes == 13 and ds.class_names == NAMES
    assert [p.name for p in ds.images] == ["2.png", "3.png", "5.png", "10.png"]  # image n is <n - 1>.png
    assert [p.name for p in ds.labels] == [f"new_nyu_class13_{n:04d}.png" for n in (3, 4, 6, 11)]
    assert all(p.parent.name == "train_labels_13" for p in ds.labels)
    test, val = NYUv2("test", root=root), NYUv2("val", root=root)
    assert len(test) == 3 and val.images == test.images and val.labels == test.labels  # no val split: val = test
    assert all(p.parent.name == "test_labels_13" for p in val.labels)


def test_labels_void_to_ignore_and_shifted(tmp_path):
    root, raw = make_nyuv2(tmp_path)
    for split, idx in (("train", (3, 4, 6)), ("test", (1, 2, 9))):
        ds = NYUv2(split, root=root)
        for i, n in enumerate(idx):
            label = ds[i]["label"].numpy()
            assert np.array_equal(label, mapped(raw[n]))
            assert label[0, 0] == 255 and label[0, -1] == 12  # raw 0 (void) and raw 13 (window)
        first = ds[0]["label"].numpy()
        assert (raw[idx[0]] == 255).any() and (first[raw[idx[0]] == 255] == 255).all()
        assert (first[raw[idx[0]] == 1] == 0).all() and (raw[idx[0]] == 1).any()  # bed: 1 -> 0


def test_unknown_label_value_names_the_file(tmp_path):
    root, raw = make_nyuv2(tmp_path)
    ds = NYUv2("test", root=root)
    bad = raw[2].copy()
    bad[3, 4] = 14
    Image.fromarray(bad).save(ds.labels[1])
    with pytest.raises(ValueError, match=r"new_nyu_class13_0002\.png contains value\(s\) \[14\]"):
        ds[1]


def test_missing_pieces_are_named(tmp_path):
    with pytest.raises(ValueError, match="data-root"):
        NYUv2("train")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        NYUv2("train", root=tmp_path / "nowhere")
    root, _ = make_nyuv2(tmp_path)
    with pytest.raises(ValueError, match=r"splits \('train', 'val', 'test'\)"):
        NYUv2("validation", root=root)
    (root / "480_640" / "IMAGE" / "5.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"image .*480_640/IMAGE/5\.png listed in .*splits\.mat"):
        NYUv2("train", root=root)
    (root / "nyuv2-meta-data" / "test_labels_13" / "new_nyu_class13_0009.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"expected .*test_labels_13/new_nyu_class13_0009\.png"):
        NYUv2("val", root=root)
    write_mat(root / "nyuv2-meta-data" / "splits.mat", {"trainNdxs": np.array([[3], [4]])})
    with pytest.raises(ValueError, match=r"splits\.mat has no numeric variable 'testNdxs'"):
        NYUv2("val", root=root)
    for p in (root / "nyuv2-meta-data" / "test_labels_13").iterdir():
        p.unlink()
    (root / "nyuv2-meta-data" / "test_labels_13").rmdir()
    with pytest.raises(FileNotFoundError, match=r"folder .*nyuv2-meta-data/test_labels_13 is missing"):
        NYUv2("test", root=root)
    (root / "nyuv2-meta-data" / "splits.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"split file .*nyuv2-meta-data/splits\.mat is missing"):
        NYUv2("train", root=root)


def test_build_dataset_trains_with_augmentation(tmp_path):
    root, _ = make_nyuv2(tmp_path, size=(30, 40))
    ds = build_dataset("nyuv2", "train", root=root, train=True, crop=(16, 24), rotate=10.0, seed=3)
    assert isinstance(ds, NYUv2) and ds.train
    allowed = set(range(13)) | {255}
    for key in range(2 * len(ds)):  # two epochs: key k augments image k % N
        s = ds[key]
        assert s["image"].shape == (3, 16, 24) and s["label"].shape == (16, 24) and s["index"] == key % len(ds)
        assert set(np.unique(s["label"].numpy()).tolist()) <= allowed
    batch = next(iter(build_train_loader(ds, 2, workers=0, loader="torch")))
    assert batch["image"].shape == (2, 3, 16, 24) and batch["label"].dtype == torch.int64
    val = build_dataset("nyuv2", "val", root=root)
    assert len(val) == 3 and val[0]["image"].shape == (3, 30, 40)
