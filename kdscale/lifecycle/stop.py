"""One stop path for every signal.

SIGINT (Ctrl-C), SIGTERM (``scancel``, a launcher ending its ranks) and SIGUSR1 (a
preemption notice) only set a flag here; the training loop reads it at its next check,
every rank agrees on the same stop step (an all-reduce), writes a checkpoint, flushes
its trackers and exits. A second SIGINT exits at once; one that comes within
:data:`REPEAT_WINDOW_S` of the first is the same Ctrl-C forwarded by the launcher
(``accelerate launch`` passes it on to its ranks) and is ignored. The exit status says what
happened: 0 after SIGUSR1 (a preemption: the job may be requeued), 128 + the signal
number after SIGINT or SIGTERM (the run was interrupted, not finished).
"""

from __future__ import annotations

import os
import signal
import sys
import time

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
REPEAT_WINDOW_S = 2.0


class StopSignals:
    """Installs the handlers on enter (main thread only) and restores the old ones on exit."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.received: int | None = None
        self.received_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received else None

    def exit_code(self) -> int:
        """What the process should exit with after stopping for the received signal."""
        if self.received in (None, signal.SIGUSR1):
            return 0
        return 128 + int(self.received)

    def _handle(self, signum, _frame) -> None:
        now = time.monotonic()
        if self.received == signal.SIGINT and signum == signal.SIGINT and now - self.received_at > REPEAT_WINDOW_S:
            print(f"kdscale (rank {self.rank}): second SIGINT: exiting now without a checkpoint", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        if self.received is None:
            self.received, self.received_at = signum, now
            hint = " (Ctrl-C again to exit at once)" if signum == signal.SIGINT else ""
            print(f"kdscale (rank {self.rank}): {signal.Signals(signum).name} received: stopping at the next step "
                  f"with a checkpoint{hint}", file=sys.stderr, flush=True)
