"""The loss terms of the training loop, accumulated on the device between log lines, and the non-finite check.

The loop adds each step's terms without a host sync; at a log line or before a checkpoint `reduce` makes the
one sync: the mean of every term over the interval and the ranks, or a NonFiniteLossError that names the first
iteration and the terms that went non-finite.
"""

import torch

from engine import dist
from engine.checkpoint import kept_note
from engine.errors import NonFiniteError


class NonFiniteLossError(NonFiniteError):
    pass


class TermMeter:
    def __init__(self, device, start_iter):
        self.device = device
        self.names, self.sums, self.bad_terms, self.last = None, None, None, None
        self.count = 0
        self.bad_iter = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite iteration (1-based)
        self.iteration = torch.full((), start_iter, dtype=torch.int64, device=device)  # kept on the device

    def add(self, terms):
        """One step's {name: detached scalar}, the same names every step."""
        self.iteration += 1
        vals = torch.stack(list(terms.values()))
        if self.names is None:
            self.names = list(terms)
            self.sums = torch.zeros_like(vals)
            self.bad_terms = torch.zeros(len(self.names), dtype=torch.bool, device=self.device)
        self.sums += vals
        self.count += 1
        finite = torch.isfinite(vals)
        newly = (self.bad_iter < 0) & ~finite.all()
        self.bad_iter = torch.where(newly, self.iteration, self.bad_iter)
        self.bad_terms = torch.where(newly, ~finite, self.bad_terms)
        self.last = vals

    def reduce(self, loss_names, world_size, out):
        """One host sync -> {"loss": sum of the means of loss_names, "terms": {name: mean}}, means over the
        interval and the ranks; then the interval starts again. Raises NonFiniteLossError on a non-finite term
        (`out`: the run directory, whose last.pt the message says is intact or absent)."""
        n, names = len(self.names), self.names
        packed = torch.cat([self.sums, self.bad_terms.float(), (self.bad_iter >= 0).float()[None]])
        dist.all_reduce_sum(packed)
        first_bad = torch.where(self.bad_iter >= 0, self.bad_iter, torch.full_like(self.bad_iter, 2**62))
        if world_size > 1:
            torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
        host = packed.tolist()
        if host[-1] > 0:
            bad = [names[i] for i in range(n) if host[n + i] > 0]
            values = ", ".join(f"{k}={v:.4g}" for k, v in zip(names, self.last.tolist()))
            raise NonFiniteLossError(
                f"non-finite loss at iteration {int(first_bad)}: term(s) {', '.join(bad)} "
                f"(values at the latest step: {values}). "
                f"Training stopped; {kept_note(out)}. Try a lower --lr, check the data, or run with --precision fp32.")
        means = [v / (self.count * world_size) for v in host[:n]]
        self.sums.zero_()
        self.count = 0
        return {"loss": sum(m for k, m in zip(names, means) if k in loss_names), "terms": dict(zip(names, means))}
