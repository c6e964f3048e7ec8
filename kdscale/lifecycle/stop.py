"""One stop path for every signal.

SIGINT (Ctrl-C), SIGTERM (``scancel``, a launcher ending its ranks) and SIGUSR1 (a
preemption notice) only set a flag here; the training loop reads it at its next check,
every rank agrees on the same stop step (an all-reduce), writes a checkpoint, flushes
its trackers and exits. A second SIGINT exits at once; one that comes within
:data:`REPEAT_WINDOW_S` of the first is the same Ctrl-C forwarded by the launcher
(``accelerate launch`` passes it on to its ranks) and is ignored. The exit status says what
happened: 0 after SIGUSR1 (a preemption: the job may be requeued), 128 + the signal
number after SIGINT or SIGTERM (the run was interrupted, not finished). Ranks agree on the
cause too (:data:`CAUSES`): a rank that got no signal itself exits with its peer's status.
"""

from __future__ import annotations

import os
import signal
import sys
import time

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
REPEAT_WINDOW_S = 2.0
# What a rank puts into the stop agreement (an all-reduce with max): the strongest cause of
# any rank wins, so every rank stops for the same reason and exits with the same status.
CAUSES = (None, "preemption file", signal.SIGUSR1, signal.SIGINT, signal.SIGTERM)


def cause_name(cause) -> str:
    return cause.name if isinstance(cause, signal.Signals) else str(cause)


def exit_code_for(cause) -> int:
    """0 for a preemption (the file, or SIGUSR1: the job may be requeued), 128 + N for
    SIGINT or SIGTERM (interrupted, not finished)."""
    if cause in (None, "preemption file", signal.SIGUSR1):
        return 0
    return 128 + int(cause)


_early: list[tuple[int, float]] = []


def record_early_signals() -> None:
    """From process start until a :class:`StopSignals` is entered, record the stop signals
    instead of dying of them (used under kdscale's job launcher, whose launcher process
    ignores them and so passes them on ignored): the run then stops at its first step."""
    def record(signum, _frame) -> None:
        if not _early:
            _early.append((signum, time.monotonic()))
            print(f"kdscale: {signal.Signals(signum).name} received during start-up: stopping at the first step",
                  file=sys.stderr, flush=True)
    for signum in STOP_SIGNALS:
        signal.signal(signum, record)


class StopSignals:
    """Installs the handlers on enter (main thread only) and restores the old ones on exit."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.received: int | None = None
        self.received_at = 0.0
        self.agreed = None
        """The cause every rank agreed on (:meth:`agree`): a signal, ``"preemption file"``, or None."""
        self._previous: dict[int, object] = {}

    def local_cause(self, preempt_file_seen: bool = False) -> int:
        """This rank's cause as an index into :data:`CAUSES` (0: none), for the agreement."""
        if self.received is not None:
            return CAUSES.index(signal.Signals(self.received))
        return 1 if preempt_file_seen else 0

    def agree(self, index: int) -> None:
        """Record the agreed cause (the maximum of every rank's :meth:`local_cause`); kept once set."""
        if self.agreed is None and index > 0:
            self.agreed = CAUSES[int(index)]

    def describe(self) -> str:
        """Why this rank stopped, in words: its own signal, or another rank's cause."""
        if self.received is not None:
            return f"{self.name} received"
        if self.agreed is None:
            return "stopped"
        if self.agreed == "preemption file":
            return "the preemption file was seen"
        return f"{cause_name(self.agreed)} received by another rank"

    def __enter__(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        if _early and self.received is None:
            self.received, self.received_at = _early[0]
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received else None

    @property
    def cause(self):
        """This rank's own signal, else the agreed cause."""
        return signal.Signals(self.received) if self.received is not None else self.agreed

    def exit_code(self) -> int:
        """What the process should exit with after stopping: for its own signal, else for the
        cause the ranks agreed on (a rank stopped by a peer exits as that peer does)."""
        return exit_code_for(self.cause)

    def _handle(self, signum, _frame) -> None:
        now = time.monotonic()
        if self.received == signal.SIGINT and signum == signal.SIGINT and now - self.received_at > REPEAT_WINDOW_S:
            print(f"kdscale (rank {self.rank}): second SIGINT: exiting now without a checkpoint", file=sys.stderr,
                  flush=True)
            from kdscale.lifecycle.exit import report_and_exit

            report_and_exit(128 + signum, "a second SIGINT: exited without a checkpoint")
        if self.received is None:
            self.received, self.received_at = signum, now
            hint = " (Ctrl-C again to exit at once)" if signum == signal.SIGINT else ""
            print(f"kdscale (rank {self.rank}): {signal.Signals(signum).name} received: stopping at the next step "
                  f"with a checkpoint{hint}", file=sys.stderr, flush=True)


PREEMPT_FILE_ENV = "KDSCALE_PREEMPT_FILE"


def preempt_file_path(configured: str | None) -> str | None:
    """The preemption file a job watches: ``train.preempt_file``, else ``$KDSCALE_PREEMPT_FILE``
    (set by ``slurm/launch.sh``), else none. Training and ``kdscale.teach`` both read it here."""
    return configured or os.environ.get(PREEMPT_FILE_ENV) or None
