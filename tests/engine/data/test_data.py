"""Data layer: synthetic generator, CamVid reader, augmentation semantics, sharded/resumable loaders."""
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import DATASETS, build_dataset, build_train_loader, build_val_loader
from engine.data import transforms as T
from engine.data.camvid import CamVid
from engine.data.loader import TrainBatchSampler, epoch_permutation
from engine.data.pascal_context import convert
from engine.data.synthetic import PATCH_IN, PATCH_OUT, SyntheticSegmentation, generate
from fake_datasets import make_ade20k, make_camvid, make_cityscapes, make_nyuv2, make_pascal_context, make_voc

CAMVID = Path(__file__).resolve().parents[3] / ".." / "shared" / "datasets" / "camvid"


def small_synthetic(length=26, **kw):
    """A short, small-image synthetic set so that loader tests stay fast."""
    kw.setdefault("crop", (24, 24))
    return SyntheticSegmentation("train", train=True, length=length, size=32, **kw)


def unnormalize(image, ds):
    """float32 [3, H, W] normalised -> float64 [H, W, 3] in 0..255."""
    mean, std = np.asarray(ds.mean), np.asarray(ds.std)
    return (image.numpy().transpose(1, 2, 0).astype(np.float64) * std + mean) * 255


# ---------------------------------------------------------------- common interface

def fake_root(name, tmp_path):
    """A tiny tree of dataset `name` in its layout ("" for synthetic)."""
    if name.startswith("pascal_context"):
        voc, source, _, _ = make_pascal_context(tmp_path)
        convert(source, voc)
        return voc
    makers = {"synthetic": lambda p: "", "camvid": make_camvid, "cityscapes": lambda p: make_cityscapes(p)[0],
              "ade20k": lambda p: make_ade20k(p)[0], "voc": lambda p: make_voc(p)[0],
              "nyuv2": lambda p: make_nyuv2(p)[0]}
    return makers[name](tmp_path)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_interface_attributes(name, tmp_path):
    root = fake_root(name, tmp_path)
    ds = build_dataset(name, "train", root=root)
    assert ds.name == name
    assert ds.num_classes == len(ds.class_names) == len(ds.palette)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in ds.palette)
    assert len(set(map(tuple, ds.palette))) == ds.num_classes
    assert ds.ignore_index == 255
    assert len(ds.mean) == len(ds.std) == 3
    s = ds[0]
    assert set(s) == {"image", "label", "index"} and s["index"] == 0
    assert s["image"].dtype == torch.float32 and s["image"].shape[0] == 3
    assert s["label"].dtype == torch.int64 and s["label"].shape == s["image"].shape[1:]
    rgb, _ = ds.load(0)  # eval mode: the image is the normalised file, nothing else
    np.testing.assert_allclose(unnormalize(s["image"], ds), rgb, atol=1e-3)


def test_build_dataset_errors():
    valid = "ade20k, camvid, cityscapes, nyuv2, pascal_context, pascal_context59, synthetic, voc"
    with pytest.raises(ValueError, match=valid):
        build_dataset("kitti", "train")
    for name in set(DATASETS) - {"synthetic"}:
        with pytest.raises(ValueError, match="data-root"):
            build_dataset(name, "train")
    with pytest.raises(ValueError, match="data-root"):
        build_dataset("camvid", "train")
    with pytest.raises(ValueError, match="splits"):
        build_dataset("synthetic", "test")


# ---------------------------------------------------------------- synthetic

def test_synthetic_deterministic_and_splits_differ():
    a = build_dataset("synthetic", "train")
    b = build_dataset("synthetic", "train", seed=5)  # the run seed changes augmentation only, not the images
    for i in (0, 7, 1999):
        sa, sb = a[i], b[i]
        assert torch.equal(sa["image"], sb["image"]) and torch.equal(sa["label"], sb["label"])
    train = [generate(0, 0, i)[0] for i in range(20)]
    val = [generate(0, 1, i)[0] for i in range(20)]
    assert not any(np.array_equal(t, v) for t in train for v in val)
    assert not np.array_equal(train[0], train[1])
    assert not np.array_equal(generate(1, 0, 0)[0], train[0])  # data_seed changes the images
    assert (len(a), len(build_dataset("synthetic", "val"))) == (2000, 200)


