"""Segmentation metrics from a confusion matrix accumulated on the device and all-reduced over ranks."""
import torch

from engine.dist import all_reduce_sum


class ConfusionMatrix:
    """K x K counts, rows = ground truth, columns = prediction; ignored pixels are skipped."""

    def __init__(self, num_classes, device, ignore_index=255):
        self.k = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)

    def update(self, pred, label):
        """pred, label: [B, H, W] integer tensors on the matrix's device. No host sync."""
        keep = (label != self.ignore_index) & (label >= 0) & (label < self.k)
        idx = label[keep] * self.k + pred[keep]
        self.mat += torch.bincount(idx, minlength=self.k * self.k)

    def reduce(self):
        """Sum over ranks (in place); every rank then holds the global matrix."""
        all_reduce_sum(self.mat)
        return self

    def compute(self):
        """-> dict(miou, iou [K] (NaN for classes absent from both GT and prediction), acc, macc)."""
        m = self.mat.reshape(self.k, self.k).double().cpu()
        tp = m.diag()
        gt, pr = m.sum(1), m.sum(0)
        union = gt + pr - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        cls_acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, float("nan")))
        total = m.sum()
        return {
            "miou": float(iou[~iou.isnan()].mean()) if (~iou.isnan()).any() else 0.0,
            "iou": [float(v) for v in iou],
            "acc": float(tp.sum() / total) if total > 0 else 0.0,
            "macc": float(cls_acc[~cls_acc.isnan()].mean()) if (~cls_acc.isnan()).any() else 0.0,
        }
