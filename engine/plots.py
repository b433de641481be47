"""Pictures written at the end of a run: curves.png (loss terms and mIoU) and samples.png."""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_log(path):
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # blank, or a line cut short by a kill
    return records


def plot_curves(log_path, out_path, title=""):
    """Loss terms (log scale) against iteration on the left, validation mIoU on the right."""
    records = read_log(log_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    keys = [k for k in (train[0]["terms"] if train else {})]
    for k in ["loss"] + keys:
        xs = [r["iter"] for r in train]
        ys = [r["loss"] if k == "loss" else r["terms"].get(k, np.nan) for r in train]
        ax1.plot(xs, ys, label=k, lw=2 if k == "loss" else 1)
    if train:
        ax1.set_yscale("log")
    ax1.set_xlabel("iteration")
    ax1.set_title("training loss terms")
    ax1.legend(fontsize=7)
    if evals:
        ax2.plot([r["iter"] for r in evals], [100 * r["miou"] for r in evals], "o-")
    ax2.set_xlabel("iteration")
    ax2.set_title("validation mIoU (%)")
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def colorize(label, palette, ignore_index=255):
    """[H, W] integer labels -> [H, W, 3] uint8 colours (ignored pixels black)."""
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(palette)] = np.asarray(palette, np.uint8)
    pal[ignore_index] = 0
    return pal[np.asarray(label).astype(np.int64).clip(0, 255)]


def denormalize(image, mean, std):
    """[3, H, W] normalised float -> [H, W, 3] uint8."""
    img = np.asarray(image, np.float32).transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return (img.clip(0, 1) * 255).astype(np.uint8)


def plot_samples(rows, out_path, palette, mean, std, columns=("image", "ground truth", "teacher", "student")):
    """rows: list of dicts with 'image' [3,H,W], 'label' [H,W] and a prediction [H,W] per named column."""
    n, cols = len(rows), [c for c in columns if c == "image" or c == "ground truth" or c in rows[0]]
    fig, axes = plt.subplots(n, len(cols), figsize=(2.6 * len(cols), 2.2 * n), squeeze=False)
    for i, row in enumerate(rows):
        for j, c in enumerate(cols):
            if c == "image":
                pic = denormalize(row["image"], mean, std)
            elif c == "ground truth":
                pic = colorize(row["label"], palette)
            else:
                pic = colorize(row[c], palette)
            axes[i, j].imshow(pic)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(c)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def plot_run(out, title, student, teacher, val_set, device, n=4):
    """The pictures of a finished run: <out>/curves.png from its log.jsonl, and <out>/samples.png, image |
    ground truth | teacher (when there is one) | student on `n` validation images spread over the split
    (consecutive ones are near-identical frames in video datasets such as CamVid)."""
    import torch

    from engine.evaluate import whole_logits

    out = Path(out)
    plot_curves(out / "log.jsonl", out / "curves.png", title)
    rows = []
    was = student.training
    student.eval()
    with torch.no_grad():
        m = min(n, len(val_set))
        for i in sorted({round(j * (len(val_set) - 1) / max(m - 1, 1)) for j in range(m)}):
            item = val_set[i]
            x = item["image"][None].to(device)
            row = {"image": item["image"].numpy(), "label": item["label"].numpy(),
                   "student": whole_logits(student, x).argmax(1)[0].cpu().numpy()}
            if teacher is not None:
                row["teacher"] = whole_logits(teacher, x).argmax(1)[0].cpu().numpy()
            rows.append(row)
    student.train(was)
    plot_samples(rows, out / "samples.png", val_set.palette, val_set.mean, val_set.std)
