"""Peak memory and median time of one loss call, forward and forward+backward, for the benchmarks that run each
provider in a fresh process (bench_pairwise.py, bench_upsampled_ce.py, bench_ads_memory.py).

CPU: the growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs after a warm-up)
over its resident size then; CUDA: torch.cuda's peak allocated bytes over those allocated before.
"""
import statistics
import time


def status_bytes(key):
    """A byte count from /proc/self/status (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def reset_peak_rss():
    """Linux: writing 5 to clear_refs resets the process's peak resident set (VmHWM) to its current size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(call, leaf, reps):
    """(forward s, forward+backward s, peak bytes, loss value) of `call()` (-> a scalar loss), medians of `reps`
    runs after one warm-up each; `leaf`'s .grad is cleared after every run."""
    import torch

    cuda = leaf.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(backward):
        out = []
        for _ in range(reps + 1):
            sync()
            t0 = time.perf_counter()
            loss = call()
            if backward:
                loss.backward()
            sync()
            out.append(time.perf_counter() - t0)
            leaf.grad = None
        return statistics.median(out[1:]), loss.item()

    timed(True)  # warm every kernel, BLAS and allocator path once before the peak is reset
    reset_peak_rss()
    base = status_bytes("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    fwd, loss = timed(False)
    fwd_bwd, _ = timed(True)
    peak = torch.cuda.max_memory_allocated() - base if cuda else status_bytes("VmHWM") - base
    return fwd, fwd_bwd, max(peak, 0), loss


def in_fresh_process(target, *args):
    """target(*args, queue) run in a spawned process (so that its peak memory is its own) -> what it put on queue."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, queue))
    p.start()
    result = queue.get()
    p.join()
    return result
