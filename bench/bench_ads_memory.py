"""Peak memory of ADS scoring (engine/datafree/ads.py) on a real teacher architecture: each BN layer's per-image
statistics computed inside its forward hook (`after`: ads.score_pool as it ships, engine/datafree/bn_hooks.py's
bn_distances) against the former scoring, which kept every BN input of the forward alive until it ended and then
took kernels.bn_stat_distance of each (`before`: reproduced below in `score_pool_keep_every_input`, the loop
ads.score_pool ran before).

Each variant runs in a fresh child process so that its peak is its own. The teacher (random weights) is built and
run once on a small input first (library buffers, thread pools); freed heap is then handed back (malloc_trim) and
the peak resident set (VmHWM) is reset through /proc/self/clear_refs, as bench/bench_pairwise.py does. The figure
is the growth of VmHWM over the resident size then, while one scoring batch of `--batch` pool images of
`--size` H W (written as PNGs, --ads-view crop at that size) is scored; on CUDA, torch.cuda's peak allocated bytes
over those allocated before scoring.

    python bench/bench_ads_memory.py                       # pspnet_r101, batch 4, 256 x 512
    python bench/bench_ads_memory.py --model deeplabv3_r50 --batch 2 --size 256 512
"""
import argparse
import ctypes
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak_memory import in_fresh_process, reset_peak_rss, status_bytes  # noqa: E402

VARIANTS = ("before", "after")


def _trim_heap():
    """Hand freed heap back to the OS (glibc), so memory freed by the warm-up is not counted as resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def score_pool_keep_every_input(teacher, pool, batch_size, device):
    """BEFORE (labelled reproduction of ads._score_pool as it was, --ads-layers all): bn_inputs keeps every BN
    input [B, C, H, W] of the forward in a list; only after the forward is each one reduced to its [B] distance.
    -> (scores np.float64 [N], bytes of BN inputs held at the end of the last forward)."""
    import torch

    import kernels
    from engine.datafree.bn_hooks import bn_inputs

    loader = torch.utils.data.DataLoader(pool, batch_size=batch_size, num_workers=0)
    scores = np.zeros(len(pool), dtype=np.float64)
    held = 0
    with torch.no_grad(), bn_inputs(teacher) as seen:
        for batch in loader:
            seen.clear()
            teacher(batch["image"].to(device))
            held = sum(x.numel() * x.element_size() for _, x in seen)
            total = None
            for mod, x in seen:  # the former bn_hooks.per_image_distance
                d = kernels.bn_stat_distance(x, mod.running_mean, mod.running_var)  # [B]
                total = d if total is None else total + d
            scores[batch["index"].numpy()] = total.double().cpu().numpy()
    return scores, held


def _case(variant, model_name, root, files, size, batch, queue):
    import torch

    from engine.datafree import ads
    from engine.models import build_model

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    teacher = build_model(model_name, 19).to(dev).eval()
    with torch.no_grad():
        teacher(torch.randn(1, 3, 64, 128, device=dev))  # warm-up on a small input
    pool = ads.scoring_pool(root, files, "crop", size, 0)
    _trim_heap()
    reset_peak_rss()
    base = status_bytes("VmRSS")
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    if variant == "before":
        scores, held = score_pool_keep_every_input(teacher, pool, batch, dev)
    else:
        scores, held = ads.score_pool(teacher, pool, "all", batch, dev, 0), 0
    seconds = time.perf_counter() - t0
    if dev == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = status_bytes("VmHWM") - base
    queue.put({"base": base, "peak": max(peak, 0), "seconds": seconds, "scores": scores, "held": held})


def run_case(*args):
    return in_fresh_process(_case, *args)


def write_pool(root, n, size, seed=0):
    """n random RGB PNGs of exactly `size` (H, W) under root -> their relative paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        name = f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(Path(root) / name)
        files.append(name)
    return files


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="pspnet_r101", help="engine.models name of the teacher (random weights)")
    ap.add_argument("--batch", type=int, default=4, help="pool images per scoring batch (one batch is scored)")
    ap.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"), help="scoring size")
    ap.add_argument("--out", default=None, help="result file (default bench/results/ads_memory_<cpu|cuda>.md)")
    args = ap.parse_args(argv)
    import torch

    from device import device_name

    size = tuple(args.size)
    with tempfile.TemporaryDirectory() as root:
        files = write_pool(root, args.batch, size)
        res = {v: run_case(v, args.model, root, files, size, args.batch) for v in VARIANTS}
    for v in VARIANTS:
        print(v, {k: val for k, val in res[v].items() if k != "scores"}, flush=True)
    before, after = res["before"], res["after"]
    rel = float(np.max(np.abs(after["scores"] - before["scores"]) / np.abs(before["scores"])))
    mib = lambda b: f"{b / 2**20:,.0f}"
    at_16x512x1024 = before["held"] * (16 * 512 * 1024) / (args.batch * size[0] * size[1])
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    measure = ("growth of the peak resident set (VmHWM) over the resident size after a small warm-up forward and "
               "malloc_trim, a fresh process per variant" if kind == "cpu" else
               "torch.cuda peak allocated bytes over those allocated before scoring, a fresh process per variant")
    cmd = "python bench/bench_ads_memory.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                 " " + " ".join(argv if argv is not None else sys.argv[1:]))
    text = "\n".join([
        "# ADS scoring: peak memory, BN statistics computed in the hooks (after) vs every BN input kept (before)",
        "",
        f"Device: {device_name()}. torch {torch.__version__}, {torch.get_num_threads()} threads. Teacher "
        f"`{args.model}` (engine.models.build_model, 19 classes, random weights, eval, fp32), one scoring batch of "
        f"{args.batch} pool images at {size[0]} x {size[1]} (random PNGs, --ads-view crop at that size, "
        "--ads-layers all).",
        "",
        "- `before`: the former scoring, reproduced in the script (`score_pool_keep_every_input`): "
        "`bn_hooks.bn_inputs` keeps every BN layer's input until the forward ends, then "
        "`kernels.bn_stat_distance` of each.",
        "- `after`: `engine.datafree.ads.score_pool` as it ships: `bn_hooks.bn_distances` reduces each BN input to "
        "its [B] distance inside the layer's forward hook (torch.var_mean on CPU, the fused kernel on CUDA), so "
        "each input is freed when the network is done with it.",
        "",
        f"Peak memory: {measure}. Time: the scored batch, decoding included (one run on a shared machine: "
        "indicative only).",
        "",
        "| variant | peak growth MiB | resident before scoring MiB | seconds |",
        "|---|---|---|---|",
        *(f"| {v} | {mib(res[v]['peak'])} | {mib(res[v]['base'])} | {res[v]['seconds']:.1f} |" for v in VARIANTS),
        "",
        f"before / after peak growth: **{before['peak'] / max(after['peak'], 1):.1f}x**, measured in one run. The "
        f"BN inputs the former path held at the end of the forward: {mib(before['held'])} MiB; they grow with "
        f"B * H * W, so at batch 16 and 512 x 1024 they would be {at_16x512x1024 / 2**30:.1f} GiB. "
        f"Scores: max relative difference between the variants {rel:.1e} (the same formula; they may differ by fp32 "
        "rounding, torch.var_mean's mean being a Welford mean and the former mean() a cascade sum).",
        "",
        f"Command: `{cmd}`.",
        "",
    ])
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"ads_memory_{kind}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
