"""Data-free distillation on CamVid: a teacher trained on the train split, then students distilled with KD on
the real train images, with DFAD (generated images) and with DFSS (a pool of the val images mixed with
foreign images), each validated on the real val split. Writes bench/results/datafree_camvid_<device>.md.

    python bench/datafree_camvid.py                           # the reduced CPU setting of the results file
    python bench/datafree_camvid.py --factor 1 --teacher pspnet_r50 --student pspnet_mbv2 \
        --crop 360,480 --gen-size 128,160 --iters 20000 ...   # a GPU-sized run

The reduced setting downscales every CamVid frame and label by --factor (labels by nearest neighbour) into a
work folder, so all runs see the same smaller images. The DFSS pool holds the downscaled val frames plus
as many foreign images (synthetic-dataset scenes, uniform noise, sinusoidal plasma textures) at the same size.
Every run goes through engine.train.main, as a user would run it.
"""
import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import parse_size  # noqa: E402
from engine.data.synthetic import SyntheticSegmentation  # noqa: E402
from engine.train import main as train_main  # noqa: E402

# DFAD paper (Fang et al. 2019), CamVid, DeepLabV3-ResNet50 teacher (ImageNet-pretrained backbone),
# DeepLabV3-MobileNetV2 student from scratch, 360 x 480.
PAPER = {"teacher": 59.4, "kd": 53.5, "dfad": 53.5}
START, END = "<!-- generated:start -->", "<!-- generated:end -->"


