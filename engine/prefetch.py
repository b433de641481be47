"""Training batches onto the device, one iteration ahead: the last stage between the loader and the step."""
import torch

from engine.memory_format import images_to


class DevicePrefetcher:
    """Batches on the device, one iteration ahead when `ahead`.

    On CUDA the host-to-device copy of batch n+1 is issued on a side stream (non-blocking, from the loader's
    pinned memory) while step n runs; the compute stream waits for it only when it takes the batch. A loader
    that hands over CUDA tensors (DALI's GPU pipeline) wrote them on the compute stream, so the side stream first
    waits for what the compute stream has queued until then; tensors the side stream makes are recorded on the
    compute stream that uses them, and the loader's CUDA tensors on the side stream that reads them, so the
    allocator reuses no memory before its last reader is done. On CPU
    it only moves tensors (a no-op): the DataLoader's workers already prefetch. ahead=False for a source
    whose next batch depends on the step before it (dfad's generator).
    """

    def __init__(self, batches, device, channels_last=False, ahead=True):
        self.batches, self.device, self.channels_last, self.ahead = batches, device, channels_last, ahead
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and ahead else None
        self.next = self._load() if ahead else None

    def _to_device(self, batch):
        out = {}
        for k, v in batch.items():
            if torch.is_tensor(v):
                if v.is_cuda and self.stream is not None:
                    v.record_stream(self.stream)  # read here, freed by the loader: not reusable before that read
                v = v.to(self.device, non_blocking=True)
                if k == "image":
                    v = images_to(v, self.channels_last)
            out[k] = v
        return out

    def _load(self):
        batch = next(self.batches, None)
        if batch is None:
            return None
        if self.stream is None:
            return self._to_device(batch)
        self.stream.wait_stream(torch.cuda.current_stream())  # a CUDA batch may still be being written there
        with torch.cuda.stream(self.stream):
            return self._to_device(batch)

    def __iter__(self):
        return self

    def __next__(self):
        if not self.ahead:
            batch = self._load()
            if batch is None:
                raise StopIteration
            return batch
        if self.next is None:
            raise StopIteration
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
            for v in self.next.values():
                if torch.is_tensor(v) and v.is_cuda:
                    v.record_stream(torch.cuda.current_stream())  # the side stream's allocator may not reuse it early
        batch, self.next = self.next, self._load()
        return batch
