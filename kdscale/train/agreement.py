"""What the ranks agree on at every micro-step: is the loss finite on every rank, and has any
rank been asked to stop (a signal, or the preemption file rank 0 saw)?

One all-reduce (max) of two flags per micro-step, after the forward. How soon its answer is
read depends on what hangs on it:

- ``train.nonfinite=skip``: the answer decides whether this micro-step's backward and
  optimizer step happen, so it is read at once (``immediate``): the host waits for the
  forward before it queues the backward.
- ``train.nonfinite=stop`` (the default): nothing that happens before the next micro-step
  needs it, so it is read one micro-step later (``deferred``). The all-reduce is started
  without waiting and, on a GPU, its result is copied to pinned host memory behind an event;
  the next micro-step reads it after queueing its own forward, so the host stays one
  micro-step ahead of the device instead of waiting at every one. A stop then takes effect
  one micro-step later, at the same micro-step on every rank. A non-finite loss still fails
  the run naming its own step; its optimizer step has been taken by then, so the loop reads
  the pending answer (:meth:`StepAgreement.settle`) before every checkpoint, log line,
  validation and export: nothing is written from weights a non-finite step touched.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Verdict:
    nonfinite: bool
    """Some rank's loss at that micro-step was NaN or infinite."""
    stop: int
    """The stop cause agreed on (0: none; see :mod:`kdscale.lifecycle.stop`)."""
    where: str
    """The micro-step it answers for, in words (given by the caller when it was asked)."""


class StepAgreement:
    def __init__(self, ctx, deferred: bool):
        self.ctx, self.deferred = ctx, deferred
        self._pending: tuple | None = None

    def exchange(self, loss: torch.Tensor, stop_cause: int, where: str) -> Verdict | None:
        """Start this micro-step's agreement; the verdict due now: this micro-step's
        (immediate), or the previous one's (deferred; None for the first)."""
        flags = torch.stack([(~torch.isfinite(loss.detach())).any().float(),
                             torch.full((), float(stop_cause), device=loss.device)]).to(self.ctx.device)
        if not self.deferred:
            self.ctx.all_reduce(flags, "max")
            nonfinite, stop = flags.tolist()
            return Verdict(nonfinite > 0, int(stop), where)
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True) if self.ctx.distributed else None
        event = None
        if flags.is_cuda:
            if work is not None:
                work.wait()  # on a GPU: the current stream waits for it, the host does not
                work = None
            flags = _pinned_copy(flags)
            event = torch.cuda.Event()
            event.record()
        previous, self._pending = self._pending, (work, event, flags, where)
        return _read(previous) if previous is not None else None

    def settle(self) -> Verdict | None:
        """The verdict not read yet (deferred), or None."""
        pending, self._pending = self._pending, None
        return _read(pending) if pending is not None else None


def _pinned_copy(flags: torch.Tensor) -> torch.Tensor:
    host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
    host.copy_(flags, non_blocking=True)
    return host


def _read(pending: tuple) -> Verdict:
    work, event, flags, where = pending
    if work is not None:
        work.wait()
    if event is not None:
        event.synchronize()
    nonfinite, stop = flags.tolist()
    return Verdict(nonfinite > 0, int(stop), where)
