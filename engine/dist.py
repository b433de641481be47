"""Distributed setup, detected from the torchrun environment (NCCL on CUDA, gloo on CPU).

Elastic restarts (torchrun --max-restarts=N): after a rank dies, torchrun starts the whole group again on the
same rendezvous store, which still holds the first attempt's keys. gloo's full-mesh connect can read a dead
rank's address from them and fail with "Connection refused" (2 of 3 restarts here with a plain init, 3 of 6 in
the issue's tries, on this torch). So each attempt's process group lives under a key prefix of its own (the
restart count), and collectives time out after $SEGKD_DIST_TIMEOUT seconds (default 1800, torch's) so a peer
that is gone ends the attempt instead of hanging it.
"""
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def init_distributed(device="auto"):
    """Read RANK/WORLD_SIZE/LOCAL_RANK set by torchrun; a plain `python` run is world size 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device!r} is not one of auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available on this machine (use --device cpu or auto)")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # N processes on one machine: share the cores, don't oversubscribe
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        init_process_group("nccl" if use_cuda else "gloo", rank, world)
    return DistEnv(rank, world, local, dev)


def init_process_group(backend, rank, world):
    try:
        timeout = timedelta(seconds=float(os.environ.get("SEGKD_DIST_TIMEOUT", "1800")))
    except ValueError:
        raise ValueError(f"$SEGKD_DIST_TIMEOUT must be a number of seconds, got "
                         f"{os.environ['SEGKD_DIST_TIMEOUT']!r}") from None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, timeout=timeout)
        return
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts the store
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timeout,
                          **({} if agent_store else {"multi_tenant": True}))
    dist.init_process_group(backend, store=dist.PrefixStore(f"segkd/attempt_{attempt}", store), rank=rank,
                            world_size=world, timeout=timeout)


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t):
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src=0):
    """The object of rank `src` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
