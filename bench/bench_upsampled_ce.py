"""Segmentation cross-entropy on upsampled logits: the unfused torch path (F.interpolate to the labels' size, then
F.cross_entropy) against kernels.upsampled_cross_entropy (fused: the upsampled logits are never stored), forward and
forward+backward, bf16 logits, int64 labels.

Each case runs in a fresh child process so that its peak memory is its own: on CPU, the growth of the peak resident
set (VmHWM, reset through /proc/self/clear_refs after a warm-up run) over the resident size then; on CUDA,
torch.cuda's peak allocated bytes over the inputs'. Times are medians of a few repetitions after one warm-up.

Without a GPU the fused kernels only run interpreted, which measures nothing, so on CPU the fused path is reported
by its traffic model alone (`traffic_model`, bytes; a model, not a measurement) beside the unfused path's measured
time and peak; on CUDA both paths are timed.

    python bench/bench_upsampled_ce.py            # writes bench/results/upsampled_ce_<cpu|cuda>.md
"""
import argparse
import importlib
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak_memory import in_fresh_process, measure  # noqa: E402

WORKLOAD = (8, 19, 64, 128, 512, 1024)  # (B, K, h, w, H, W): Cityscapes 512x1024 crops, stride-8 logits
GPU_CASES = [WORKLOAD, (8, 150, 64, 64, 512, 512)]  # + ADE20K 512x512 crops
CPU_CASES = [(2, 19, 32, 64, 256, 512), (1, 150, 32, 32, 256, 256)]
PROVIDERS = ("unfused", "fused")


