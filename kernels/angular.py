"""Angular distillation: squared distance between L2-normalised student and teacher features.

With n(x) = x / max(||x||_2, EPS), EPS = 1e-6 (the F.normalize convention: a zero vector normalises to
zero, never NaN, in value and gradient), per sample b and averaged over the batch:

    "layer"   (LAD): sum_i (n(s)_i - n(t)_i)^2                         norm over all C*H*W entries
    "channel" (CAD): (1/C) * sum_c sum_hw (n(s_c)_hw - n(t_c)_hw)^2    norm over H*W per channel
    "point"   (PAD): (1/(H*W)) * sum_hw sum_c (n(s_hw)_c - n(t_hw)_c)^2  norm over C per pixel

Each per-sample value lies in [0, 4]. Liu et al., "Rethinking Knowledge Distillation with Raw Features
for Semantic Segmentation" (WACV 2024).
"""
import torch.nn.functional as F

EPS = 1e-6
MODES = ("layer", "channel", "point")


def angular_loss_reference(student, teacher, mode):
    """student, teacher: [B, C, H, W] of the same shape. Returns a float32 scalar."""
    if mode not in MODES:
        raise ValueError(f"angular_loss: unknown mode {mode!r}; expected one of {MODES}")
    b, c = student.shape[:2]
    s = student.float().reshape(b, c, -1)  # [B, C, HW]
    t = teacher.float().reshape(b, c, -1)
    if mode == "layer":
        d = F.normalize(s.reshape(b, -1), dim=1, eps=EPS) - F.normalize(t.reshape(b, -1), dim=1, eps=EPS)
        return d.pow(2).sum(1).mean()
    if mode == "channel":
        d = F.normalize(s, dim=2, eps=EPS) - F.normalize(t, dim=2, eps=EPS)
        return d.pow(2).sum((1, 2)).mean() / c
    d = F.normalize(s, dim=1, eps=EPS) - F.normalize(t, dim=1, eps=EPS)
    return d.pow(2).sum((1, 2)).mean() / s.shape[2]


def angular_loss(student, teacher, mode):
    """Angular distillation loss (LAD/CAD/PAD); see the module docstring for the formulas."""
    return angular_loss_reference(student, teacher, mode)
