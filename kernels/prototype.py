"""APD observation step: pixel-to-prototype cosine similarities and the KL between the two observations.

For L2-normalised pixel features f [B, D, H, W] and class prototypes A [B, K, D] of one image,

    o[b, k, hw] = cos(f[b, :, hw], A[b, k]) / tau      for classes present in image b
    o[b, k, hw] = ABSENT (= -1e4)                      for absent classes (softmax weight exactly 0 in fp32)
    p_a = softmax_k(o)

    L_ob = (1 / (B*H*W)) * sum_{b,hw} sum_k p_a,t * (log p_a,t - log p_a,s)

Tian et al., "Adaptive Perspective Distillation for Semantic Segmentation" (TPAMI 2022), Eq. for the
observation loss. An image with no present class gives a uniform observation on both sides and L_ob = 0.
"""
import torch
import torch.nn.functional as F

ABSENT = -1e4
EPS = 1e-6


def prototype_logits_reference(feat, protos, present, tau):
    """feat [B, D, H, W] (pixel features), protos [B, K, D], present [B, K] bool -> logits [B, K, H, W] float32.

    Features and prototypes are normalised here (n(x) = x / max(||x||, EPS)), so the dot product is a cosine.
    """
    b, d, h, w = feat.shape
    f = F.normalize(feat.float().reshape(b, d, h * w), dim=1, eps=EPS)  # [B, D, HW]
    a = F.normalize(protos.float(), dim=2, eps=EPS)  # [B, K, D]
    logits = torch.bmm(a, f) / tau  # [B, K, HW]
    logits = torch.where(present[..., None], logits, torch.full_like(logits, ABSENT))
    return logits.reshape(b, -1, h, w)


def prototype_kl_reference(feat_s, feat_t, protos_s, protos_t, present, tau):
    """L_ob: pixel-mean KL(p_a,t || p_a,s). Float32 scalar. The caller detaches the teacher side."""
    from kernels.pixel_kl import pixel_kl_reference

    logits_s = prototype_logits_reference(feat_s, protos_s, present, tau)
    logits_t = prototype_logits_reference(feat_t, protos_t, present, tau)
    return pixel_kl_reference(logits_s, logits_t, 1.0)


def prototype_logits(feat, protos, present, tau):
    """Observation logits cos(f, A)/tau with absent classes masked; see the module docstring."""
    return prototype_logits_reference(feat, protos, present, tau)


def prototype_kl(feat_s, feat_t, protos_s, protos_t, present, tau):
    """APD observation loss L_ob; see the module docstring."""
    return prototype_kl_reference(feat_s, feat_t, protos_s, protos_t, present, tau)
