"""Evaluation: the confusion-matrix mIoU against an independent computation, and sliding-window inference."""
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn as nn

from engine.evaluate import format_iou, sliding_logits, whole_logits
from engine.metrics import ConfusionMatrix


def test_miou_matches_numpy():
    rng = np.random.default_rng(0)
    k = 5
    gt = rng.integers(0, k, (3, 17, 19))
    gt[0, :4] = 255
    pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, k, gt.shape)) % k
    pred[gt == 3] = 1  # class 3 never predicted
    gt[gt == 4] = 0  # class 4 never in the ground truth ...
    pred[pred == 4] = 0  # ... nor predicted: IoU undefined, left out of the mean
    cm = ConfusionMatrix(k, torch.device("cpu"))
    cm.update(torch.from_numpy(pred[:2]), torch.from_numpy(gt[:2]))
    cm.update(torch.from_numpy(pred[2:]), torch.from_numpy(gt[2:]))  # accumulates
    r = cm.compute()
    keep = gt != 255
    ious = []
    for c in range(k):
        inter = ((pred == c) & (gt == c) & keep).sum()
        union = (((pred == c) | (gt == c)) & keep).sum()
        ious.append(inter / union if union else np.nan)
    assert r["iou"][3] == 0.0 and np.isnan(r["iou"][4])
    np.testing.assert_allclose(r["iou"][:4], ious[:4])
    assert r["miou"] == pytest.approx(np.nanmean(ious))
    assert r["acc"] == pytest.approx(((pred == gt) & keep).sum() / keep.sum())
    text = format_iou(r, ["a", "b", "c", "d", "e"], "title")
    assert "n/a" in text and "mIoU" in text


class Out(NamedTuple):
    backbone: torch.Tensor
    decoder: torch.Tensor
    logits: torch.Tensor


class Pointwise(nn.Module):
    """Full-resolution logits from a 1x1 conv: no context, so windows must stitch to the whole-image result."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return Out(y, y, y)


@pytest.mark.parametrize("size", [(20, 29), (13, 9)])  # larger than the window, and smaller (padded)
def test_sliding_window_stitches_exactly(size):
    torch.manual_seed(0)
    model = Pointwise()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        whole = whole_logits(model, x)
        slid = sliding_logits(model, x, (16, 16))
    assert slid.shape == whole.shape == (2, 4, *size)
    torch.testing.assert_close(slid, whole, rtol=1e-5, atol=1e-6)


def test_sliding_window_averages_overlaps():
    """A model whose output counts how often each pixel was seen: every pixel averages to 1."""

    class Ones(nn.Module):
        def forward(self, x):
            y = torch.ones(x.shape[0], 1, *x.shape[-2:])
            return Out(y, y, y)

    out = sliding_logits(Ones(), torch.zeros(1, 3, 40, 50), (16, 16))
    torch.testing.assert_close(out, torch.ones_like(out))
