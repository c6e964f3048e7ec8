"""Bad samples: what the loaders skip (a damaged image, a missing label), name once and count."""

from __future__ import annotations

from kdscale.errors import KdscaleError
from kdscale.log import EVERY_RANK, log

DECODE_ERRORS = (OSError, ValueError, SyntaxError)  # what PIL raises on damaged images


class BadSample(Exception):
    """A sample that cannot be used; skipped and counted, not fatal."""


class BadSampleLog:
    """Bad samples of one loader worker: each is named in a warning the first time it is
    seen, counted once per epoch (a worker may cycle over its shards more than once), and
    the run stops with a clear error past ``limit`` distinct bad samples."""

    def __init__(self, limit: int):
        self.limit = limit
        self.seen: set[str] = set()
        self.seen_this_epoch: set[str] = set()
        self.pending = 0

    @property
    def count(self) -> int:
        return len(self.seen)

    def new_epoch(self) -> None:
        self.seen_this_epoch = set()

    def take(self) -> int:
        """Bad samples found since the last call (for the batch being made)."""
        pending, self.pending = self.pending, 0
        return pending

    def skip(self, what: str) -> None:
        if what in self.seen_this_epoch:
            return
        self.seen_this_epoch.add(what)
        self.pending += 1
        if what in self.seen:
            return
        self.seen.add(what)
        log.warning(f"skipped {what} ({self.count} skipped by this loader worker)", extra=EVERY_RANK)
        if self.count > self.limit:
            raise KdscaleError(f"more than data.max_bad_samples={self.limit} bad samples in one loader worker "
                               f"(last: {what}); check the shards with `kdscale shards verify`, or raise "
                               f"data.max_bad_samples")
