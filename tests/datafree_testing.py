"""Shared by the data-free tests (tests/engine/datafree/, tests/engine/methods/test_dfad.py): CLI arguments,
run(), the image-pool helpers and the cheap module-scoped fixture random_teacher (a module imports it:
`from datafree_testing import random_teacher  # noqa: F401`). The trained teacher and the ADS pool, which cost
half a minute, are session fixtures of tests/engine/datafree/conftest.py, built once for every module there."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.models import build_model
from engine.train import main

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "datasets" / "camvid"
FAST = ["--crop", "32", "--batch-size", "4", "--workers", "0", "--val-size", "24", "--log-interval", "5"]
IN_POOL, PER_KIND = 24, 8  # in-distribution images in the ADS pool; foreign images of each kind
CROP = 48  # the teacher fixture's training crop: ADS scores at this size (--ads-view crop)


def run(tmp, *args):
    return main([*FAST, "--cache-dir", str(tmp / "cache"), *args])


def save_png(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(path)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    """An untrained pspnet_tiny saved as a teacher checkpoint: enough for mechanics, fast."""
    path = tmp_path_factory.mktemp("rt") / "teacher.pt"
    torch.manual_seed(0)
    torch.save(build_model("pspnet_tiny", 8).state_dict(), path)
    return str(path)


def foreign_images(n_each, rng):
    """Clearly foreign 96 x 96 images: uniform noise, sinusoidal plasma textures, CamVid frames when present."""
    out = {}
    out["noise"] = [rng.integers(0, 256, (96, 96, 3)) for _ in range(n_each)]
    yy, xx = np.mgrid[0:96, 0:96]
    plasma = []
    for _ in range(n_each):
        f, ph = rng.uniform(0.05, 0.5, 2), rng.uniform(0, 6, 3)
        plasma.append(np.stack([127 + 120 * np.sin(f[0] * xx + f[1] * yy * (c + 1) + ph[c]) for c in range(3)], -1))
    out["texture"] = plasma
    frames = sorted((CAMVID / "val").glob("*.*"))[::9][:n_each] if (CAMVID / "val").is_dir() else []
    out["camvid"] = [np.asarray(Image.open(p).convert("RGB").resize((128, 96))) for p in frames]
    return out
