"""NVIDIA DALI loaders: the torch path's training stream and validation split, decoded and augmented by DALI.

Why an external source and not DALI's file readers: the batches must be those of the torch path, sample for
sample. TrainBatchSampler (engine/data/loader.py) maps run iteration `it` straight to this rank's keys, and
`sample_params` draws each key's AugParams from (seed, key); DALI's readers shuffle with their own RNG, shard
with their own padding rules and can only resume by replaying. So one per-sample callback (`TrainSampleReader`, run
ahead of the pipeline by a pool of threads, see `ReadAhead`) turns sample n of the pipeline's stream into
(iteration start_iter + n // B, slot n % B), reads that key's file and its AugParams, and hands DALI the encoded
image plus the explicit parameters of every operator. Ranks are disjoint, resume is exact from any iteration,
and the two loaders agree because they share the key stream, the augmentation RNG and the semantics of
engine/data/transforms.py.

Training graph, per sample (image H x W, rescaled size (h, w) = scaled_size, crop ch x cw):

    encoded --decoders.image (mixed: GPU / cpu)--> uint8 HWC
      --resize(linear, antialias; ROI = the crop window's footprint in the source)--> uint8 [wh, ww, 3]
      --crop_mirror_normalize(pad bottom/right to ch x cw with 0 after normalising, mirror)--> float
      --warp_affine(rotation matrix, linear, fill 0) --> transpose --> float32 [3, ch, cw]
    label (PIL in the source: palette PNGs read as indices, dataset's id mapping)
      --crop_label: nearest rescale + pad 255 + crop + flip, as one integer gather of the window--> [ch, cw, 1]
      --warp_affine(the same matrix, nearest, fill 255)--> uint8 [ch, cw]

Resampling only the window (ROI) costs the crop, not the whole rescaled image, and matches rescale-then-crop
because both put output pixel j at source centre (top + j + .5) * H / h with the same filter width. The label
is rescaled by index arithmetic rather than DALI's nearest resize because DALI computes source indices in
float32 and picks the other neighbour at exact ties (floor((y + .5) H / h) an integer), which happen for many
size pairs (e.g. 360 -> 450 rows); the gather is exact, cheap (only ch x cw pixels) and leaves labels
identical to the torch path. Warp matrices use DALI's convention: output pixel centre (x + .5, y + .5) reads
source point M @ (x + .5, y + .5, 1), out-of-image neighbours take the fill value, exactly as transforms.rotate.

Evaluation graph: decode -> normalise -> CHW; label as read; both padded to the largest image of the batch
(image 0, label 255), as the torch path's pad_collate does.

Devices: with CUDA, decoding runs on the GPU (`mixed`) and every operator after it on the GPU, the batch
arriving as CUDA tensors; without CUDA (`device_id=None`) everything runs on DALI's CPU operators.

Bad files: the source checks each image's header and end marker before DALI sees it (engine/data/files.py);
damage only a decoder notices stops the pipeline, and `diagnose` then finds the file with PIL, names it, or
(skipping) records it and restarts the pipeline at the same iteration.
"""
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from engine.data import transforms as T
from engine.data.files import BadSampleError, FileSegmentation
from engine.data.loader import ShardSampler, TrainBatchSampler, dali_device_id

OUTPUTS = ["image", "label", "index"]
PREFETCH = 2   # batches DALI's pipeline prepares ahead
LOOKAHEAD = 3  # batches the Python source prepares ahead of DALI's requests


def _read(dataset, i):
    """(index used, image, (H, W), label [H, W]): encoded bytes for on-disk datasets (DALI decodes them),
    uint8 [H, W, 3] pixels for generated ones."""
    if isinstance(dataset, FileSegmentation):
        j, (data, hw, label) = dataset.first_readable(i, dataset.load_encoded)
        return j, data, hw, label
    j, rgb, label = dataset.load_checked(i)
    return j, rgb, rgb.shape[:2], label


