"""The student's optimiser: SGD in one of the implementations of --optim-impl, its parameter groups (the head's
learning-rate multiplier) and the learning-rate schedules (poly, step)."""
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


def step_factor(it, iters, parts, gamma):
    """The step schedule: the run cut into `parts` equal parts, lr(it) = base_lr * gamma^(part of it), the first
    part 0. DFAD's --scheduler (StepLR, step 100 of 300 epochs, gamma 0.1 on CamVid): parts 3."""
    return gamma ** min(parts - 1, it * parts // iters)


def lr_factor(optim, it, iters=None):
    """The factor of the base learning rates at iteration `it` under OptimConfig `optim` (--schedule)."""
    iters = optim.iters if iters is None else iters
    if optim.schedule == "step":
        return step_factor(it, iters, optim.step_parts, optim.step_gamma)
    return poly_factor(it, iters, optim.poly_power)


def student_groups(student, method_groups, head_lr_mult):
    """The SGD parameter groups of a Segmentor student and a method's connectors -> [{"params", "lr_mult"}].

    The backbone trains at the base lr; the rest of the student (decoder head, classifier, auxiliary head) and the
    method's connectors at `head_lr_mult` times it, as semseg's and APD's code give their PPM, classifier, auxiliary
    head and student projector 10x the backbone's lr (APD tool/train.py: modules_ori / modules_new). With a
    multiplier of 1 there is one group for the student, as before the multiplier existed."""
    backbone = getattr(student, "backbone", None)
    if head_lr_mult == 1 or backbone is None:
        groups = [{"params": list(student.parameters()), "lr_mult": 1.0}]
    else:
        inside = {id(p) for p in backbone.parameters()}
        groups = [{"params": list(backbone.parameters()), "lr_mult": 1.0},
                  {"params": [p for p in student.parameters() if id(p) not in inside], "lr_mult": head_lr_mult}]
    return groups + [{**g, "lr_mult": head_lr_mult} for g in method_groups]
