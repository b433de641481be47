"""The expensive fixtures of the data-free tests, built once per session for every module in this folder."""
import numpy as np
import pytest

from datafree_testing import CROP, IN_POOL, PER_KIND, foreign_images, run, save_png
from engine.data.synthetic import SyntheticSegmentation


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """A small teacher trained briefly on the synthetic data (shared by the ADS and the end-to-end checks)."""
    tmp = tmp_path_factory.mktemp("teacher")
    run(tmp, "--method", "none", "--student", "pspnet_small", "--iters", "500", "--crop", str(CROP), "--batch-size",
        "8", "--out", str(tmp / "t"))
    return str(tmp / "t" / "last.pt")


@pytest.fixture(scope="session")
def pool(tmp_path_factory):
    """IN_POOL held-out synthetic images (val split) mixed with foreign ones, as a folder tree of png/jpg."""
    root = tmp_path_factory.mktemp("pool")
    val = SyntheticSegmentation("val")
    for i in range(IN_POOL):
        save_png(root / "in" / f"val{i:03d}.png", val.load(i)[0])
    for kind, images in foreign_images(PER_KIND, np.random.default_rng(0)).items():
        for i, rgb in enumerate(images):
            save_png(root / "foreign" / kind / f"{kind}{i}.png", rgb)
    return root
