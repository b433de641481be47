"""The student's optimiser: SGD in one of the implementations of --optim-impl, and the poly LR schedule."""
import torch

OPTIM_IMPLS = ("auto", "fused", "foreach", "plain", "apex")


def apex_fused_sgd():
    """apex.optimizers.FusedSGD, or None when apex (optional, never required) is not importable."""
    try:
        from apex.optimizers import FusedSGD
    except Exception:  # ImportError, or an apex built without its CUDA extensions
        return None
    return FusedSGD


def build_sgd(groups, hyper, impl, device):
    """SGD over `groups` with one of the implementations of --optim-impl -> (optimizer, resolved name).

    fused:   torch.optim.SGD(fused=True), one kernel over all parameters (CUDA and CPU)
    foreach: torch.optim.SGD(foreach=True), multi-tensor ops per parameter group
    plain:   the per-parameter loop
    apex:    apex.optimizers.FusedSGD (CUDA only; an error when apex is not importable)
    auto:    fused. Measured fastest of the three torch implementations by bench/bench_optim.py on this
             project's CPU (bench/results/optim_*.md); on CUDA PyTorch documents fused as the fastest.
    """
    if impl not in OPTIM_IMPLS:
        raise ValueError(f"--optim-impl {impl!r} is not one of {', '.join(OPTIM_IMPLS)}")
    if impl == "apex":
        fused_sgd = apex_fused_sgd()
        if fused_sgd is None:
            raise ValueError("--optim-impl apex: apex is not importable (NVIDIA apex is optional; build it from "
                             "source with its CUDA extensions, or use --optim-impl fused)")
        if device.type != "cuda":
            raise ValueError("--optim-impl apex needs CUDA (apex's FusedSGD has no CPU kernels)")
        return fused_sgd(groups, **hyper), "apex"
    if impl == "auto":
        impl = "fused"
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "plain": {"foreach": False}}[impl]
    return torch.optim.SGD(groups, **hyper, **flags), impl


def poly_factor(it, iters, power):
    """The poly schedule, per iteration: lr(it) = base_lr * (1 - it / iters)^power, 0 from `iters` on."""
    return (1 - it / iters) ** power if it < iters else 0.0
