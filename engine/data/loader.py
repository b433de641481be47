"""Training and validation loaders: a reproducible, resumable, rank-sharded key stream and an exact val split.

Training stream (per rank, batch size B, N images, world size W):
    per_rank = N // W, iters_per_epoch = per_rank // B
    epoch e: perm_e = permutation of range(N) drawn from a generator seeded with (seed, e)
             shard = perm_e[rank::W][:per_rank]            (every rank gets the same count)
    iteration it: e, j = divmod(it, iters_per_epoch)
             keys = e * N + shard[j * B:(j + 1) * B]       (the dataset reads image key % N)
The tail of every shard (per_rank mod B samples) is dropped, and at most W - 1 images per epoch fall outside
all shards. Because iteration `it` maps straight to (epoch, offset), a run resumed at `start_iter` produces
exactly the batches an uninterrupted run would have, without loading the skipped samples.

Two implementations produce this stream: a torch DataLoader (`loader="torch"`, below) and a DALI pipeline
(`loader="dali"`, engine/data/dali.py) that is fed the very same keys and augmentation parameters.
"""
import importlib.util

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import default_collate

LOADERS = ("auto", "dali", "torch")

# Kept apart from the augmentation stream (engine/data/base.py).
ORDER_STREAM = 0x0D


def epoch_permutation(seed, epoch, n):
    """The data order of epoch `epoch`: a permutation of range(n), int64 [n]."""
    return np.random.default_rng([seed, ORDER_STREAM, epoch]).permutation(n)


class TrainBatchSampler(Sampler):
    """Infinite sampler of training batches: each item is the list of B keys of one iteration of this rank."""

    def __init__(self, n, batch_size, *, seed=0, rank=0, world_size=1, start_iter=0):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {start_iter}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start_iter = rank, world_size, start_iter
        self.per_rank = n // world_size
        if self.per_rank < batch_size:
            raise ValueError(f"dataset of {n} images split over {world_size} processes gives {self.per_rank} "
                             f"per process, fewer than batch_size {batch_size}: lower --batch-size")
        self.iters_per_epoch = self.per_rank // batch_size

    def position(self, it):
        """(epoch, batch offset within the epoch) of run iteration `it`."""
        return divmod(it, self.iters_per_epoch)

    def shard(self, epoch):
        """This rank's image indices of epoch `epoch`, int64 [per_rank]."""
        return epoch_permutation(self.seed, epoch, self.n)[self.rank::self.world_size][:self.per_rank]

    def batch(self, it):
        """The B keys of run iteration `it` on this rank."""
        epoch, j = self.position(it)
        b = self.batch_size
        return (epoch * self.n + self.shard(epoch)[j * b:(j + 1) * b]).tolist()

    def __iter__(self):
        it = self.start_iter
        epoch, shard = None, None
        b = self.batch_size
        while True:
            e, j = self.position(it)
            if e != epoch:  # one permutation per epoch, not per batch
                epoch, shard = e, self.shard(e)
            yield (epoch * self.n + shard[j * b:(j + 1) * b]).tolist()
            it += 1


