"""Channel-wise distillation (CWD): KL between per-channel spatial distributions.

    L = T^2 / (B*C) * sum_{b,c} sum_{hw} q_t * (log q_t - log q_s),   q = softmax(z / T) over the H*W positions

Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction" (ICCV 2021). Their code divides
the summed KL by N*C exactly as here, so CWD's published weight (3 on logits, T = 4) carries over unchanged.
"""
import torch.nn.functional as F


def channel_kl_reference(student, teacher, temperature=4.0):
    """student, teacher: [B, C, H, W]. Returns a float32 scalar."""
    t = float(temperature)
    b, c = student.shape[:2]
    log_qs = F.log_softmax(student.float().reshape(b, c, -1) / t, dim=-1)  # [B, C, HW]
    log_qt = F.log_softmax(teacher.float().reshape(b, c, -1) / t, dim=-1)
    return (log_qt.exp() * (log_qt - log_qs)).sum() * (t * t) / (b * c)


def channel_kl(student, teacher, temperature=4.0):
    """Channel-wise KD loss; see the module docstring for the formula and normalisation."""
    return channel_kl_reference(student, teacher, temperature)