class TrainSampleReader:
    """Per-sample callback of the training pipeline: sample n is slot n % B of iteration start_iter + n // B.

    Stateless apart from a cache of the current epoch's shard, so threads may run it in any order.
    """

    def __init__(self, dataset, sampler, start_iter):
        self.dataset, self.sampler, self.start_iter = dataset, sampler, start_iter
        self.batch_size = sampler.batch_size
        self.rotate = dataset.rotate > 0
        self._cache = (None, None)  # (epoch, its shard)

    def requested(self, n):
        """The index sample n asks for (before any bad-file substitution)."""
        return self.key(n) % len(self.dataset)

    def key(self, n):
        it, slot = divmod(n, self.batch_size)
        epoch, j = self.sampler.position(self.start_iter + it)
        cached_epoch, shard = self._cache  # one tuple: threads read and replace it whole
        if epoch != cached_epoch:
            shard = self.sampler.shard(epoch)
            self._cache = (epoch, shard)
        return epoch * self.sampler.n + int(shard[j * self.batch_size + slot])

    def __call__(self, n):
        ds = self.dataset
        key = self.key(n)
        i, image, (H, W), label = _read(ds, key % len(ds))
        p = ds.params(key, (H, W))
        h, w = T.scaled_size((H, W), p.scale)
        ch, cw = ds.crop
        wh, ww = min(ch, h - p.top), min(cw, w - p.left)  # the part of the crop window inside the image
        sy, sx = H / h, W / w
        outs = [image, T.crop_label(label, p, ds.crop)[..., None], np.array([i], np.int64),
                np.array([wh, ww], np.float32),
                np.array([p.top * sy, p.left * sx], np.float32),                  # ROI in source pixels
                np.array([(p.top + wh) * sy, (p.left + ww) * sx], np.float32),
                np.array(p.flip, np.int32)]
        if self.rotate:
            outs.append(T.rotation_matrix(p.angle, ds.crop).astype(np.float32))
        # DALI takes no strided arrays (the flipped label); ascontiguousarray would make the 0-d flag 1-d
        return tuple(a if a.ndim == 0 else np.ascontiguousarray(a) for a in outs)


class EvalSampleReader:
    """Per-sample callback of the evaluation pipeline: this rank's indices in order, as an endless stream of
    whole batches; the tail of the last batch repeats the last image and is cut off by DaliValLoader (a repeat
    of a real image never enlarges the batch's padded size)."""

    def __init__(self, dataset, indices, batch_size, start_batch=0):
        self.dataset, self.indices = dataset, list(indices)
        self.padded = math.ceil(len(self.indices) / batch_size) * batch_size
        self.start = start_batch * batch_size

    def requested(self, n):
        return self.indices[min((self.start + n) % self.padded, len(self.indices) - 1)]

    def __call__(self, n):
        i, image, _, label = _read(self.dataset, self.requested(n))
        return np.ascontiguousarray(image), np.ascontiguousarray(label[..., None]), np.array([i], np.int64)


def diagnose(source, batch_size, dataset, error):
    """After a pipeline failure: replay the samples in flight in this process and re-raise the source's own
    error, else find the images DALI could not decode (PIL cannot either). Raises the first BadSampleError unless the dataset skips bad files, in which case the
    new ones are recorded and the caller restarts the pipeline, whose source then skips them too (it may have
    read ahead before this process learnt of a bad file). Raises a RuntimeError naming the suspects if PIL reads
    them all."""
    suspects = {}
    for n in range((PREFETCH + 2) * batch_size):  # the pipeline's queue and the batch being run
        suspects[source.requested(n)] = None
        suspects[int(source(n)[2][0])] = None
    if not isinstance(dataset, FileSegmentation):
        raise error
    known, bad = [i for i in suspects if i in dataset.bad], []
    for i in suspects:
        if i not in dataset.bad:
            try:
                dataset.read_image(i)
            except BadSampleError as e:
                bad.append((i, e))
    if not bad and not known:
        files = ", ".join(str(dataset.images[i]) for i in suspects)
        raise RuntimeError(f"DALI pipeline failed on one of {files}: {error}") from error
    if bad and not dataset.skip_bad:
        raise bad[0][1] from error
    for i, e in bad:
        dataset.bad.add(i)
        dataset.skip_log.record(e)


class ReadAhead:
    """The batch callback of DALI's external source: batch b is samples b*B .. b*B + B - 1 of a per-sample
    source, computed by `workers` threads up to LOOKAHEAD batches ahead (none: in the caller's thread).

    Threads, not DALI's Python worker processes: forking workers while DALI pipelines (or CUDA) already run
    threads in this process can deadlock them, and spawning re-imports torch per worker. The work here is file
    reading, PIL label decoding and numpy gathers, which mostly release the GIL; the sources are pure functions
    of the sample position, so reading ahead is always safe.
    """

    def __init__(self, source, batch_size, workers):
        self.source, self.batch_size = source, batch_size
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="segkd-data") if workers > 0 else None
        self.pending = {}

    def _submit(self, b):
        if b not in self.pending:
            self.pending[b] = [self.pool.submit(self.source, n)
                               for n in range(b * self.batch_size, (b + 1) * self.batch_size)]

    def __call__(self, b):
        if self.pool is None:
            samples = [self.source(n) for n in range(b * self.batch_size, (b + 1) * self.batch_size)]
        else:
            for ahead in range(b, b + LOOKAHEAD + 1):
                self._submit(ahead)
            samples = [f.result() for f in self.pending.pop(b)]
        return tuple(list(column) for column in zip(*samples))  # one list of B arrays per output

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _pipeline(batch_size, workers, device_id):
    return Pipeline(batch_size=batch_size, num_threads=max(workers, 1), device_id=device_id, seed=0,
                    prefetch_queue_depth=PREFETCH)


