"""DALI loaders (CPU mode here: device_id=None) against the torch path: the same keys, identical labels and
near-identical images on fixed and random parameters, no new label values, disjoint covering shards, exact
resume, evaluation batches of mixed sizes, and bad files."""
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")

from engine.data import build_dataset, build_train_loader, build_val_loader, resolve_loader  # noqa: E402
from engine.data import transforms as T  # noqa: E402
from engine.data.camvid import CamVid  # noqa: E402
from engine.data.dali import DaliTrainLoader, DaliValLoader  # noqa: E402
from engine.data.loader import TrainBatchSampler  # noqa: E402
from engine.data.synthetic import SyntheticSegmentation  # noqa: E402
from fake_datasets import make_ade20k, make_camvid, make_voc  # noqa: E402

CAMVID = Path(__file__).resolve().parents[3] / ".." / "shared" / "datasets" / "camvid"


class FixedParams(CamVid):
    """CamVid whose augmentation parameters are given per key (`table`) instead of drawn."""
    table = {}

    def params(self, key, image_hw):
        return self.table[key]


def streams(ds, batch_size, iters, *, workers=0, **kw):
    """The first `iters` batches of the torch and of the DALI training loader."""
    torch_loader = build_train_loader(ds, batch_size, workers=0, loader="torch", **kw)
    dali_loader = build_train_loader(ds, batch_size, workers=workers, loader="dali", **kw)
    return [next(torch_loader) for _ in range(iters)], [next(dali_loader) for _ in range(iters)]


def check_structure(batch, b, hw):
    assert set(batch) == {"image", "label", "index"}
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (b, 3, *hw)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (b, *hw)
    assert batch["index"].dtype == torch.int64 and batch["index"].shape == (b,)


def test_fixed_flip_and_crop_identical(tmp_path):
    """scale 1, crop windows (padded where the crop is taller than the image) and flips: labels identical,
    images equal up to float round-off; checked against an independent slice of the file as well."""
    root = make_camvid(tmp_path, splits=(("train", 4),), size=(24, 32))
    ds = FixedParams("train", root=root, train=True, crop=(28, 20))
    rng = np.random.default_rng(0)
    # keys of 3 epochs, and of the batches DALI prepares ahead
    ds.table = {k: T.AugParams(1.0, 0, int(rng.integers(0, 13)), bool(k % 2), 0.0) for k in range(40)}
    ref, got = streams(ds, 2, 6)  # three epochs of 2 batches
    for x, y in zip(ref, got):
        check_structure(y, 2, (28, 20))
        assert torch.equal(x["index"], y["index"])
        assert torch.equal(x["label"], y["label"])
        torch.testing.assert_close(y["image"], x["image"], atol=1e-5, rtol=0)
    key = TrainBatchSampler(len(ds), 2).batch(0)[0]
    raw = ds.load(key % len(ds))[1]
    p = ds.table[key]
    want = np.full((28, 20), 255, np.int64)
    want[:24] = raw[:, p.left:p.left + 20]
    assert torch.equal(got[0]["label"][0], torch.from_numpy(want[:, ::-1].copy() if p.flip else want))


@pytest.mark.parametrize("rotate", [0.0, 10.0])
def test_random_params_same_stream(rotate, tmp_path):
    """Random scale 0.5-2, crop, flip (and rotation): the same samples, identical labels (up to exact
    rotation ties), never a new label value, images within resampling round-off of PIL's."""
    root = make_camvid(tmp_path, splits=(("train", 5),), size=(36, 48))
    ds = CamVid("train", root=root, train=True, crop=(32, 40), rotate=rotate, seed=3)
    allowed = {int(v) for i in range(len(ds)) for v in np.unique(ds.load(i)[1])} | {255}
    ref, got = streams(ds, 2, 6, seed=1)
    mismatch = diffs = 0.0
    for x, y in zip(ref, got):
        check_structure(y, 2, (32, 40))
        assert torch.equal(x["index"], y["index"])
        assert set(y["label"].unique().tolist()) <= allowed
        mismatch = max(mismatch, (x["label"] != y["label"]).float().mean().item())
        d = (x["image"] - y["image"]).abs()
        diffs = max(diffs, d.mean().item())
        assert d.max() < 0.2  # 0.2 normalised ~ 12 grey levels, at the sharp edges of the shapes
    assert diffs < 0.01
    if rotate:
        assert mismatch < 2e-3  # floor() of a source point lying exactly on a pixel edge
    else:
        assert mismatch == 0


