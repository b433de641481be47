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
