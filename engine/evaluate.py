"""Evaluation: mIoU of a model on a dataset split, whole-image or sliding-window inference.

    python engine/evaluate.py --ckpt runs/camvid-pspnet_r18-cad/last.pt --data-root ../shared/datasets/camvid
    torchrun --nproc-per-node=2 engine/evaluate.py --ckpt FILE --sliding

The confusion matrix is accumulated on the device and all-reduced, so 1 and N processes give the same mIoU.
"""
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python engine/evaluate.py`: import `engine` from the checkout, not engine/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
import torch.nn.functional as F

from engine.metrics import ConfusionMatrix
from engine.precision import autocast, resolve_precision


def whole_logits(model, images):
    """Logits upsampled (bilinear) to the input size: [B, K, H, W]."""
    return F.interpolate(model(images).logits.float(), size=images.shape[-2:], mode="bilinear",
                         align_corners=False)


def sliding_logits(model, images, window, overlap=1 / 3):
    """Average of the logits of window-sized crops with the given overlap; images smaller than the window are
    padded with 0 (the mean colour after normalisation) and the padding cropped off again."""
    b, _, h, w = images.shape
    wh, ww = window
    ph, pw = max(wh - h, 0), max(ww - w, 0)
    x = F.pad(images, (0, pw, 0, ph)) if ph or pw else images
    hh, wwid = x.shape[-2:]
    sh, sw = max(int(wh * (1 - overlap)), 1), max(int(ww * (1 - overlap)), 1)
    ys = list(range(0, hh - wh + 1, sh))
    xs = list(range(0, wwid - ww + 1, sw))
    if ys[-1] != hh - wh:
        ys.append(hh - wh)
    if xs[-1] != wwid - ww:
        xs.append(wwid - ww)
    total = None
    count = torch.zeros(1, 1, hh, wwid, device=images.device)
    for y in ys:
        for x0 in xs:
            out = whole_logits(model, x[:, :, y:y + wh, x0:x0 + ww])
            if total is None:
                total = torch.zeros(b, out.shape[1], hh, wwid, device=images.device)
            total[:, :, y:y + wh, x0:x0 + ww] += out
            count[:, :, y:y + wh, x0:x0 + ww] += 1
    return (total / count)[:, :, :h, :w]


@torch.no_grad()
def evaluate(model, loader, num_classes, device, *, ignore_index=255, sliding=False, window=None, dtype=None):
    """-> dict(miou, iou, acc, macc) over the whole split (all ranks' shards, all-reduced).
    dtype: autocast dtype (torch.bfloat16 / float16), None for fp32."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, device, ignore_index)
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = sliding_logits(model, images, window) if sliding else whole_logits(model, images)
        if logits.shape[-2:] != labels.shape[-2:]:  # --val-resize-side long: scored at the label's own size
            logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        cm.update(logits.argmax(1), labels)
    model.train(was_training)
    return cm.reduce().compute()


def format_iou(result, class_names, title=""):
    """Per-class IoU table with class names, then mIoU and pixel accuracy."""
    width = max(len(n) for n in class_names)
    lines = [title] if title else []
    for name, v in zip(class_names, result["iou"]):
        lines.append(f"  {name:<{width}}  {'  n/a' if v != v else f'{100 * v:5.1f}'}")
    lines.append(f"  {'mIoU':<{width}}  {100 * result['miou']:5.1f}   pixel acc {100 * result['acc']:.1f}")
    return "\n".join(lines)


def main(argv=None):
    from engine.checkpoint import load_model
    from engine.config import ArgumentParser, Config, parse_size
    from engine.data import build_dataset, build_val_loader
    from engine.dist import cleanup, init_distributed

    p = ArgumentParser(description="Evaluate a segkd checkpoint (mIoU, per-class IoU).")
    p.add_argument("--ckpt", required=True, help="checkpoint written by engine/train.py")
    p.add_argument("--dataset", default=None, help="dataset (default: the checkpoint's)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the checkpoint's)")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--sliding", action="store_true", help="sliding-window inference (windows of --window)")
    p.add_argument("--window", type=parse_size, default=None, help="sliding window size (default: training crop)")
    p.add_argument("--val-size", type=int, default=0, help="evaluate the first N images only (0: all)")
    p.add_argument("--val-resize", type=int, default=None,
                   help="resize for evaluation as the trainer's --val-resize (default: the checkpoint's)")
    p.add_argument("--val-resize-side", default=None, choices=("short", "long"),
                   help="the side --val-resize sets (default: the checkpoint's); long scores one image a batch")
    p.add_argument("--batch-size", type=int, default=4, help="images per process")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto|cpu|cuda")
    p.add_argument("--precision", default="auto", help="auto|fp32|bf16|fp16 (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = p.parse_args(argv)
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--val-size", args.val_size, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")

    env = init_distributed(args.device)
    try:
        model, ckpt = load_model(args.ckpt)
        cfg = Config.from_dict(ckpt["config"])
        dataset = args.dataset or cfg.data.dataset
        root = cfg.data.data_root if args.data_root is None else args.data_root
        ds = build_dataset(dataset, args.split, root=root, train=False)
        ds.eval_resize = cfg.data.val_resize if args.val_resize is None else args.val_resize  # as the run scored it
        ds.eval_resize_side = args.val_resize_side or cfg.data.val_resize_side
        if ds.eval_resize < 0:
            raise ValueError(f"--val-resize must be >= 0, got {ds.eval_resize}")
        if ds.num_classes != ckpt["num_classes"]:
            raise ValueError(f"checkpoint {args.ckpt} has {ckpt['num_classes']} classes but dataset {dataset} "
                             f"has {ds.num_classes}")
        model.to(env.device)
        items = torch.utils.data.Subset(ds, range(min(args.val_size, len(ds)))) if args.val_size else ds
        long_side = ds.eval_resize and ds.eval_resize_side == "long"  # scored at each label's size: unpadded
        loader = build_val_loader(items, 1 if long_side else args.batch_size, workers=args.workers, rank=env.rank,
                                  world_size=env.world_size)
        result = evaluate(model, loader, ds.num_classes, env.device, ignore_index=ds.ignore_index,
                          sliding=args.sliding, window=args.window or cfg.data.crop,
                          dtype=resolve_precision(args.precision, env.device))
        if env.is_main:
            mode = ("sliding window" if args.sliding else "whole image") + (
                f", {ds.eval_resize_side}er side resized to {ds.eval_resize}" if ds.eval_resize else "")
            print(format_iou(result, ds.class_names,
                             f"{ckpt['arch']} ({args.ckpt}, iteration {ckpt['iteration']}) on {dataset} "
                             f"{args.split}, {len(items)} images, {mode}:"))
            if args.json:
                Path(args.json).write_text(json.dumps({**result, "class_names": list(ds.class_names)}, indent=2))
        return result
    finally:
        cleanup()


def cli(argv=None):
    """The command line: any failure ends in one line `segkd: error: ...` and its exit code (engine/errors.py)."""
    from engine.errors import run_cli

    run_cli(main, argv)


if __name__ == "__main__":
    cli()