def test_shards_disjoint_and_cover():
    ds = SyntheticSegmentation("train", train=True, length=22, size=32, crop=(24, 24), seed=1)
    per_rank = []
    for rank in range(2):
        loader = DaliTrainLoader(ds, 3, workers=0, seed=4, rank=rank, world_size=2, device_id=None)
        assert loader.iters_per_epoch == 3  # 11 per rank -> 3 batches of 3
        per_rank.append(torch.cat([next(loader)["index"] for _ in range(3)]).tolist())
        sampler = loader.sampler
        assert per_rank[-1] == [k % 22 for it in range(3) for k in sampler.batch(it)]
    assert not set(per_rank[0]) & set(per_rank[1]) and len(set(per_rank[0]) | set(per_rank[1])) == 18


def test_resume_is_exact_and_workers_agree():
    """start_iter=k continues the stream bit-exactly across epochs; Python worker processes change nothing."""
    ds = SyntheticSegmentation("train", train=True, length=10, size=32, crop=(24, 24), rotate=8.0, seed=2)
    full = DaliTrainLoader(ds, 3, workers=0, seed=5, device_id=None)
    first = [next(full) for _ in range(7)]  # 3 iterations per epoch: crosses two epoch boundaries
    held = first[0]["image"].clone()
    tail = DaliTrainLoader(ds, 3, workers=1, seed=5, start_iter=4, device_id=None)
    for x in first[4:]:
        y = next(tail)
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["label"], y["label"])
        assert torch.equal(x["image"], y["image"])
    assert torch.equal(first[0]["image"], held)  # later batches never overwrite an earlier one


def test_eval_batches_mixed_sizes(tmp_path):
    """Whole images of different sizes, padded per batch exactly as the torch path's pad_collate pads them."""
    folder, _ = make_ade20k(tmp_path, counts=(("validation", 5),))
    ds = build_dataset("ade20k", "val", root=folder)
    for world in (1, 2):
        for rank in range(world):
            ref = list(build_val_loader(ds, 2, workers=0, rank=rank, world_size=world, loader="torch"))
            dali = DaliValLoader(ds, 2, workers=0, rank=rank, world_size=world, device_id=None)
            for _ in range(2):  # iterable again (the next evaluation)
                got = list(dali)
                assert len(got) == len(ref)
                for x, y in zip(ref, got):
                    assert torch.equal(x["index"], y["index"]) and torch.equal(x["label"], y["label"])
                    assert y["image"].dtype == torch.float32 and y["image"].shape == x["image"].shape
                    torch.testing.assert_close(y["image"], x["image"], atol=1e-5, rtol=0)
    big = list(DaliValLoader(ds, 5, workers=0, device_id=None))[0]
    assert big["label"].shape == (5, 36, 28) and (big["label"][0, 20:] == 255).all()  # padding is ignored
    subset = torch.utils.data.Subset(ds, [3, 1])
    assert list(DaliValLoader(subset, 4, workers=0, device_id=None))[0]["index"].tolist() == [3, 1]


def test_voc_palette_labels_through_dali(tmp_path):
    folder, raw = make_voc(tmp_path, aug=False)
    ds = build_dataset("voc", "val", root=folder)
    got = list(build_val_loader(ds, 2, workers=0, loader="dali"))[0]
    for k, i in enumerate(got["index"].tolist()):
        assert np.array_equal(got["label"][k].numpy(), raw[ds.labels[i].stem])  # indices, not colours


