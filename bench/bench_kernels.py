"""Benchmark the distillation losses: the eager code users run today, torch.compile, Liger-Kernel, and ours.

    python bench/bench_kernels.py                  # every op, the issue's shapes, on the GPU
    python bench/bench_kernels.py --op pixel_kl    # one op
    python bench/bench_kernels.py --small          # tiny shapes: a CPU smoke run (eager vs our torch path)
    python bench/bench_kernels.py --small --interpret   # CPU, with our Triton kernels interpreted (slow)

Providers, side by side in one run, forward and forward+backward:
  eager    the loss written the way published code writes it: CIRKD's CriterionKD (NHWC permute, log_softmax,
           softmax, F.kl_div) for pixel_kl, CIRKD's CriterionCWD (softmax, .log(), KLDivLoss) for channel_kl,
           IFVD's per-class masked-mean loop (CIRKD losses/ifvd.py) for masked_avg_pool, and our plain-torch
           reference for the ops without a published fused-or-not baseline (angular, bn_stat, prototype_kl); the
           unfused F.interpolate + F.cross_entropy task loss (upsampled_ce); CIRKD's CriterionStructuralKD after its
           pooling, two [B, N, N] maps (pairwise)
  compile  torch.compile of our torch reference (GPU only by default: Inductor on CPU needs minutes per shape)
  liger    Liger-Kernel's LigerKLDIVLoss on NHWC-permuted log-probabilities (pixel_kl; when liger_kernel imports)
  ours     the public `kernels` entry point: the Triton kernels on CUDA, the torch reference on CPU
           (the Triton kernels through the interpreter with --interpret)
  cpp      the same entry point under SEGKD_KERNELS=cuda: the C++ kernels of csrc/ (CUDA kernels on a GPU, their
           CPU twins on CPU) for the ops that have them (every op here but prototype_kl), built on first use

Figures: median milliseconds (triton.testing.do_bench on a GPU, wall clock on CPU); GB/s of compulsory
traffic (each input read once, each output and input gradient written once: the least any implementation
must move); that as a fraction of the device-to-device copy bandwidth measured in the same run; peak
memory allocated above the inputs (CUDA only). Scalar losses are backpropagated with grad_output = 0.5, as
a weighted loss is in training. Results go to bench/results/kernels_<device>.md and .json.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OPS = ("pixel_kl", "channel_kl", "angular", "masked_avg_pool", "bn_stat", "prototype_kl", "prototype_logits",
       "prototype_ce", "upsampled_ce", "pairwise")
PROVIDERS = ("eager", "compile", "liger", "ours", "cpp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default="all", choices=("all",) + OPS)
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--interpret", action="store_true",
                   help="CPU only: run our Triton kernels through TRITON_INTERPRET=1 for the `ours` provider")
    p.add_argument("--providers", default=None,
                   help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all that apply to the device)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions on CPU (default 20; GPU: do_bench)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"), help="directory for the results")
    args = p.parse_args(argv)
    if args.providers:
        unknown = set(args.providers.split(",")) - set(PROVIDERS)
        if unknown:
            p.error(f"--providers: unknown {sorted(unknown)}; expected a subset of {', '.join(PROVIDERS)}")
    return args


# Parsed here, not in main, so that --interpret is in the environment before triton is first imported
# (kernels/_dispatch.py explains why); a script importing this module (bench/gpu_suite.py) sets it itself.
ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.interpret:
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.device import device_name, slug  # noqa: E402
import kernels  # noqa: E402
from kernels import _cpp, _dispatch  # noqa: E402
from kernels.angular import angular_loss_reference  # noqa: E402
from kernels.bn_stat import bn_stat_distance_reference  # noqa: E402
from kernels.channel_kl import channel_kl_reference  # noqa: E402
from kernels.masked_avg_pool import masked_avg_pool_reference  # noqa: E402
from kernels.pairwise import pairwise_similarity_reference  # noqa: E402
from kernels.pixel_kl import pixel_kl_reference  # noqa: E402
from kernels.prototype import prototype_kl_reference, prototype_logits_reference  # noqa: E402
from kernels.upsampled_ce import upsampled_cross_entropy_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GO = 0.5  # grad_output of a scalar loss


# ----- eager baselines, written as the published code writes them -----

def cirkd_kd(student, teacher, temperature=1.0):
    """CIRKD losses/kd.py CriterionKD: NHWC rows, log_softmax / softmax, KL with batchmean over pixels."""
    c = student.shape[1]
    s = student.permute(0, 2, 3, 1).contiguous().view(-1, c)
    t = teacher.permute(0, 2, 3, 1).contiguous().view(-1, c)
    return F.kl_div(F.log_softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1),
                    reduction="batchmean") * temperature ** 2


def cirkd_cwd(student, teacher, temperature=4.0):
    """CIRKD losses/cwd.py CriterionCWD(norm_type='channel', divergence='kl')."""
    n, c = student.shape[:2]
    norm_s = (student / temperature).reshape(n, c, -1).softmax(dim=-1)
    norm_t = (teacher.detach() / temperature).reshape(n, c, -1).softmax(dim=-1)
    return F.kl_div(norm_s.log(), norm_t, reduction="sum") / (n * c) * temperature ** 2


def ifvd_class_means(feat, labels, num_classes):
    """The per-class masked mean of CIRKD losses/ifvd.py: one masked pass over the features per class."""
    protos = []
    for k in range(num_classes):
        mask = (labels == k).unsqueeze(1).to(feat.dtype)  # [B, 1, H, W]
        protos.append((mask * feat).sum((2, 3)) / (mask.sum((2, 3)) + 1e-6))  # [B, C]
    return torch.stack(protos, 1)  # [B, K, C]


def unfused_ce(logits, labels):
    """The task loss as every segmentation codebase writes it: upsample the logits, then cross-entropy."""
    z = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(z, labels, ignore_index=255)


def liger_kd(student, teacher, temperature=1.0):
    """Liger-Kernel's fused KL on NHWC rows; the log-softmaxes stay in torch."""
    from liger_kernel.transformers.kl_div import LigerKLDIVLoss
    c = student.shape[1]
    s = F.log_softmax(student.permute(0, 2, 3, 1).reshape(-1, c).float() / temperature, dim=1)
    t = F.log_softmax(teacher.permute(0, 2, 3, 1).reshape(-1, c).float() / temperature, dim=1)
    return LigerKLDIVLoss(reduction="batchmean", log_target=True)(s, t) * temperature ** 2