def _source(callback, encoded, extra):
    """The external source nodes: image (encoded bytes or pixels), label [H, W, 1], index [1], then `extra`
    ((dtype, ndim) each), fed a batch at a time by `callback` (a ReadAhead)."""
    dtypes = [types.UINT8, types.UINT8, types.INT64] + [d for d, _ in extra]
    ndims = [1 if encoded else 3, 3, 1] + [n for _, n in extra]
    layouts = ["" if encoded else "HWC", "HWC", ""] + [""] * len(extra)
    return fn.external_source(source=callback, num_outputs=len(dtypes), batch=True, dtype=dtypes, ndim=ndims,
                              layout=layouts)


def _decode(image, encoded, gpu):
    if encoded:  # EXIF orientation ignored and libjpeg-style chroma upsampling: the pixels PIL gives
        return fn.decoders.image(image, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                 adjust_orientation=False, jpeg_fancy_upsampling=True)
    return image.gpu() if gpu else image


def train_pipeline(feed, dataset, batch_size, workers, device_id):
    """The training graph of the module docstring, fed by `feed` (a ReadAhead of a TrainSampleReader)."""
    encoded, gpu = isinstance(dataset, FileSegmentation), device_id is not None
    rotate = dataset.rotate > 0
    extra = [(types.FLOAT, 1)] * 3 + [(types.INT32, 0)] + ([(types.FLOAT, 2)] if rotate else [])
    pipe = _pipeline(batch_size, workers, device_id)
    with pipe:
        image, label, index, window, roi_start, roi_end, flip, *mtx = _source(feed, encoded, extra)
        image = _decode(image, encoded, gpu)
        image = fn.resize(image, size=window, roi_start=roi_start, roi_end=roi_end,
                          interp_type=types.INTERP_LINEAR, antialias=True)          # uint8 [wh, ww, 3]
        image = fn.crop_mirror_normalize(image, crop=dataset.crop, crop_pos_x=0.0, crop_pos_y=0.0, mirror=flip,
                                         mean=[255 * m for m in dataset.mean], std=[255 * s for s in dataset.std],
                                         out_of_bounds_policy="pad", fill_values=0.0, dtype=types.FLOAT,
                                         output_layout="HWC" if rotate else "CHW")   # [ch, cw, 3] | [3, ch, cw]
        label = label.gpu() if gpu else label                                        # uint8 [ch, cw, 1]
        if rotate:
            image = fn.warp_affine(image, matrix=mtx[0], size=dataset.crop, fill_value=0.0,
                                   interp_type=types.INTERP_LINEAR)
            image = fn.transpose(image, perm=[2, 0, 1])                              # [3, ch, cw]
            label = fn.warp_affine(label, matrix=mtx[0], size=dataset.crop, fill_value=float(T.IGNORE_INDEX),
                                   interp_type=types.INTERP_NN)
        pipe.set_outputs(image, label, index)
    return pipe


def eval_pipeline(feed, dataset, batch_size, workers, device_id):
    """Whole images, normalised, padded to the batch's largest (image 0, label 255); fed by a ReadAhead of an
    EvalSampleReader."""
    encoded, gpu = isinstance(dataset, FileSegmentation), device_id is not None
    pipe = _pipeline(batch_size, workers, device_id)
    with pipe:
        image, label, index = _source(feed, encoded, [])
        image = fn.crop_mirror_normalize(_decode(image, encoded, gpu), mean=[255 * m for m in dataset.mean],
                                         std=[255 * s for s in dataset.std], dtype=types.FLOAT,
                                         output_layout="CHW")                        # [3, H, W]
        image = fn.pad(image, axes=(1, 2), fill_value=0.0)
        label = fn.pad(label.gpu() if gpu else label, axes=(0, 1), fill_value=T.IGNORE_INDEX)
        pipe.set_outputs(image, label, index)
    return pipe


def _batch(out):
    """DALIGenericIterator's dict -> {"image": float32 [B, 3, H, W], "label": int64 [B, H, W], "index": int64 [B]}."""
    return {"image": out["image"], "label": out["label"][..., 0].long(), "index": out["index"][:, 0].cpu()}


