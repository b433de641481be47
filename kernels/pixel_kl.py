"""Per-pixel KL divergence between teacher and student class distributions (Hinton KD for segmentation).

    L = T^2 * (1/|V|) * sum_{(b,h,w) in V} sum_c p_t * (log p_t - log p_s),   p = softmax(z / T) over C

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (2015); per-pixel form as in
Liu et al., "Structured Knowledge Distillation for Semantic Segmentation" (CVPR 2019).
"""
import torch
import torch.nn.functional as F


def pixel_kl_reference(student, teacher, temperature=1.0, valid=None):
    """student, teacher: [B, C, H, W] logits; valid: optional bool [B, H, W]. Returns a float32 scalar.

    V is the set of valid pixels (all pixels when `valid` is None); the loss is 0 when V is empty.
    """
    t = float(temperature)
    log_ps = F.log_softmax(student.float() / t, dim=1)  # [B, C, H, W]
    log_pt = F.log_softmax(teacher.float() / t, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)  # [B, H, W]
    if valid is None:
        return kl.mean() * (t * t)
    kl = torch.where(valid, kl, torch.zeros_like(kl))
    return kl.sum() / valid.sum().clamp_min(1) * (t * t)


def pixel_kl(student, teacher, temperature=1.0, valid=None):
    """Per-pixel KD loss; see the module docstring for the formula and normalisation."""
    return pixel_kl_reference(student, teacher, temperature, valid)
