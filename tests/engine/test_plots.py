"""engine/plots.py: the sample pictures of a run are spread over the validation split."""
import pytest
import torch

from engine.data.synthetic import SyntheticSegmentation
from engine.models import build_model
from engine.plots import plot_run


class Recorded:
    """A validation split of `n` items that records which ones are read."""

    def __init__(self, n):
        self.base, self.n, self.read = SyntheticSegmentation("val"), n, []
        self.palette, self.mean, self.std = self.base.palette, self.base.mean, self.base.std

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.read.append(i)
        return self.base[i % len(self.base)]


@pytest.mark.parametrize("n, want", [(101, [0, 33, 67, 100]), (2, [0, 1]), (4, [0, 1, 2, 3])])
def test_samples_are_spread_over_the_split(tmp_path, n, want):
    (tmp_path / "log.jsonl").write_text('{"kind": "train", "iter": 1, "loss": 1.0, "terms": {"ce": 1.0}}\n')
    val = Recorded(n)
    plot_run(tmp_path, "t", build_model("pspnet_tiny", 8), None, val, torch.device("cpu"))
    assert val.read == want and (tmp_path / "samples.png").exists()