def test_synthetic_labels_and_all_classes():
    ds = build_dataset("synthetic", "val")
    seen = np.zeros(ds.num_classes, bool)
    start = time.perf_counter()
    for i in range(40):
        rgb, label = ds.load(i)
        assert rgb.shape == (96, 96, 3) and rgb.dtype == np.uint8 and label.shape == (96, 96)
        assert label.max() < ds.num_classes
        seen |= np.bincount(label.ravel(), minlength=ds.num_classes) > 0
    per_image = (time.perf_counter() - start) / 40
    assert seen.all(), [n for n, s in zip(ds.class_names, seen) if not s]
    assert per_image < 0.05, f"synthetic generation takes {per_image * 1e3:.1f} ms per image"  # sanity, not a benchmark


def _window_features(rgb, k=5):
    """Per pixel: mean and standard deviation of each colour channel over a k x k window, [H-k+1, W-k+1, 6].

    Through integral images: a window sum is S[y+k, x+k] - S[y, x+k] - S[y+k, x] + S[y, x].
    """
    x = rgb.astype(np.float64)
    feats = []
    for v in (x, x * x):
        s = np.zeros((v.shape[0] + 1, v.shape[1] + 1, 3))
        s[1:, 1:] = v.cumsum(0).cumsum(1)
        feats.append((s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]) / (k * k))
    mean, sq = feats
    return np.concatenate([mean, np.sqrt(np.maximum(sq - mean * mean, 0))], -1)


def _nearest_centroid_accuracy(feats_a, feats_b):
    """Fit class centroids on the first half of each class's samples, return balanced accuracy on the second."""
    fa, fb = np.concatenate(feats_a), np.concatenate(feats_b)
    ha, hb = len(feats_a) // 2, len(feats_b) // 2
    train_a, test_a = np.concatenate(feats_a[:ha]), np.concatenate(feats_a[ha:])
    train_b, test_b = np.concatenate(feats_b[:hb]), np.concatenate(feats_b[hb:])
    mu, sd = np.concatenate([fa, fb]).mean(0), np.concatenate([fa, fb]).std(0) + 1e-9
    ca, cb = ((train_a - mu) / sd).mean(0), ((train_b - mu) / sd).mean(0)

    def says_a(x):
        x = (x - mu) / sd
        return ((x - ca) ** 2).sum(1) < ((x - cb) ** 2).sum(1)
    return 0.5 * (says_a(test_a).mean() + (~says_a(test_b)).mean())


def test_context_classes_look_alike_locally():
    """Classes 6 and 7 (patch in / outside a ring) have the same local statistics: a nearest-centroid
    classifier on 5x5-window colour mean/std is at chance, while the same classifier easily tells objects
    from background (so the features are informative and the near-chance result means something)."""
    k, r = 5, 2
    inside, outside, objects, background = [], [], [], []
    for i in range(200):
        rgb, label = generate(0, 0, i)
        f = _window_features(rgb, k)                     # [92, 92, 6], centred on label[r:-r, r:-r]
        lab = label[r:-r, r:-r]
        # Only windows wholly inside one patch: a window straddling the edge sees the surroundings.
        core = np.lib.stride_tricks.sliding_window_view(label, (k, k)).reshape(*lab.shape, -1)
        pure = (core == lab[..., None]).all(-1)
        for cls, bucket in ((PATCH_IN, inside), (PATCH_OUT, outside), (0, background)):
            sel = pure & (lab == cls)
            if sel.any():
                bucket.append(f[sel])
        sel = pure & (lab >= 1) & (lab <= 4)
        if sel.any():
            objects.append(f[sel])
    mean_in, mean_out = np.concatenate(inside)[:, :3].mean(0), np.concatenate(outside)[:, :3].mean(0)
    assert np.linalg.norm(mean_in - mean_out) < 20, (mean_in, mean_out)   # out of 255 per channel
    acc = _nearest_centroid_accuracy(inside, outside)
    assert 0.35 < acc < 0.65, acc
    assert _nearest_centroid_accuracy(objects, background) > 0.8


