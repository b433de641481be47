"""engine/prefetch.py: DevicePrefetcher keeps the order and reads ahead only when asked."""
import pytest
import torch

from engine.prefetch import DevicePrefetcher


class Counting:
    def __init__(self, n):
        self.n, self.taken = n, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.taken == self.n:
            raise StopIteration
        self.taken += 1
        return {"image": torch.full((1, 3, 2, 2), float(self.taken)), "index": self.taken}


@pytest.mark.parametrize("ahead", [True, False])
def test_prefetcher_keeps_order_and_reads_ahead_only_when_asked(ahead):
    source = Counting(4)
    pre = DevicePrefetcher(source, torch.device("cpu"), channels_last=True, ahead=ahead)
    first = next(pre)
    assert source.taken == (2 if ahead else 1)
    assert first["index"] == 1 and first["image"].is_contiguous(memory_format=torch.channels_last)
    assert [b["index"] for b in pre] == [2, 3, 4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the streams are CUDA streams")
def test_a_batch_written_on_the_compute_stream_is_never_read_stale():
    """A loader that writes its CUDA batch on the compute stream (as DALI's GPU pipeline does), slowly: the
    prefetcher's channels-last copy on its side stream must see the finished values, not the buffer's old ones."""
    dev = torch.device("cuda")
    big = torch.randn(4096, 4096, device=dev)

    def batches():
        for value in range(1, 6):
            image = torch.zeros(8, 3, 64, 64, device=dev)
            for _ in range(8):  # keep the compute stream busy before the batch gets its values
                big.matmul(big)
            image.fill_(float(value))
            yield {"image": image}

    pre = DevicePrefetcher(batches(), dev, channels_last=True, ahead=True)
    for value, batch in enumerate(pre, start=1):
        assert batch["image"].is_contiguous(memory_format=torch.channels_last)
        assert torch.all(batch["image"] == value), f"batch {value} was read before it was written"