def downscale_camvid(src, dst, factor):
    """SegNet-layout copy of `src` with every frame and label shrunk by `factor` (labels: nearest)."""
    done = dst / ".complete"
    if done.exists():
        return dst
    for split in ("train", "val"):
        (dst / split).mkdir(parents=True, exist_ok=True)
        (dst / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for image in sorted((src / split).iterdir()):
            if image.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                continue
            with Image.open(image) as im:
                w, h = im.size
                size = (round(w / factor), round(h / factor))
                im.convert("RGB").resize(size, Image.BILINEAR).save(dst / split / f"{image.stem}.png")
            with Image.open(src / f"{split}annot" / f"{image.stem}.png") as lab:
                lab.resize(size, Image.NEAREST).save(dst / f"{split}annot" / f"{image.stem}.png")
    done.write_text("ok")
    return dst


def build_pool(data, pool, seed=0):
    """pool/val/*: the val frames; pool/foreign/{synthetic,noise,plasma}/*: as many foreign images, same size."""
    if (pool / ".complete").exists():
        return pool
    frames = sorted((data / "val").glob("*.png"))
    (pool / "val").mkdir(parents=True, exist_ok=True)
    for f in frames:
        (pool / "val" / f.name).write_bytes(f.read_bytes())
    w, h = Image.open(frames[0]).size
    rng = np.random.default_rng(seed)
    n = len(frames)
    kinds = {"synthetic": n - 2 * (n // 3), "noise": n // 3, "plasma": n // 3}
    synth = SyntheticSegmentation("val", size=max(h, w))
    yy, xx = np.mgrid[0:h, 0:w]
    for kind, count in kinds.items():
        (pool / "foreign" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            if kind == "synthetic":
                rgb = synth.load(i)[0][:h, :w]
            elif kind == "noise":
                rgb = rng.integers(0, 256, (h, w, 3))
            else:
                f, ph = rng.uniform(0.03, 0.4, 2), rng.uniform(0, 6, 3)
                rgb = np.stack([127 + 120 * np.sin(f[0] * xx + f[1] * yy * (c + 1) + ph[c]) for c in range(3)], -1)
            Image.fromarray(rgb.astype(np.uint8)).save(pool / "foreign" / kind / f"{kind}{i:03d}.png")
    (pool / ".complete").write_text("ok")
    return pool


def run(name, argv, log_dir):
    """engine.train.main(argv) with its output in log_dir/<name>.log; -> (result dict, wall seconds)."""
    t0 = time.perf_counter()
    with open(log_dir / f"{name}.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        result = train_main(argv)
    wall = time.perf_counter() - t0
    print(f"{name}: val mIoU {100 * result['miou']:.1f} in {wall / 60:.1f} min", flush=True)
    return result, wall


def random_student_miou(arch, data, device):
    """mIoU on the val frames of the student as the trainer initialises it (seed 0) before any step."""
    from engine.data import build_dataset, build_val_loader
    from engine.dist import init_distributed
    from engine.evaluate import evaluate
    from engine.models import build_model

    dev = init_distributed(device).device
    torch.manual_seed(0)
    val = build_dataset("camvid", "val", root=str(data))
    model = build_model(arch, val.num_classes).to(dev)
    result = evaluate(model, build_val_loader(val, 8, workers=0), val.num_classes, dev, ignore_index=val.ignore_index)
    print(f"random: val mIoU {100 * result['miou']:.1f}", flush=True)
    return result["miou"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--camvid", default=str(ROOT.parent / "shared" / "datasets" / "camvid"))
    p.add_argument("--work", default=str(Path(os.environ.get("SEGKD_CACHE") or Path.home() / ".cache" / "segkd")
                                         / "bench" / "datafree_camvid"),
                   help="downscaled data, pool, runs and logs (default: under $SEGKD_CACHE or ~/.cache/segkd)")
    p.add_argument("--factor", type=float, default=3.0, help="downscale factor of the frames (480x360 / 3 = 160x120)")
    p.add_argument("--teacher", default="pspnet_small")
    p.add_argument("--student", default="pspnet_tiny")
    p.add_argument("--crop", type=parse_size, default=(96, 128))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--teacher-iters", type=int, default=3000)
    p.add_argument("--iters", type=int, default=1500, help="student iterations of kd, dfss and the student alone")
    p.add_argument("--dfad-iters", type=int, default=4000, help="dfad student steps (a generator step every 5)")
    # DFAD generated 128 x 128 images for 360 x 480 frames; the same ratio at 120 x 160 is about 48 x 64
    p.add_argument("--gen-size", type=parse_size, default=(48, 64))
    p.add_argument("--bn-weight", type=float, default=0.1, help="--bn-weight of the second DFAD run")
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the 2-core machine is shared; more threads contend)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(args.work)
    data = downscale_camvid(Path(args.camvid), work / f"camvid_x{args.factor:g}", args.factor)
    pool = build_pool(data, work / f"pool_x{args.factor:g}")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    crop = f"{args.crop[0]},{args.crop[1]}"
    common = ["--dataset", "camvid", "--data-root", str(data), "--crop", crop, "--batch-size", str(args.batch_size),
              "--workers", "0", "--device", args.device, "--log-interval", "50", "--cache-dir", str(work / "cache"),
              "--student", args.student, "--teacher", args.teacher]
    runs = work / "runs"

    rows, timings = {}, {}
    teacher_out = runs / "teacher"
    res, timings["teacher"] = run("teacher", [*common, "--method", "none", "--student", args.teacher,
                                              "--iters", str(args.teacher_iters), "--out", str(teacher_out)], logs)
    rows["teacher"] = res
    t = ["--teacher-ckpt", str(teacher_out / "last.pt")]
    students = {
        "alone": ["--method", "none", "--iters", str(args.iters)],
        "kd": ["--method", "kd", *t, "--iters", str(args.iters)],
        # KD on the real train images without their labels: dfss over the train frames, all kept, uniform weights
        "kd_nolabel": ["--method", "dfss", *t, "--iters", str(args.iters), "--aux-data", str(data / "train"),
                       "--ads-keep", "1.0", "--wdpd-alpha", "0"],
        "dfad": ["--method", "dfad", *t, "--iters", str(args.dfad_iters), "--gen-size",
                 f"{args.gen_size[0]},{args.gen_size[1]}", "--gen-batch", str(args.gen_batch)],
        "dfad_bn": ["--method", "dfad", *t, "--iters", str(args.dfad_iters), "--gen-size",
                    f"{args.gen_size[0]},{args.gen_size[1]}", "--gen-batch", str(args.gen_batch),
                    "--bn-weight", str(args.bn_weight)],
        "dfss": ["--method", "dfss", *t, "--iters", str(args.iters), "--aux-data", str(pool)],
    }
    for name, extra in students.items():
        rows[name], timings[name] = run(name, [*common, *extra, "--out", str(runs / name)], logs)
    random_miou = random_student_miou(args.student, data, args.device)

    record = json.loads((runs / "dfss" / "ads_scores.json").read_text())
    files, scores, kept = record["files"], np.array(record["scores"]), np.array(record["kept"])
    is_val = np.array([f.startswith("val/") for f in files])
    top = np.argsort(scores, kind="stable")[:is_val.sum()]
    ads = {"pool": len(files), "val": int(is_val.sum()), "kept": int(kept.sum()),
           "kept_val": int((kept & is_val).sum()), "precision_top_val": float(is_val[top].mean())}
    write_results(args, rows, timings, random_miou, ads, Path(args.out), data)


def write_results(args, rows, timings, random_miou, ads, out_dir, data):
    dev = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    device = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({platform.processor() or platform.machine()}, " \
        f"{args.threads} threads)"
    h, w = Image.open(next((data / "val").glob("*.png"))).size[::-1]
    lines = [
        f"# Data-free distillation on CamVid ({dev.upper()}, reduced setting)", "",
        f"Device: {device}, torch {torch.__version__}. Produced by `python bench/datafree_camvid.py` "
        f"(factor {args.factor:g}, teacher {args.teacher} {args.teacher_iters} iterations, students "
        f"{args.student}).", "",
        f"Frames and labels downscaled {args.factor:g}x to {w}x{h}; training crops {args.crop[0]}x{args.crop[1]} "
        f"(HxW), random scale 0.5-2, flip; batch {args.batch_size}; SGD with poly schedule. mIoU on the "
        f"{len(list((data / 'val').glob('*.png')))} real val frames, whole-image inference, 11 classes.", "",
        "| model | data used by the student | iterations | batch | val mIoU (%) | wall time (min) | DFAD paper (%) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| teacher {args.teacher} | labelled train split | {args.teacher_iters} | {args.batch_size} | "
        f"{100 * rows['teacher']['miou']:.1f} | {timings['teacher'] / 60:.1f} | {PAPER['teacher']} |",
        f"| student {args.student}, random init | none | 0 | - | {100 * random_miou:.1f} | - | - |",
        f"| student {args.student} alone (CE) | labelled train split | {args.iters} | {args.batch_size} | "
        f"{100 * rows['alone']['miou']:.1f} | {timings['alone'] / 60:.1f} | - |",
        f"| student + KD (CE + KD) | labelled train split | {args.iters} | {args.batch_size} | "
        f"{100 * rows['kd']['miou']:.1f} | {timings['kd'] / 60:.1f} | {PAPER['kd']} |",
        f"| student + KD, no labels | train images | {args.iters} | {args.batch_size} | "
        f"{100 * rows['kd_nolabel']['miou']:.1f} | {timings['kd_nolabel'] / 60:.1f} | - |",
        f"| student + DFAD | generated {args.gen_size[0]}x{args.gen_size[1]} images | {args.dfad_iters} student "
        f"steps ({args.dfad_iters // 5} generator steps) | {args.gen_batch} | {100 * rows['dfad']['miou']:.1f} | "
        f"{timings['dfad'] / 60:.1f} | {PAPER['dfad']} |",
        f"| student + DFAD + BN prior (--bn-weight {args.bn_weight:g}) | generated {args.gen_size[0]}x"
        f"{args.gen_size[1]} images | {args.dfad_iters} student steps | {args.gen_batch} | "
        f"{100 * rows['dfad_bn']['miou']:.1f} | {timings['dfad_bn'] / 60:.1f} | - |",
        f"| student + DFSS | ADS-selected pool (val frames + foreign) | {args.iters} | {args.batch_size} | "
        f"{100 * rows['dfss']['miou']:.1f} | {timings['dfss'] / 60:.1f} | - |",
        "",
        f"ADS on the DFSS pool: {ads['pool']} images ({ads['val']} val frames, {ads['pool'] - ads['val']} foreign: "
        f"synthetic scenes, noise, plasma textures); kept {ads['kept']} (--ads-keep 0.5), of which "
        f"{ads['kept_val']} val frames; precision of the {ads['val']} lowest scores: "
        f"{100 * ads['precision_top_val']:.0f}%.",
        "",
        f"Total wall time: {sum(timings.values()) / 60:.1f} min.",
    ]
    write_generated(out_dir / f"datafree_camvid_{dev}.md", lines)


def write_generated(path, lines, start=START, end=END, title=""):
    """Put `lines` between the markers `start` and `end` of the markdown file `path`, keeping the discussion
    written around them; a file without those markers gets the block appended (after `title` if it is new)."""
    block = f"{start}\n" + "\n".join(lines) + f"\n{end}"
    text = path.read_text() if path.exists() else title
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