def test_context_classes_differ_by_ring():
    """What tells classes 6 and 7 apart is the ring: from every patch-in-ring pixel, a ring pixel lies within
    one inner radius along the row or the column (unless occluded on all four sides)."""
    for i in range(30):
        rgb, label = generate(0, 1, i)
        ys, xs = np.nonzero(label == PATCH_IN)
        for y, x in zip(ys[::7], xs[::7]):
            row, col = label[y], label[:, x]
            # look for ring pixels along the row and column, within the ring's largest inner radius (21 px)
            left, right = row[max(x - 21, 0):x], row[x + 1:x + 22]
            up, down = col[max(y - 21, 0):y], col[y + 1:y + 22]
            hits = sum((seg == 5).any() for seg in (left, right, up, down))
            assert hits >= 1  # at least one side shows the ring (others may be occluded or off-image)


# ---------------------------------------------------------------- augmentation

def _random_label(rng, h, w, values):
    return rng.choice(np.asarray(values, np.uint8), (h, w))


def test_augment_never_invents_label_values():
    rng = np.random.default_rng(0)
    values = [0, 3, 7, 255]
    for trial in range(30):
        h, w = rng.integers(20, 70, 2)
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = _random_label(rng, h, w, values)
        p = T.sample_params(rng, (h, w), (48, 40), (0.3, 2.5), True, 30.0)
        image, out = T.augment(rgb, label, p, (48, 40))
        assert image.shape == (3, 48, 40) and image.dtype == np.float32 and out.shape == (48, 40)
        assert set(np.unique(out)) <= set(values)


def test_flip_twice_is_identity():
    rng = np.random.default_rng(1)
    image, label = rng.standard_normal((9, 13, 3)).astype(np.float32), _random_label(rng, 9, 13, [0, 1, 2])
    fi, fl = T.hflip(*T.hflip(image, label))
    assert np.array_equal(fi, image) and np.array_equal(fl, label)
    fi, fl = T.hflip(image, label)
    assert np.array_equal(fi[:, 0], image[:, -1]) and np.array_equal(fl[:, 0], label[:, -1])


def test_crop_with_padding_fills_ignore_and_mean():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    label = _random_label(rng, 30, 20, [1, 2])
    image, out = T.pad_crop(rgb, label, 0, 0, (40, 32))
    assert (out[30:] == 255).all() and (out[:, 20:] == 255).all()
    assert (image[30:] == 0).all() and (image[:, 20:] == 0).all()
    assert np.array_equal(out[:30, :20], label)
    np.testing.assert_allclose(image[:30, :20], (rgb / 255 - T.IMAGENET_MEAN) / T.IMAGENET_STD, atol=1e-5)
    # larger image: a plain window
    image, out = T.pad_crop(rgb, label, 5, 3, (10, 8))
    assert np.array_equal(out, label[5:15, 3:11])