def has_liger():
    try:
        import liger_kernel.transformers.kl_div  # noqa: F401
        return True
    except Exception:
        return False


# ----- cases: op -> list of (label, make_inputs, {provider: fn}, bytes_fwd, bytes_fwd_bwd) -----

def _elt(dtype):
    return torch.finfo(dtype).bits // 8


def _rand(*shape, dtype):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def cases(op, small):
    if op in ("pixel_kl", "channel_kl"):
        # small: CPU shapes; 8x19x64x128 is the workload's logits (student output stride 8 at 512x1024)
        shapes = ([(2, 19, 32, 64, d) for d in (torch.bfloat16, torch.float32)] + [(1, 150, 16, 16, torch.bfloat16)]
                  + [(8, 19, 64, 128, d) for d in (torch.bfloat16, torch.float32)]
                  if small else
                  [(8, 19, h, w, d) for h, w in ((512, 1024), (64, 128)) for d in (torch.bfloat16, torch.float32)]
                  + [(8, 150, 512, 512, torch.bfloat16), (8, 150, 64, 64, torch.bfloat16)])
        ours = kernels.pixel_kl if op == "pixel_kl" else kernels.channel_kl
        ref = pixel_kl_reference if op == "pixel_kl" else channel_kl_reference
        eager = cirkd_kd if op == "pixel_kl" else cirkd_cwd
        temp = 1.0 if op == "pixel_kl" else 4.0
        for b, c, h, w, d in shapes:
            n = b * c * h * w * _elt(d)
            provs = {"eager": lambda s, t: eager(s, t, temp), "compile": lambda s, t: ref(s, t, temp),
                     "ours": lambda s, t: ours(s, t, temp), "cpp": lambda s, t: ours(s, t, temp)}
            if op == "pixel_kl":
                provs["liger"] = lambda s, t: liger_kd(s, t, temp)
            yield (f"{b}x{c}x{h}x{w}", d, lambda b=b, c=c, h=h, w=w, d=d: [_rand(b, c, h, w, dtype=d) * 3,
                                                                         _rand(b, c, h, w, dtype=d) * 3],
                   provs, 2 * n, 3 * n)
    elif op == "angular":
        shapes = ([(2, 64, 16, 32, torch.float32), (2, 256, 32, 64, torch.bfloat16)] if small else
                  [(8, 512, 64, 128, d) for d in (torch.bfloat16, torch.float32)])
        for b, c, h, w, d in shapes:
            n = b * c * h * w * _elt(d)
            for mode in ("layer", "channel", "point"):
                f = lambda s, t, m=mode: angular_loss_reference(s, t, m)
                yield (f"{mode} {b}x{c}x{h}x{w}", d, lambda b=b, c=c, h=h, w=w, d=d: [_rand(b, c, h, w, dtype=d),
                                                                                      _rand(b, c, h, w, dtype=d)],
                       {"eager": f, "compile": f, "ours": lambda s, t, m=mode: kernels.angular_loss(s, t, m),
                        "cpp": lambda s, t, m=mode: kernels.angular_loss(s, t, m)},
                       2 * n, 3 * n)
    elif op == "masked_avg_pool":
        shapes = ([(2, 64, 16, 32, 19, torch.float32), (2, 256, 32, 64, 19, torch.bfloat16)] if small else
                  [(8, 512, 64, 128, 19, d) for d in (torch.bfloat16, torch.float32)]
                  + [(8, 512, 64, 64, 150, torch.bfloat16)])
        for b, c, h, w, k, d in shapes:
            n = b * c * h * w * _elt(d)
            lab_bytes = b * h * w * 8

            def make(b=b, c=c, h=h, w=w, k=k, d=d):
                lab = torch.randint(0, k, (b, h, w), device=DEVICE)
                lab[torch.rand(b, h, w, device=DEVICE) < 0.1] = 255
                return [_rand(b, c, h, w, dtype=d), lab]
            yield (f"{b}x{c}x{h}x{w} K={k}", d, make,
                   {"eager": lambda f, y, k=k: ifvd_class_means(f, y, k),
                    "compile": lambda f, y, k=k: masked_avg_pool_reference(f, y, k)[0],
                    "ours": lambda f, y, k=k: kernels.masked_avg_pool(f, y, k)[0],
                    "cpp": lambda f, y, k=k: kernels.masked_avg_pool(f, y, k)[0]},
                   n + lab_bytes, 2 * n + lab_bytes)
            # APD's form: prototypes of the L2-normalised features (a norm pass, then the class sums; the backward
            # re-reads the features), against normalising into a copy first
            yield (f"{b}x{c}x{h}x{w} K={k} normalize", d, make,
                   {"eager": lambda f, y, k=k: ifvd_class_means(F.normalize(f.float(), dim=1, eps=1e-6), y, k),
                    "compile": lambda f, y, k=k: masked_avg_pool_reference(f, y, k, normalize=True)[0],
                    "ours": lambda f, y, k=k: kernels.masked_avg_pool(f, y, k, normalize=True)[0],
                    "cpp": lambda f, y, k=k: kernels.masked_avg_pool(f, y, k, normalize=True)[0]},
                   2 * n + lab_bytes, 4 * n + lab_bytes)
    elif op == "bn_stat":
        shapes = ([(2, 64, 16, 32, torch.float32), (2, 256, 32, 64, torch.bfloat16)] if small else
                  [(8, 512, 64, 128, d) for d in (torch.bfloat16, torch.float32)])
        for b, c, h, w, d in shapes:
            n = b * c * h * w * _elt(d)
            yield (f"{b}x{c}x{h}x{w}", d, lambda b=b, c=c, h=h, w=w, d=d: [_rand(b, c, h, w, dtype=d),
                                                                         _rand(c, dtype=torch.float32),
                                                                         _rand(c, dtype=torch.float32).abs()],
                   {"eager": bn_stat_distance_reference, "compile": bn_stat_distance_reference,
                    "ours": kernels.bn_stat_distance, "cpp": kernels.bn_stat_distance}, n, 2 * n)
    elif op == "prototype_kl":
        shapes = ([(2, 64, 16, 32, 19, torch.float32)] if small else
                  [(8, 512, 64, 128, 19, d) for d in (torch.bfloat16, torch.float32)]
                  + [(8, 512, 64, 64, 150, torch.bfloat16)])
        for b, c, h, w, k, d in shapes:
            n = b * c * h * w * _elt(d)

            def make(b=b, c=c, h=h, w=w, k=k, d=d):
                present = torch.rand(b, k, device=DEVICE) < 0.6
                return [_rand(b, c, h, w, dtype=d), _rand(b, c, h, w, dtype=d), _rand(b, k, c, dtype=torch.float32),
                        _rand(b, k, c, dtype=torch.float32), present]
            f = lambda fs, ft, ps, pt, pr: prototype_kl_reference(fs, ft, ps, pt, pr, 0.1)
            yield (f"{b}x{c}x{h}x{w} K={k}", d, make,
                   {"eager": f, "compile": f,
                    "ours": lambda fs, ft, ps, pt, pr: kernels.prototype_kl(fs, ft, ps, pt, pr, 0.1)},
                   2 * n, 3 * n)
    elif op == "prototype_logits":
        # APD's L_t logits on the teacher projector's features; both the features and the prototypes take gradients
        shapes = ([(2, 64, 16, 32, 19, torch.float32)] if small else
                  [(8, 512, 64, 128, 19, d) for d in (torch.bfloat16, torch.float32)])
        for b, c, h, w, k, d in shapes:
            n, logits = b * c * h * w * _elt(d), b * k * h * w * 4

            def make(b=b, c=c, h=h, w=w, k=k, d=d):
                return [_rand(b, c, h, w, dtype=d), _rand(b, k, c, dtype=torch.float32),
                        torch.rand(b, k, device=DEVICE) < 0.6]
            f = lambda x, a, pr: prototype_logits_reference(x, a, pr, 0.1)
            yield (f"{b}x{c}x{h}x{w} K={k}", d, make,
                   {"eager": f, "compile": f, "ours": lambda x, a, pr: kernels.prototype_logits(x, a, pr, 0.1)},
                   n + logits, 3 * n + 3 * logits)
    elif op == "prototype_ce":
        # APD's L_t (paper convention): the CE of the logits above against the labels at feature resolution
        shapes = ([(2, 64, 16, 32, 19, torch.float32)] if small else
                  [(8, 512, 64, 128, 19, d) for d in (torch.bfloat16, torch.float32)])
        for b, c, h, w, k, d in shapes:
            n, lab_bytes = b * c * h * w * _elt(d), b * h * w * 8

            def make(b=b, c=c, h=h, w=w, k=k, d=d):
                lab = torch.randint(0, k, (b, h, w), device=DEVICE)
                lab[torch.rand(b, h, w, device=DEVICE) < 0.1] = 255
                present = torch.stack([torch.isin(torch.arange(k, device=DEVICE), y[y < k]) for y in lab])
                return [_rand(b, c, h, w, dtype=d), _rand(b, k, c, dtype=torch.float32), present, lab]
            f = lambda x, a, pr, y: F.cross_entropy(prototype_logits_reference(x, a, pr, 0.1), y, ignore_index=255)
            yield (f"{b}x{c}x{h}x{w} K={k}", d, make,
                   {"eager": f, "compile": f, "ours": lambda x, a, pr, y: kernels.prototype_ce(x, a, pr, y, 0.1)},
                   n + lab_bytes, 2 * n + lab_bytes)
    elif op == "upsampled_ce":
        # logits [B, K, h, w] -> labels [B, 8h, 8w]: the workload's task loss (Cityscapes crops, output stride 8)
        shapes = ([(2, 19, 32, 64, torch.bfloat16), (1, 150, 16, 16, torch.bfloat16)] if small else
                  [(8, 19, 64, 128, torch.bfloat16), (8, 150, 64, 64, torch.bfloat16)])
        for b, k, h, w, d in shapes:
            low, lab_bytes = b * k * h * w * _elt(d), b * 64 * h * w * 8

            def make(b=b, k=k, h=h, w=w, d=d):
                lab = torch.randint(0, k, (b, 8 * h, 8 * w), device=DEVICE)
                lab[torch.rand(b, 8 * h, 8 * w, device=DEVICE) < 0.1] = 255
                return [_rand(b, k, h, w, dtype=d) * 3, lab]
            yield (f"{b}x{k}x{h}x{w} -> {8 * h}x{8 * w}", d, make,
                   {"eager": unfused_ce, "compile": upsampled_cross_entropy_reference,
                    "ours": kernels.upsampled_cross_entropy, "cpp": kernels.upsampled_cross_entropy},
                   low + lab_bytes, 2 * low + lab_bytes)
    elif op == "pairwise":
        # SKD's pair-wise term on features pooled 2x2 (N = h*w): student C_s, teacher C_t channels
        shapes = ([(2, 128, 512, 32, 64, torch.float32)] if small else
                  [(8, 512, 2048, 32, 64, torch.bfloat16), (8, 512, 2048, 32, 64, torch.float32)])
        for b, cs, ct, h, w, d in shapes:
            ns, nt = b * cs * h * w * _elt(d), b * ct * h * w * _elt(d)
            yield (f"{b}x{cs}|{ct}x{h}x{w}", d, lambda b=b, cs=cs, ct=ct, h=h, w=w, d=d: [
                       _rand(b, cs, h, w, dtype=d).relu(), _rand(b, ct, h, w, dtype=d).relu()],
                   {"eager": pairwise_similarity_reference, "compile": pairwise_similarity_reference,
                    "ours": kernels.pairwise_similarity_loss, "cpp": kernels.pairwise_similarity_loss},
                   ns + nt, 2 * ns + nt)


