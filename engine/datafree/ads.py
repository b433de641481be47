"""Approximate Distribution Sampling (DFSS, Sun and Wu 2025): score an unlabelled pool by the teacher's BN
statistics, keep the images closest to its training distribution; scores cached so a rerun does not rescore.

    score(image) = sum over the chosen BN layers l (--ads-layers) of
                   ||mean_hw(x_l) - mu_l||_2 + ||var_hw(x_l) - sigma_l^2||_2     (kernels.bn_stat_distance's d_b)

with x_l the image's input to layer l and (mu_l, sigma_l^2) its running statistics, computed once per pool
image in eval mode, in batches, with no look at the teacher's predictions. Each layer's [B] distances are
computed in its forward hook, so no BN input outlives its layer (bn_hooks.bn_distances). The teacher sees
each image as it saw its training data (--ads-view crop, the default): resized to cover the
training crop and centre-cropped to it. BN running statistics are gathered at that input size; deep layers
(dilated, pyramid pooling) respond to the input's extent, so scoring whole images of another size shifts
every image's statistics and blurs the ranking (on the synthetic data it drops the precision of the top
ranks from about 0.9 to about 0.7). --ads-view whole scores the whole image (batched by size). The
--ads-keep lowest-scored images are kept.

Cache: `<pool>/.segkd-ads/<key>.json`, or `<cache dir>/ads/<key>.json` when the pool cannot be written (a
read-only mount). The key hashes the teacher checkpoint's bytes, the scoring settings and the pool listing
(path, size, mtime of every image), so a changed teacher, setting or pool never reuses stale scores.
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.datafree.bn_hooks import bn_distances, parse_layers
from engine.datafree.pool import ImagePool

CACHE_VERSION = 1


def file_digest(path, chunk=1 << 22):
    """sha256 of a file's bytes (the teacher checkpoint's content, not its name or date)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


VIEWS = ("crop", "whole")


def check_view(view):
    if view not in VIEWS:
        raise ValueError(f"--ads-view {view!r}: expected one of {', '.join(VIEWS)}")


def cache_key(teacher_digest, settings, pool_digest):
    key = {"v": CACHE_VERSION, "teacher": teacher_digest, "settings": settings, "pool": pool_digest}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_candidates(pool_root, fallback_dir, key):
    """Where the scores may live, in order of preference: next to the pool, then the cache dir."""
    return [Path(pool_root) / ".segkd-ads" / f"{key}.json", Path(fallback_dir) / "ads" / f"{key}.json"]


def load_cached(candidates, files):
    """The cached scores (np.float64 [N]) and the file they came from, or (None, None)."""
    for path in candidates:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("files") == files and len(data.get("scores", ())) == len(files):
            return np.asarray(data["scores"], dtype=np.float64), path
    return None, None


def save_cache(candidates, payload):
    """Write to the first candidate that can be written (temporary file, then rename); -> its path or None."""
    text = json.dumps(payload)
    for path in candidates:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, path)
            return path
        except OSError:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
    return None


def scoring_size(path, max_side, fit=None):
    """(H, W) of `path` as ImagePool.load returns it (`fit`, or after the --ads-max-side downscale)."""
    if fit:
        return tuple(fit)
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:
        raise ValueError(f"--aux-data: cannot read image {path} ({type(e).__name__}: {e})") from e
    if max_side and max(h, w) > max_side:
        f = max_side / max(h, w)
        return max(1, round(h * f)), max(1, round(w * f))
    return h, w


@torch.no_grad()
def score_pool(teacher, pool, layers="all", batch_size=16, device="cpu", workers=0):
    """ADS score of every image of `pool` (an eval-mode ImagePool) -> np.float64 [N]; see the module docstring.

    `teacher`: the bare teacher network in eval mode. Images are batched by size so no resize distorts them.
    The global torch RNG is left as it was (the loader draws a seed from it): a run draws the same random
    stream whether the scores were computed now or read from the cache.
    """
    with torch.random.fork_rng(devices=[]):
        return _score_pool(teacher, pool, layers, batch_size, device, workers)


def _score_pool(teacher, pool, layers, batch_size, device, workers):
    pick = parse_layers(layers)
    groups = {}
    for i in range(len(pool)):
        groups.setdefault(scoring_size(pool.path(i), pool.max_side, pool.fit), []).append(i)
    chunks = [idx[j:j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]
    loader = torch.utils.data.DataLoader(pool, batch_sampler=chunks, num_workers=workers)
    scores = np.zeros(len(pool), dtype=np.float64)
    was = teacher.training
    teacher.eval()
    # Each BN layer's [B] distance is computed in its forward hook; the activations are not kept (bn_distances).
    with bn_distances(teacher) as rows:
        for batch in loader:
            rows.clear()
            teacher(batch["image"].to(device))
            chosen = pick(rows)                                            # L x [B] float32
            if not chosen:
                raise ValueError("the teacher has no BatchNorm layers: ADS needs their running statistics")
            scores[batch["index"].numpy()] = sum(chosen).double().cpu().numpy()
    teacher.train(was)
    return scores


def keep_count(n, keep):
    """--ads-keep: a fraction of the pool if 0 < keep <= 1 (at least one image), else a count (at most n)."""
    if keep <= 0:
        raise ValueError(f"--ads-keep must be > 0 (a fraction <= 1 or a count), got {keep}")
    if keep <= 1:
        return max(1, round(n * keep))
    if keep != int(keep):
        raise ValueError(f"--ads-keep {keep}: a value above 1 is a number of images and must be whole")
    return min(n, int(keep))


def select(scores, keep):
    """Indices of the kept images, lowest score first (ties broken by index): int64 [n_keep]."""
    order = np.lexsort((np.arange(len(scores)), scores))
    return order[:keep_count(len(scores), keep)]


def scoring_pool(root, files, view, crop, max_side):
    """The eval-mode ImagePool of `files` as ADS scores them (see pool_scores for the two views)."""
    return ImagePool(root, files, fit=crop) if view == "crop" else ImagePool(root, files, max_side=max_side)


def pool_scores(teacher, teacher_ckpt, root, files, digest, *, layers, view, crop, max_side, batch_size, device,
                workers, fallback_dir, echo=print):
    """Scores of the pool `files` under `root`: from the cache when present, else computed and cached.

    view "crop": every image resized to cover `crop` and centre-cropped to it (what the teacher trained on);
    "whole": the whole image, downscaled to `max_side` if larger (0: never).
    """
    check_view(view)
    settings = {"layers": layers, "view": view}
    settings.update(size=list(crop)) if view == "crop" else settings.update(max_side=max_side)
    key = cache_key(file_digest(teacher_ckpt) if teacher_ckpt else "unsaved-teacher", settings, digest)
    candidates = cache_candidates(root, fallback_dir, key)
    scores, path = load_cached(candidates, files)
    if scores is not None:
        echo(f"ADS: using the scores of {len(files)} pool images cached in {path}")
        return scores
    echo(f"ADS: scoring {len(files)} pool images in {root} by the teacher's BN statistics ({settings})")
    scores = score_pool(teacher, scoring_pool(root, files, view, crop, max_side), layers, batch_size, device, workers)
    written = save_cache(candidates, {"files": files, "scores": scores.tolist(), "settings": settings,
                                      "teacher_ckpt": str(teacher_ckpt)})
    echo(f"ADS: scores cached in {written}" if written else
         f"ADS: could not write a score cache ({', '.join(map(str, candidates))}); a rerun will rescore")
    return scores