def test_augment_fixed_params_compose_as_documented():
    """scale 1 + crop + flip equals slicing and mirroring the normalised image by hand."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    label = _random_label(rng, 40, 50, [0, 4, 9])
    p = T.AugParams(scale=1.0, top=7, left=11, flip=True, angle=0.0)
    image, out = T.augment(rgb, label, p, (24, 30))
    ref = ((rgb / 255 - T.IMAGENET_MEAN) / T.IMAGENET_STD)[7:31, 11:41][:, ::-1].transpose(2, 0, 1)
    np.testing.assert_allclose(image, ref, atol=1e-5)
    assert np.array_equal(out, label[7:31, 11:41][:, ::-1])


def test_resize_label_nearest_matches_pil_at_integer_factors():
    rng = np.random.default_rng(4)
    label = _random_label(rng, 17, 23, [0, 5, 10])
    for hw in [(34, 46), (51, 69)]:
        ref = np.asarray(Image.fromarray(label).resize((hw[1], hw[0]), Image.NEAREST))
        assert np.array_equal(T.resize_label(label, hw), ref)
    assert T.scaled_size((96, 96), 0.5) == (48, 48) and T.scaled_size((360, 480), 1.25) == (450, 600)


def _rotate_reference(image, label, angle):
    """float64 loops-free re-derivation of the documented rotation, independent of transforms.rotate."""
    H, W = label.shape
    t = math.radians(angle)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    px, py = xs + 0.5 - W / 2, ys + 0.5 - H / 2
    qx, qy = math.cos(t) * px - math.sin(t) * py + W / 2, math.sin(t) * px + math.cos(t) * py + H / 2
    out = np.zeros(image.shape, np.float64)
    fx, fy = qx - 0.5, qy - 0.5
    x0, y0 = np.floor(fx).astype(int), np.floor(fy).astype(int)
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1 - np.abs(fx - xi)) * (1 - np.abs(fy - yi))
            ok = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
            out[ok] += wgt[ok][:, None] * image[yi[ok], xi[ok]]
    lx, ly = np.floor(qx).astype(int), np.floor(qy).astype(int)
    ok = (lx >= 0) & (lx < W) & (ly >= 0) & (ly < H)
    lab = np.full((H, W), 255, np.uint8)
    lab[ok] = label[ly[ok], lx[ok]]
    # where q sits on a pixel edge, floor() may go either way in float32: not a defined outcome
    tie = (np.abs(qx - np.round(qx)) < 1e-4) | (np.abs(qy - np.round(qy)) < 1e-4)
    return out, lab, tie


@pytest.mark.parametrize("angle", [7.5, -23.0, 90.0])
@pytest.mark.parametrize("hw", [(20, 20), (17, 26)])
def test_rotate_matches_reference(angle, hw):
    rng = np.random.default_rng(5)
    image = rng.standard_normal((*hw, 3)).astype(np.float32)
    label = _random_label(rng, *hw, [1, 2, 3])
    got_image, got_label = T.rotate(image, label, angle)          # [3, H, W], [H, W]
    ref_image, ref_label, tie = _rotate_reference(image, label, angle)
    np.testing.assert_allclose(got_image.transpose(1, 2, 0), ref_image, atol=1e-4)
    assert np.array_equal(got_label[~tie], ref_label[~tie])
    assert set(np.unique(got_label[tie])) <= {1, 2, 3, 255}
    if angle == 90.0 and hw[0] == hw[1]:                           # a quarter turn is np.rot90 exactly
        np.testing.assert_allclose(got_image.transpose(1, 2, 0), np.rot90(image), atol=1e-5)
        assert np.array_equal(got_label, np.rot90(label))


def test_sample_params_ranges():
    rng = np.random.default_rng(6)
    for _ in range(200):
        p = T.sample_params(rng, (96, 128), (64, 64), (0.5, 2.0), True, 10.0)
        h, w = T.scaled_size((96, 128), p.scale)
        assert 0.5 <= p.scale <= 2.0 and -10 <= p.angle <= 10
        assert 0 <= p.top <= max(h - 64, 0) and 0 <= p.left <= max(w - 64, 0)
    p = T.sample_params(rng, (96, 128), (64, 64), (1.0, 1.0), False, 0.0)
    assert (p.scale, p.flip, p.angle) == (1.0, False, 0.0)


def test_train_sample_depends_on_key_only():
    ds = build_dataset("synthetic", "train", train=True, crop=(64, 64), rotate=10.0, seed=3)
    n = len(ds)
    a, b = ds[5], ds[5]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    later = ds[5 + 2 * n]  # same image, another epoch: another augmentation
    assert later["index"] == a["index"] == 5
    assert not torch.equal(a["image"], later["image"])
    other_seed = build_dataset("synthetic", "train", train=True, crop=(64, 64), rotate=10.0, seed=4)[5]
    assert not torch.equal(a["image"], other_seed["image"])
    assert a["image"].shape == (3, 64, 64) and a["label"].shape == (64, 64)
    with pytest.raises(IndexError):
        build_dataset("synthetic", "val")[200]


# ---------------------------------------------------------------- loaders

def _stream(ds, batch_size, iters, **kw):
    loader = build_train_loader(ds, batch_size, workers=0, **kw)
    return [next(loader) for _ in range(iters)]


def test_train_sampler_sharding_over_one_epoch():
    n, b, world = 103, 4, 2
    samplers = [TrainBatchSampler(n, b, seed=1, rank=r, world_size=world) for r in range(world)]
    per_rank = n // world
    assert samplers[0].iters_per_epoch == per_rank // b == 12
    keys = [[k for it in range(12) for k in s.batch(it)] for s in samplers]
    assert all(len(k) == 48 for k in keys)
    assert not set(keys[0]) & set(keys[1])                       # disjoint
    assert len(set(keys[0]) | set(keys[1])) == world * (per_rank // b) * b == 96
    perm = epoch_permutation(1, 0, n)
    assert keys[0] == perm[0::2][:48].tolist() and keys[1] == perm[1::2][:48].tolist()
    nxt = samplers[0].batch(12)                                   # first batch of epoch 1: keys n + i
    assert all(n <= k < 2 * n for k in nxt) and [k - n for k in nxt] != keys[0][:4]
    stream = iter(samplers[1])
    assert [next(stream) for _ in range(13)] == [samplers[1].batch(it) for it in range(13)]


def test_train_loader_batches_ranks_and_resume():
    ds = small_synthetic(rotate=5.0)
    b = 3
    # exact batch sizes, disjoint ranks over one epoch (26 // 2 = 13 per rank -> 4 batches)
    per_rank = [_stream(ds, b, 4, seed=2, rank=r, world_size=2) for r in range(2)]
    for batches in per_rank:
        for batch in batches:
            assert batch["image"].shape == (b, 3, 24, 24) and batch["label"].shape == (b, 24, 24)
            assert batch["index"].shape == (b,)
    idx = [torch.cat([x["index"] for x in batches]).tolist() for batches in per_rank]
    assert not set(idx[0]) & set(idx[1]) and len(set(idx[0]) | set(idx[1])) == 24
    # resume: the stream from start_iter=k is the tail of the stream from 0, across epoch boundaries
    full = _stream(ds, b, 11, seed=2)
    tail = _stream(ds, b, 5, seed=2, start_iter=6)
    for x, y in zip(full[6:], tail):
        assert torch.equal(x["index"], y["index"])
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert not torch.equal(full[0]["index"], _stream(ds, b, 1, seed=3)[0]["index"])


def test_train_loader_is_independent_of_workers():
    ds = small_synthetic(rotate=5.0)
    a = _stream(ds, 4, 3, seed=1)
    loader = build_train_loader(ds, 4, workers=2, seed=1)
    for x in a:
        y = next(loader)
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["index"], y["index"])


def test_train_loader_errors():
    ds = small_synthetic(length=10)
    with pytest.raises(ValueError, match="batch_size 6"):
        build_train_loader(ds, 6, workers=0, world_size=2)
    with pytest.raises(ValueError, match="train=True"):
        build_train_loader(build_dataset("synthetic", "val"), 2, workers=0)


@pytest.mark.parametrize("world", [1, 3, 4])
def test_val_loader_covers_every_index_once(world):
    ds = SyntheticSegmentation("val", length=10, size=32)
    seen = []
    for rank in range(world):
        for batch in build_val_loader(ds, 3, workers=0, rank=rank, world_size=world):
            assert batch["image"].shape[1:] == (3, 32, 32)
            seen += batch["index"].tolist()
    assert sorted(seen) == list(range(10))


# ---------------------------------------------------------------- CamVid

def test_camvid_listing_and_void(tmp_path):
    root = make_camvid(tmp_path)
    ds = CamVid("train", root=root)
    assert len(ds) == 3 and ds.num_classes == 11 and ds.class_names[0] == "Sky"
    assert [p.name for p in ds.images] == ["f000.jpg", "f001.png", "f002.jpg"]
    for i in range(3):
        raw = np.asarray(Image.open(root / "trainannot" / f"f{i:03d}.png")).astype(np.int64)
        got = ds[i]["label"].numpy()
        assert np.array_equal(got, np.where(raw == 11, 255, raw))
        assert (raw == 11).any()
    png = np.asarray(Image.open(root / "train" / "f001.png"))
    np.testing.assert_allclose(unnormalize(ds[1]["image"], ds), png, atol=1e-3)  # png read losslessly
    train = CamVid("train", root=root, train=True, crop=(16, 16), rotate=10)[4]
    assert train["index"] == 1 and train["image"].shape == (3, 16, 16)
    assert set(train["label"].unique().tolist()) <= set(range(11)) | {255}
    assert len(CamVid("val", root=root)) == 2


def test_camvid_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CamVid("train", root=tmp_path / "nowhere")
    root = make_camvid(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(root / "test")):
        CamVid("test", root=root)
    (root / "test").mkdir()
    (root / "testannot").mkdir()
    with pytest.raises(ValueError, match="no .png/.jpg images in " + str(root / "test")):
        CamVid("test", root=root)
    # an image without its label names both
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(root / "test" / "lonely.jpg")
    with pytest.raises(FileNotFoundError) as e:
        CamVid("test", root=root)
    assert "lonely.jpg" in str(e.value) and str(root / "testannot" / "lonely.png") in str(e.value)
    # a label value that is neither a class, void nor ignore: names the file and the value
    bad = np.zeros((24, 32), np.uint8)
    bad[3, 4] = 17
    Image.fromarray(bad).save(root / "testannot" / "lonely.png")
    ds = CamVid("test", root=root)
    with pytest.raises(ValueError, match=r"lonely\.png contains value\(s\) \[17\]"):
        ds[0]
    bad[3, 4] = 255  # explicit ignore is fine
    Image.fromarray(bad).save(root / "testannot" / "lonely.png")
    assert ds[0]["label"][3, 4] == 255
    # size mismatch names both files
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(root / "testannot" / "lonely.png")
    with pytest.raises(ValueError) as e:
        ds[0]
    assert "lonely.jpg" in str(e.value) and "lonely.png" in str(e.value) and "32x24" in str(e.value)


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"real CamVid not found at {CAMVID.resolve()}")
def test_real_camvid():
    train, val = CamVid("train", root=CAMVID), CamVid("val", root=CAMVID)
    assert (len(train), len(val)) == (367, 101)
    counts = np.zeros(256, np.int64)
    for ds in (train, val):
        for i in range(len(ds)):
            rgb, label = ds.load(i)  # raises on any out-of-range value
            assert rgb.shape == (360, 480, 3)
            counts += np.bincount(label.ravel(), minlength=256)
    assert counts[11:255].sum() == 0 and (counts[:11] > 0).all() and counts[255] > 0
    assert counts[3] == counts[:11].max()  # Road is the most frequent class


def test_val_resize_scales_the_shorter_side_as_torchvision_resize():
    """--val-resize N: DFAD's ExtResize(N) (torchvision Resize(int)): shorter side N, the longer
    int(N * long / short); the label by nearest neighbour, so no new label value appears."""
    from engine.data import transforms

    assert transforms.short_side_size((360, 480), 256) == (256, 341)
    assert transforms.short_side_size((480, 360), 256) == (341, 256)
    assert transforms.short_side_size((100, 100), 64) == (64, 64)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)
    label = rng.choice(np.array([0, 3, 255], np.uint8), (30, 50))
    img2, lab2 = transforms.resize_for_eval(rgb, label, 12, "short")
    assert img2.shape == (12, 20, 3) and lab2.shape == (12, 20)
    assert set(np.unique(lab2)) <= {0, 3, 255}
    ys, xs = transforms.nearest_indices(30, 12), transforms.nearest_indices(50, 20)
    assert np.array_equal(lab2, label[ys][:, xs])
    img3, lab3 = transforms.resize_for_eval(rgb, label, 20, "long")  # semseg: the image alone, longer side 20
    assert img3.shape == (12, 20, 3) and lab3 is label
    assert transforms.long_side_size((1024, 2048), 2048) == (1024, 2048)  # Cityscapes at base_size 2048: as is
    assert transforms.long_side_size((683, 512), 512) == (512, 384)
