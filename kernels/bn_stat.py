"""Distance of a batch's per-sample activation statistics from a BatchNorm layer's running statistics.

    d_b = || mean_hw(x_b) - running_mean ||_2 + || var_hw(x_b) - running_var ||_2

with the biased variance over H*W. The per-layer term of DeepInversion's feature-statistics prior
(Yin et al., CVPR 2020) taken per sample; used by DFSS's Approximate Distribution Sampling to score images.
"""


def bn_stat_distance_reference(x, running_mean, running_var):
    """x: [B, C, H, W]; running_mean, running_var: [C]. Returns [B] float32."""
    x = x.float()
    mean = x.mean(dim=(2, 3))  # [B, C]
    var = x.var(dim=(2, 3), unbiased=False)
    return (mean - running_mean.float()).norm(dim=1) + (var - running_var.float()).norm(dim=1)


def bn_stat_distance(x, running_mean, running_var):
    """Per-sample BN-statistic distance; see the module docstring."""
    return bn_stat_distance_reference(x, running_mean, running_var)