def _corrupt_png_data(path):
    """Keep the header and the IEND trailer, garble the compressed pixels: only decoding finds out."""
    data = bytearray(path.read_bytes())
    start = data.find(b"IDAT") + 20
    data[start:start + 40] = b"\x55" * 40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_files_named_or_skipped(workers, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the skip log goes
    root = make_camvid(tmp_path, splits=(("train", 6),))
    ds = build_dataset("camvid", "train", root=root, train=True, crop=(16, 16))
    data = ds.images[2].read_bytes()
    ds.images[2].write_bytes(data[:len(data) // 2])   # truncated jpg: caught before decoding
    with pytest.raises(ValueError, match="f002.jpg"):
        loader = DaliTrainLoader(ds, 2, workers=workers, device_id=None)
        [next(loader) for _ in range(3)]
    ds.images[2].write_bytes(data)
    _corrupt_png_data(ds.images[3])                   # f003.png: only the decoder fails
    with pytest.raises(ValueError, match="f003.png"):
        loader = DaliTrainLoader(ds, 2, workers=workers, device_id=None)
        [next(loader) for _ in range(3)]
    # skipping: the DALI stream equals the torch stream, which substitutes the next readable image
    skipping = build_dataset("camvid", "train", root=root, train=True, crop=(16, 16), skip_bad=True)
    ref, got = streams(skipping, 2, 3, workers=workers)
    for x, y in zip(ref, got):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["label"], y["label"])
    assert 3 not in torch.cat([y["index"] for y in got]).tolist() and skipping.skip_log.count() == 1


def test_size_mismatch_names_both_files(tmp_path):
    root = make_camvid(tmp_path, splits=(("val", 3),))
    ds = build_dataset("camvid", "val", root=root)
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(ds.labels[1])
    with pytest.raises(ValueError) as e:
        list(DaliValLoader(ds, 3, workers=1, device_id=None))
    assert str(ds.images[1]) in str(e.value) and str(ds.labels[1]) in str(e.value)


def test_loader_choice():
    assert resolve_loader("torch") == "torch" and resolve_loader("dali") == "dali"
    assert resolve_loader("auto") == ("dali" if torch.cuda.is_available() else "torch")
    with pytest.raises(ValueError, match="auto, dali, torch"):
        resolve_loader("fast")


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"real CamVid not found at {CAMVID.resolve()}")
def test_real_camvid_matches_torch_path():
    ds = CamVid("train", root=CAMVID, train=True, crop=(96, 128), seed=1)
    ref, got = streams(ds, 2, 3, seed=2)
    for x, y in zip(ref, got):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["label"], y["label"])
        d = (x["image"] - y["image"]).abs()
        assert d.mean() < 0.005 and d.max() < 0.1


def test_trainer_resume_with_dali_is_exact(tmp_path):
    """Through the CLI: 2 iterations straight == 1, resume, 1 more, with --loader dali (CPU weights equal)."""
    from engine.checkpoint import load_checkpoint
    from engine.train import main
    common = ["--crop", "32", "--batch-size", "2", "--workers", "1", "--val-size", "3", "--loader", "dali",
              "--method", "none", "--student", "pspnet_tiny", "--iters", "2", "--ckpt-interval", "1",
              "--keep-ckpts", "3", "--rotate", "10", "--cache-dir", str(tmp_path / "cache")]
    main([*common, "--out", str(tmp_path / "straight")])
    mid = tmp_path / "straight" / "ckpt_0000001.pt"
    main([*common, "--out", str(tmp_path / "resumed"), "--resume", str(mid)])
    a, b = (load_checkpoint(tmp_path / d / "last.pt")["model"] for d in ("straight", "resumed"))
    for name, v in a.items():
        assert torch.equal(v, b[name]), f"{name} differs after resume"
    assert any(not torch.equal(v, load_checkpoint(mid)["model"][k]) for k, v in a.items() if v.is_floating_point())
