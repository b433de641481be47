"""SKD's pair-wise similarity loss: the naive N x N form (CIRKD's CriterionStructuralKD after pooling) against the
Gram form of kernels.pairwise_similarity_loss, forward and forward+backward, fp32, student C_s / teacher C_t.

Each case runs in a fresh child process so that its peak memory is its own: on CPU, the growth of the peak
resident set (VmHWM, reset through /proc/self/clear_refs after a warm-up run) over the resident size then; on CUDA, torch.cuda's peak
allocated bytes over the inputs'. Times are medians of a few repetitions after one warm-up.

    python bench/bench_pairwise.py            # writes bench/results/pairwise_<device>.md
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak_memory import in_fresh_process, measure  # noqa: E402

CASES = [  # (B, C_s, C_t, h, w): N = h*w; the naive form at N = 8192 needs two 268 MB maps per image: B = 1
    (2, 128, 512, 32, 64),
    (1, 128, 512, 64, 128),
]
# gram: the Gram form in torch (CPU: the custom op's torch path; CUDA: SEGKD_KERNELS=torch, autograd through it);
# triton: the custom op's Triton path (CUDA only: interpreted on a CPU it measures nothing)
PROVIDERS = ("naive", "gram", "triton")


def _case(provider, shape, reps, queue):
    import os

    import torch

    if torch.cuda.is_available():
        os.environ["SEGKD_KERNELS"] = {"naive": "auto", "gram": "torch", "triton": "triton"}[provider]

    from kernels.pairwise import pairwise_similarity_loss, pairwise_similarity_reference

    torch.manual_seed(0)
    b, cs, ct, h, w = shape
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    s = torch.randn(b, cs, h, w, device=dev).relu_().requires_grad_()
    t = torch.randn(b, ct, h, w, device=dev).relu_()
    fn = pairwise_similarity_reference if provider == "naive" else pairwise_similarity_loss
    queue.put(measure(lambda: fn(s, t), s, reps))


def run_case(provider, shape, reps):
    return in_fresh_process(_case, provider, shape, reps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="result file (default bench/results/pairwise_<device>.md)")
    args = ap.parse_args(argv)
    import torch

    from device import device_name

    name = device_name()
    rows = []
    providers = PROVIDERS if torch.cuda.is_available() else PROVIDERS[:2]
    for shape in CASES:
        res = {p: run_case(p, shape, args.reps) for p in providers}
        b, cs, ct, h, w = shape
        for p in providers:
            fwd, fb, peak, loss = res[p]
            rows.append(f"| {h * w} | {b} | {cs} / {ct} | {p} | {fwd * 1e3:.1f} | {fb * 1e3:.1f} | {peak / 2**20:.0f} | "
                        f"{loss:.6e} |")
            print(rows[-1], flush=True)
        n, g = res["naive"], res["gram"]
        rows.append(f"| {h * w} | {b} | {cs} / {ct} | naive / gram | {n[0] / g[0]:.1f}x | {n[1] / g[1]:.1f}x | "
                    f"{n[2] / max(g[2], 1):.1f}x | rel. diff {abs(n[3] - g[3]) / abs(n[3]):.1e} |")
        print(rows[-1], flush=True)
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"pairwise_{kind}.md"
    text = "\n".join([
        "# Pair-wise similarity loss (SKD): naive N x N form vs Gram form",
        "",
        f"Device: {name}. torch {torch.__version__}, {torch.get_num_threads()} threads. fp32 inputs, post-ReLU "
        "random features; student C_s / teacher C_t channels. `naive` = "
        "`kernels.pairwise.pairwise_similarity_reference` (CIRKD's CriterionStructuralKD after its pooling: two "
        "[B, N, N] maps); `gram` = the Gram form in torch (three C x C Gram matrices; on CPU "
        "`kernels.pairwise_similarity_loss`'s custom op, on CUDA SEGKD_KERNELS=torch); `triton` (CUDA only) = the "
        "custom op's Triton kernels. Median of "
        f"{args.reps} runs after a warm-up; forward+backward differentiates the student. Peak memory: growth of the "
        "process's peak resident set (VmHWM, reset after a warm-up run) over its resident size with the inputs "
        "allocated (CPU), a fresh process per row; it includes the allocator's and BLAS's own buffers, so small "
        "values are approximate. N = 8192 runs at B = 1: the naive form needs two "
        "268 MB maps per image (plus their difference and gradients).",
        "",
        "| N | B | C_s / C_t | provider | forward ms | fwd+bwd ms | peak MB | loss |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Run-to-run variation: on a shared CPU the times of one run are noisy; compare the ratios of one run.",
        "",
        "Command: `python bench/bench_pairwise.py`.",
        "",
    ])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