# ----- timing -----

def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, reps):
    """Median milliseconds of fn()."""
    if DEVICE == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn):
    if DEVICE != "cuda":
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def copy_bandwidth_gbs(reps):
    """Device-to-device copy bandwidth (read + write bytes per second), measured now on this device."""
    n = (1 << 28) if DEVICE == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of fp32
    src = torch.empty(n, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * 4 / ms / 1e6


@contextlib.contextmanager
def kernels_env(mode):
    """SEGKD_KERNELS=mode inside the block (kernels/_dispatch.py reads it on every call; None: left as it is),
    restored after."""
    saved = os.environ.get("SEGKD_KERNELS")
    if mode is not None:
        os.environ["SEGKD_KERNELS"] = mode
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SEGKD_KERNELS", None)
        else:
            os.environ["SEGKD_KERNELS"] = saved


@contextlib.contextmanager
def backend(provider):
    """SEGKD_KERNELS=cuda while the cpp provider runs (forward and backward); the others keep the run's setting."""
    if provider == "cpp":
        if _cpp.ops() is None:
            raise RuntimeError(f"the C++ kernels cannot be built here: {_cpp.ERROR!r}")
        if DEVICE == "cuda" and not _cpp.HAS_CUDA:  # it would time the Triton fallback under the cpp label
            raise RuntimeError("the C++ kernels were built without their CUDA part (no nvcc found)")
    with kernels_env("cuda" if provider == "cpp" else None):
        yield


def run_case(op, label, dtype, make, provs, bytes_fwd, bytes_fb, providers, reps, copy_gbs):
    rows = []
    inputs = make()
    grad_idx = [i for i, x in enumerate(inputs) if x.is_floating_point()][:1]  # the student side
    if op == "prototype_kl":
        grad_idx = [0, 2]  # student features and student prototypes
    if op in ("prototype_logits", "prototype_ce"):
        grad_idx = [0, 1]  # features and prototypes
    for name in providers:
        if name not in provs:
            continue
        fn = provs[name]
        if name == "compile":
            fn = torch.compile(fn, dynamic=False)
        for mode, nbytes in (("fwd", bytes_fwd), ("fwd+bwd", bytes_fb)):
            xs = [x.detach().requires_grad_(mode == "fwd+bwd" and i in grad_idx) for i, x in enumerate(inputs)]
            params = [xs[i] for i in grad_idx]

            def step():
                out = fn(*xs)
                if mode == "fwd+bwd":
                    out.backward(torch.full_like(out, GO))
                    for p in params:
                        p.grad = None
                return out
            if mode == "fwd":
                step = torch.no_grad()(step)
            try:
                with backend(name):
                    step()  # compile / autotune / first-call costs stay out of the timing
                    ms = bench_ms(step, reps)
                    peak = peak_mib(step)
            except Exception as err:  # one provider failing must not lose the others' figures
                print(f"  {op} {label} {name} {mode}: FAILED {type(err).__name__}: {str(err)[:200]}")
                continue
            gbs = nbytes / ms / 1e6
            rows.append({"op": op, "shape": label, "dtype": str(dtype).replace("torch.", ""), "pass": mode,
                         "provider": name, "ms": ms, "GB/s": gbs, "copy_frac": gbs / copy_gbs, "peak_MiB": peak})
    eager = {r["pass"]: r["ms"] for r in rows if r["provider"] == "eager"}
    for r in rows:
        r["speedup_vs_eager"] = eager[r["pass"]] / r["ms"] if r["pass"] in eager else None
    return rows


def targets(rows):
    """Issue 3's acceptance figures, read off this run's rows (they count on an H100/H200 only)."""
    def find(op, shape, dtype, provider):
        return next((r for r in rows if (r["op"], r["shape"], r["dtype"], r["pass"], r["provider"])
                     == (op, shape, dtype, "fwd+bwd", provider)), None)
    out = []
    ours, eager, comp = (find("pixel_kl", "8x19x512x1024", "bfloat16", p) for p in ("ours", "eager", "compile"))
    if ours:
        out.append(f"pixel_kl fwd+bwd 8x19x512x1024 bf16: {100 * ours['copy_frac']:.0f}% of copy bandwidth "
                   f"(target >= 80%)")
        if eager:
            out.append(f"pixel_kl vs CIRKD eager: {eager['ms'] / ours['ms']:.1f}x (target >= 5x)")
        if comp:
            out.append(f"pixel_kl vs torch.compile: {comp['ms'] / ours['ms']:.1f}x (target >= 2x)")
    ours, eager = (find("masked_avg_pool", "8x512x64x128 K=19", "bfloat16", p) for p in ("ours", "eager"))
    if ours and eager:
        out.append(f"masked_avg_pool K=19 vs per-class pooling: {eager['ms'] / ours['ms']:.1f}x (target >= 10x)")
    ours = find("bn_stat", "8x512x64x128", "bfloat16", "ours")
    if ours:
        out.append(f"bn_stat_distance fwd+bwd bf16: {100 * ours['copy_frac']:.0f}% of copy bandwidth (target >= 70%)")
    for r in rows:  # the C++ backend against `ours` (on CPU: the torch reference; issue 17's goal there: >= 2x)
        if r["provider"] == "cpp":
            base = next((o for o in rows if o["provider"] == "ours" and
                         (o["op"], o["shape"], o["dtype"], o["pass"]) == (r["op"], r["shape"], r["dtype"], r["pass"])),
                        None)
            if base:
                out.append(f"{r['op']} {r['shape']} {r['dtype']} {r['pass']}: cpp {base['ms'] / r['ms']:.2f}x ours")
    return out


def markdown(meta, rows):
    lines = [f"# Kernel benchmark on {meta['device']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "device"]
    lines += ["", "| op | shape | dtype | pass | provider | median ms | GB/s | % copy BW | peak MiB | x eager |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = "-" if r["peak_MiB"] is None else f"{r['peak_MiB']:.0f}"
        speed = "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}"
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['pass']} | {r['provider']} | {r['ms']:.3f} | "
                     f"{r['GB/s']:.1f} | {100 * r['copy_frac']:.1f} | {peak} | {speed} |")
    goals = targets(rows)
    if goals:
        lines += ["", "## Targets (issue 3), and the C++ backend against ours (issue 17)", ""]
        lines += [f"- {g}" for g in goals]
    return "\n".join(lines) + "\n"


def main(args):
    if args.interpret and DEVICE == "cuda":
        sys.exit("--interpret is for CPU runs; on a GPU the Triton kernels run compiled")
    if args.interpret:
        os.environ["SEGKD_KERNELS"] = "triton"
    providers = args.providers.split(",") if args.providers else [
        p for p in PROVIDERS
        if (p != "compile" or DEVICE == "cuda") and (p != "liger" or (DEVICE == "cuda" and has_liger()))]
    reps = args.reps or 20
    if DEVICE == "cpu":
        # One intra-op thread: with a shared, busy CPU, OpenMP barriers turn microsecond ops into 100 ms outliers.
        torch.set_num_threads(1)
    torch._dynamo.config.cache_size_limit = 256  # one compiled graph per (op, shape, dtype, pass)
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs(reps)
    ours_path = "triton" if _dispatch.use_triton(torch.empty(0, device=DEVICE)) else "torch reference"
    meta = {"device": device_name(), "copy bandwidth (GB/s, measured)": f"{copy_gbs:.1f}",
            "ours runs": ours_path + (" (interpreted)" if args.interpret else ""),
            "providers": ", ".join(providers), "torch": torch.__version__,
            "triton": getattr(_dispatch.triton, "__version__", "unavailable"),
            "timing": "triton.testing.do_bench median" if DEVICE == "cuda" else
            f"wall-clock median of {reps}, 1 CPU thread",
            "bytes": "compulsory traffic: inputs read once, outputs and input gradients written once",
            "grad_output": f"{GO} for scalar losses", "shapes": "small (smoke run)" if args.small else "issue 3",
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"{meta['device']}: copy {copy_gbs:.1f} GB/s; ours -> {meta['ours runs']}; providers {providers}")
    rows = []
    for op in OPS if args.op == "all" else (args.op,):
        for label, dtype, make, provs, bf, bfb in cases(op, args.small):
            new = run_case(op, label, dtype, make, provs, bf, bfb, providers, reps, copy_gbs)
            for r in new:
                print(f"  {r['op']:15s} {r['shape']:26s} {r['dtype']:8s} {r['pass']:7s} {r['provider']:8s} "
                      f"{r['ms']:9.3f} ms {r['GB/s']:8.1f} GB/s {100 * r['copy_frac']:5.1f}% copy")
            rows += new
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"kernels_{slug(meta['device'])}{'_small' if args.small else ''}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "targets": targets(rows)}, f, indent=1)
    for goal in targets(rows):
        print(goal)
    with open(stem + ".md", "w") as f:
        f.write(markdown(meta, rows))
    print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    main(ARGS)
