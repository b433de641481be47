"""Masked average pooling: per image, the mean feature of the pixels of each class (class prototypes).

    proto[b, k] = sum_{hw: y_bhw = k} f[b, :, hw] / count[b, k],   count[b, k] = |{hw: y_bhw = k}|

Pixels labelled `ignore_index` (or any value outside [0, K)) are excluded; an absent class has count 0 and a
zero prototype. Used by Adaptive Perspective Distillation (Tian et al., TPAMI 2022) to build prototypes.
"""
import torch
import torch.nn.functional as F


def masked_avg_pool_reference(feat, labels, num_classes, ignore_index=255):
    """feat: [B, C, H, W]; labels: [B, H, W] integer at feature resolution.

    Returns (prototypes [B, K, C] float32, counts [B, K] float32).
    """
    b, c = feat.shape[:2]
    k = int(num_classes)
    lab = labels.reshape(b, -1).long()  # [B, HW]
    inside = (lab >= 0) & (lab < k) & (lab != ignore_index)
    onehot = F.one_hot(torch.where(inside, lab, 0), k).float() * inside[..., None]  # [B, HW, K]
    sums = torch.bmm(feat.float().reshape(b, c, -1), onehot)  # [B, C, K]
    counts = onehot.sum(1)  # [B, K]
    return sums.transpose(1, 2) / counts.clamp_min(1)[..., None], counts


def masked_avg_pool(feat, labels, num_classes, ignore_index=255):
    """Class prototypes and pixel counts; see the module docstring."""
    return masked_avg_pool_reference(feat, labels, num_classes, ignore_index)