def traffic_model(shape, logit_bytes=2, label_bytes=8):
    """Modelled device-memory bytes {(path, phase): bytes} at `shape` = (B, K, h, w, H, W). A model: each tensor is
    counted once per kernel that reads or writes it, gathers of neighbouring pixels are assumed to hit the cache,
    scalars and the fused path's [B, n_blocks] partials are left out.

    unfused (eager): x.float() -> F.interpolate -> log_softmax -> nll_loss, and their backwards (nll_loss_backward
    writes a full [B, K, H, W] gradient, log_softmax_backward reads it and its output and writes another,
    upsample_bilinear2d_backward reads that, the cast back to bf16). fused: forward reads labels and logits once;
    backward, per (tile, class chunk) program, reads the labels of the output rows and columns in its range and the
    logits of all K classes over the tile plus a one-pixel halo, and writes the low-res gradient once."""
    uce = importlib.import_module("kernels.upsampled_ce")
    b, k, h, w, hh, ww = shape
    low, full, pix = b * k * h * w, b * k * hh * ww, b * hh * ww
    f32 = 4
    unfused_fwd = (low * (logit_bytes + f32)  # .float()
                   + low * f32 + full * f32  # interpolate
                   + 2 * full * f32  # log_softmax
                   + pix * (label_bytes + f32))  # nll_loss: labels, one gathered log-probability per pixel
    unfused_bwd = (full * f32 + pix * label_bytes  # nll_loss_backward: zero-filled gradient, scattered -1
                   + 3 * full * f32  # log_softmax_backward: read grad and output, write grad
                   + full * f32 + low * f32  # upsample_bilinear2d_backward
                   + low * (f32 + logit_bytes))  # cast back to the logits' dtype
    fused_fwd = pix * label_bytes + low * logit_bytes
    th, tw, _ = uce.BWD_TILE
    n_chunks = -(-k // min(uce.BWD_K_BLOCK, max(16, 1 << (k - 1).bit_length())))

    def out_range(i0, t, n_in, n_out):  # the kernel's output range for low-res indices [i0, i0 + t)
        inv = n_out / n_in
        lo = max(math.floor((i0 - 0.5) * inv - 0.5) - 1, 0) if i0 >= 2 else 0
        hi = min(math.ceil((i0 + t + 0.5) * inv - 0.5) + 1, n_out)
        return hi - lo

    rows = sum(out_range(i0, th, h, hh) for i0 in range(0, h, th))
    cols = sum(out_range(j0, tw, w, ww) for j0 in range(0, w, tw))
    halo = sum(min(th + 2, h) * min(tw + 2, w) for _ in range(0, h, th) for _ in range(0, w, tw))
    fused_bwd = n_chunks * b * (rows * cols * label_bytes + halo * k * logit_bytes) + low * logit_bytes
    return {("unfused", "fwd"): unfused_fwd, ("unfused", "bwd"): unfused_bwd,
            ("fused", "fwd"): fused_fwd, ("fused", "bwd"): fused_bwd}


def _case(provider, shape, reps, queue):
    import os

    import torch
    import torch.nn.functional as F

    os.environ["SEGKD_KERNELS"] = "triton" if provider == "fused" else "torch"
    from kernels import upsampled_cross_entropy

    torch.manual_seed(0)
    b, k, h, w, hh, ww = shape
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = (3 * torch.randn(b, k, h, w, device=dev)).to(torch.bfloat16).requires_grad_()
    lab = torch.randint(0, k, (b, hh, ww), device=dev)
    lab[:, :, :16] = 255

    def unfused(x, lab):
        z = F.interpolate(x.float(), size=(hh, ww), mode="bilinear", align_corners=False)  # [B, K, H, W]
        return F.cross_entropy(z, lab, ignore_index=255)

    fn = upsampled_cross_entropy if provider == "fused" else unfused
    queue.put(measure(lambda: fn(x, lab), x, reps))


def run_case(provider, shape, reps):
    return in_fresh_process(_case, provider, shape, reps)


def _mb(n):
    return f"{n / 1e6:.1f}"


def model_rows(shape):
    t = traffic_model(shape)
    b, k, h, w, hh, ww = shape
    rows = []
    for path in PROVIDERS:
        fwd, bwd = t[(path, "fwd")], t[(path, "bwd")]
        rows.append(f"| {b}x{k}x{h}x{w} -> {hh}x{ww} | {path} | {_mb(fwd)} | {_mb(bwd)} | {_mb(fwd + bwd)} |")
    total = lambda p: t[(p, "fwd")] + t[(p, "bwd")]
    rows.append(f"| {b}x{k}x{h}x{w} -> {hh}x{ww} | fused / unfused | {t[('fused', 'fwd')] / t[('unfused', 'fwd')]:.3f} "
                f"| {t[('fused', 'bwd')] / t[('unfused', 'bwd')]:.3f} | {total('fused') / total('unfused'):.3f} |")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="result file (default bench/results/upsampled_ce_<cpu|cuda>.md)")
    args = ap.parse_args(argv)
    import torch

    from device import device_name

    cuda = torch.cuda.is_available()
    providers = PROVIDERS if cuda else PROVIDERS[:1]
    cases = GPU_CASES if cuda else CPU_CASES
    timed_rows = []
    for shape in cases:
        b, k, h, w, hh, ww = shape
        res = {p: run_case(p, shape, args.reps) for p in providers}
        for p in providers:
            fwd, fb, peak, loss = res[p]
            timed_rows.append(f"| {b}x{k}x{h}x{w} -> {hh}x{ww} | {p} | {fwd * 1e3:.1f} | {fb * 1e3:.1f} | "
                              f"{peak / 2**20:.0f} | {loss:.6f} |")
            print(timed_rows[-1], flush=True)
        if cuda:
            u, f = res["unfused"], res["fused"]
            timed_rows.append(f"| {b}x{k}x{h}x{w} -> {hh}x{ww} | unfused / fused | {u[0] / f[0]:.1f}x | "
                              f"{u[1] / f[1]:.1f}x | {u[2] / max(f[2], 1):.1f}x | |")
    models = [r for shape in dict.fromkeys([WORKLOAD, *cases]) for r in model_rows(shape)]
    print("\n".join(models))
    kind = "cuda" if cuda else "cpu"
    fused_note = ("Both paths timed on this GPU." if cuda else
                  "No GPU ran: only the unfused path is timed here. The fused path's figures below are a traffic "
                  "model (bytes), not a measurement; interpreted on a CPU its kernels would measure nothing.")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"upsampled_ce_{kind}.md"
    text = "\n".join([
        "# Upsampled segmentation cross-entropy: unfused torch path vs fused kernels",
        "",
        f"Device: {device_name()}. torch {torch.__version__}, {torch.get_num_threads()} threads. bf16 logits "
        "[B, K, h, w], int64 labels [B, H, W] (16 columns ignored). `unfused` = `F.cross_entropy(F.interpolate("
        "x.float(), size=(H, W), mode='bilinear', align_corners=False), y, ignore_index=255)`; `fused` = "
        "`kernels.upsampled_cross_entropy` (SEGKD_KERNELS=triton). " + fused_note,
        "",
        "## Measured",
        "",
        f"Median of {args.reps} runs after a warm-up, a fresh process per row; forward+backward differentiates the "
        "logits. Peak: growth of the peak resident set (CPU; includes allocator and OpenMP buffers) or of "
        "torch.cuda's peak allocated bytes (CUDA) over the inputs.",
        "",
        "| shape | provider | forward ms | fwd+bwd ms | peak MiB | loss |",
        "|---|---|---|---|---|---|",
        *timed_rows,
        "",
        "## Traffic model (bytes, a model)",
        "",
        "`traffic_model` in bench/bench_upsampled_ce.py: each tensor counted once per kernel that reads or writes it, "
        "neighbour gathers assumed to hit the cache; the fused backward counts the labels and logits that its "
        "overlapping (tile, class chunk) programs re-read. The first row is the workload (Cityscapes 512x1024 crops, "
        "stride-8 logits). The unfused path writes four [B, K, H, W] fp32 tensors (interpolate, log_softmax, and the "
        "two gradients); the fused path stores nothing of full resolution.",
        "",
        "| shape | path | forward MB | backward MB | total MB |",
        "|---|---|---|---|---|",
        *models,
        "",
        "Command: `python bench/bench_upsampled_ce.py`.",
        "",
    ])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