class ShardSampler(Sampler):
    """Indices rank, rank + W, rank + 2W, ... < N: every index on exactly one rank, no padding duplicates."""

    def __init__(self, n, rank=0, world_size=1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.indices = range(rank, n, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class TrainLoader:
    """Infinite iterator of training batches {"image": [B, 3, h, w], "label": [B, h, w], "index": [B]}.

    `sampler` is the TrainBatchSampler (for `iters_per_epoch` and `position(it)`); the DataLoader's
    iterator is created once, so persistent workers keep prefetching across epochs.
    """

    def __init__(self, loader, sampler):
        self.loader = loader
        self.sampler = sampler
        self.iters_per_epoch = sampler.iters_per_epoch
        self._it = iter(loader)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)


def dali_importable():
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def dali_device_id(device):
    """DALI's device_id for batches meant for torch `device`: the CUDA device's index, None (CPU operators)
    for the CPU; device None: the current CUDA device if there is one."""
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def resolve_loader(kind):
    """"dali" or "torch" for `--loader kind`; auto: DALI when it is importable and CUDA is there for it to decode
    and augment on, else the DataLoader. On a CPU-only machine auto keeps the DataLoader, whose batches the
    existing results were made with (DALI's resample with slightly different filters); `--loader dali` is
    faster there when there is no rotation, see bench/results/data_*."""
    if kind not in LOADERS:
        raise ValueError(f"unknown --loader {kind!r}; valid: {', '.join(LOADERS)}")
    if kind == "dali" and not dali_importable():
        raise ValueError("--loader dali: nvidia.dali is not importable; pip install nvidia-dali-cuda130 "
                         "(or use --loader torch)")
    if kind == "auto":
        return "dali" if dali_importable() and torch.cuda.is_available() else "torch"
    return kind


def build_train_loader(dataset, batch_size, *, workers=2, seed=0, rank=0, world_size=1, start_iter=0,
                       loader="torch", device=None):
    """Infinite, rank-sharded, resumable stream of training batches (see the module docstring).

    `dataset` must be in train mode (it maps key -> image key % N and augments from (its seed, key)).
    `seed` decides the data order only; the augmentation seed is the dataset's. `loader` picks the
    implementation (see resolve_loader); both give the same batches up to image resampling round-off.
    `device` (the training device; None: CUDA if available) is where DALI works and delivers the batches.
    """
    if not getattr(dataset, "train", False):
        raise ValueError(f"build_train_loader needs a dataset built with train=True, got {dataset!r}")
    if resolve_loader(loader) == "dali":
        from engine.data.dali import DaliTrainLoader
        return DaliTrainLoader(dataset, batch_size, workers=workers, seed=seed, rank=rank, world_size=world_size,
                               start_iter=start_iter, device_id=dali_device_id(device))
    sampler = TrainBatchSampler(len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size,
                                start_iter=start_iter)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                        prefetch_factor=4 if workers > 0 else None)
    return TrainLoader(loader, sampler)


def pad_collate(samples):
    """default_collate, except that images of different sizes are padded at the bottom and right to the largest
    (image 0, i.e. the mean colour; label 255, so padding never counts in a metric)."""
    shapes = {tuple(s["label"].shape) for s in samples}
    if len(shapes) == 1:
        return default_collate(samples)
    h, w = max(s[0] for s in shapes), max(s[1] for s in shapes)
    image = torch.zeros(len(samples), 3, h, w)
    label = torch.full((len(samples), h, w), 255, dtype=torch.int64)
    for k, s in enumerate(samples):
        sh, sw = s["label"].shape
        image[k, :, :sh, :sw] = s["image"]
        label[k, :sh, :sw] = s["label"]
    return {"image": image, "label": label, "index": torch.as_tensor([s["index"] for s in samples])}


def build_val_loader(dataset, batch_size, *, workers=2, rank=0, world_size=1, loader="torch", device=None):
    """Each rank evaluates indices rank::world_size once, in order; all ranks together see every image once.

    Ranks may get one image fewer than others (no padding), so a per-rank confusion matrix all-reduced after
    the loop is exact; do not run collectives per batch, the batch counts can differ by one. Images of
    different sizes in one batch are padded (see pad_collate): exact for the labels, while the network sees
    some padding beside the smaller images, so evaluate mixed-size datasets at batch size 1 for exact numbers.
    `dataset` may be a torch Subset of a dataset; `device` as for build_train_loader.
    """
    if getattr(dataset, "train", False) or getattr(getattr(dataset, "dataset", None), "train", False):
        raise ValueError(f"build_val_loader needs a dataset built with train=False, got {dataset!r}")
    if resolve_loader(loader) == "dali":
        from engine.data.dali import DaliValLoader
        return DaliValLoader(dataset, batch_size, workers=workers, rank=rank, world_size=world_size,
                             device_id=dali_device_id(device))
    sampler = ShardSampler(len(dataset), rank, world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=pad_collate,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0, drop_last=False)