class DaliTrainLoader:
    """Infinite iterator of training batches from DALI; the same stream as loader.TrainLoader (see the module
    docstring). `iters_per_epoch` and `sampler` as there; `skipped()` counts unreadable files skipped."""

    def __init__(self, dataset, batch_size, *, workers=2, seed=0, rank=0, world_size=1, start_iter=0,
                 device_id="auto"):
        if not getattr(dataset, "train", False):
            raise ValueError(f"DaliTrainLoader needs a dataset built with train=True, got {dataset!r}")
        self.sampler = TrainBatchSampler(len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size,
                                         start_iter=start_iter)
        self.iters_per_epoch = self.sampler.iters_per_epoch
        self.dataset, self.batch_size, self.workers = dataset, batch_size, workers
        self.device_id = dali_device_id(None) if device_id == "auto" else device_id
        self.it = start_iter
        self.pipe = self._iter = self.feed = None
        self._start()

    def _start(self):
        """(Re)build the pipeline so that its first batch is iteration self.it."""
        self.close()
        self.feed = ReadAhead(TrainSampleReader(self.dataset, self.sampler, self.it), self.batch_size, self.workers)
        self.pipe = train_pipeline(self.feed, self.dataset, self.batch_size, self.workers, self.device_id)
        self._iter = DALIGenericIterator(self.pipe, OUTPUTS, prepare_first_batch=False)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            out = next(self._iter)[0]
        except StopIteration:
            raise
        except Exception as error:  # a decoder or the Python source failed somewhere in the batches in flight
            diagnose(TrainSampleReader(self.dataset, self.sampler, self.it), self.batch_size, self.dataset, error)
            self._start()  # bad files skipped: the stream is a function of the iteration, restart exactly here
            return next(self)
        self.it += 1
        return _batch(out)

    def skipped(self):
        log = getattr(self.dataset, "skip_log", None)
        return log.count() if log else 0

    def close(self):
        """Stop the pipeline and the source's threads."""
        if self.feed is not None:
            self.feed.close()
        self._iter = self.pipe = self.feed = None

    def __del__(self):
        self.close()


class DaliValLoader:
    """This rank's indices rank::world_size, in order, in batches of `batch_size` (the last one shorter), as
    build_val_loader's DataLoader gives them. Iterable any number of times; the pipeline is built on first
    use and kept (it prefetches the next evaluation's first batches)."""

    def __init__(self, dataset, batch_size, *, workers=2, rank=0, world_size=1, device_id="auto"):
        base, positions = dataset, range(len(dataset))
        if isinstance(dataset, torch.utils.data.Subset):
            base, positions = dataset.dataset, dataset.indices
        self.dataset, self.batch_size, self.workers = base, batch_size, workers
        self.indices = [int(positions[p]) for p in ShardSampler(len(dataset), rank, world_size)]
        self.device_id = dali_device_id(None) if device_id == "auto" else device_id
        self.pipe = self._iter = self.feed = None
        self._pulled = 0  # batches taken from the pipeline's endless stream

    def __len__(self):
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        if not self.indices:
            return
        if self._iter is None:
            self._start()
        for _ in range(-self._pulled % len(self)):  # an earlier loop stopped early: realign on a split's start
            self._next()
        for b in range(len(self)):
            batch = _batch(self._next())
            keep = min(self.batch_size, len(self.indices) - b * self.batch_size)
            # the repeated tail has the size of the last real image, so cutting it leaves the padding of the
            # real images alone
            yield batch if keep == self.batch_size else {k: v[:keep] for k, v in batch.items()}

    def _start(self):
        """(Re)build the pipeline so that its first batch is batch self._pulled of the endless stream."""
        self.close()
        self.feed = ReadAhead(EvalSampleReader(self.dataset, self.indices, self.batch_size, self._pulled),
                               self.batch_size, self.workers)
        self.pipe = eval_pipeline(self.feed, self.dataset, self.batch_size, self.workers, self.device_id)
        self._iter = DALIGenericIterator(self.pipe, OUTPUTS, prepare_first_batch=False)

    def _next(self):
        try:
            out = next(self._iter)[0]
        except StopIteration:
            raise
        except Exception as error:  # see DaliTrainLoader.__next__
            source = EvalSampleReader(self.dataset, self.indices, self.batch_size, self._pulled)
            diagnose(source, self.batch_size, self.dataset, error)
            self._start()
            return self._next()
        self._pulled += 1
        return out

    def close(self):
        if self.feed is not None:
            self.feed.close()
        self._iter = self.pipe = self.feed = None

    def __del__(self):
        self.close()
