"""engine/datafree/pool.py: listing and reading the --aux-data image pool, its errors, and its batch sampler."""
import numpy as np
import pytest
from PIL import Image

from datafree_testing import save_png
from engine.datafree import ads
from engine.datafree.pool import ImagePool, PoolBatchSampler, list_images
from engine.models import build_model


def test_pool_listing_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--aux-data .*nowhere.*does not exist"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="--aux-data .*empty: no .jpg/.jpeg/.png"):
        list_images(tmp_path / "empty")
    root = tmp_path / "p"
    save_png(root / "b" / "x.PNG", np.zeros((5, 7, 3)))
    Image.fromarray(np.zeros((6, 4, 3), np.uint8)).save(root / "a.jpg")
    save_png(root / ".segkd-ads" / "hidden.png", np.zeros((2, 2, 3)))
    (root / "b" / "broken.png").write_bytes(b"not an image")
    assert list_images(root) == ["a.jpg", "b/broken.png", "b/x.PNG"]
    data = ImagePool(root)
    item = data[2]
    assert item["image"].shape == (3, 5, 7) and "label" not in item and item["index"] == 2
    with pytest.raises(ValueError, match=r"cannot read image .*b/broken\.png"):
        data[1]
    with pytest.raises(ValueError, match=r"cannot read image .*b/broken\.png"):
        ads.score_pool(build_model("pspnet_tiny", 8).eval(), data)


def test_pool_sampler_is_a_pure_function_of_the_iteration():
    s = PoolBatchSampler(10, 4, seed=3, rank=1, world_size=2)
    a = [s.batch(it) for it in range(6)]
    resumed = PoolBatchSampler(10, 4, seed=3, rank=1, world_size=2, start_iter=3)
    assert [b for b, _ in zip(resumed, range(3))] == a[3:]
    assert all(len(set(k % 10 for k in b)) == 4 for b in a)  # distinct images within a batch
    other_rank = PoolBatchSampler(10, 4, seed=3, rank=0, world_size=2)
    assert other_rank.batch(0) != a[0]
    curriculum = PoolBatchSampler(10, 4, admitted=lambda it: 2 + it, seed=0)
    for it in range(8):
        assert all(k % 10 < 2 + it for k in curriculum.batch(it))
