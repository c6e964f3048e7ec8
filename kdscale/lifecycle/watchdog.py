"""A run ends instead of hanging.

:class:`Watchdog` runs a daemon thread per process:
- **stall**: when no progress (an optimizer step, a validation, a checkpoint write) has
  been reported for ``stall_timeout_s``, it prints what the process was waiting for
  (data, the step's collectives, the teacher, ...), dumps every thread's Python stack
  (faulthandler) and exits with :data:`STALL_EXIT_CODE`, so the launcher ends the job;
- **launcher death**: a rank started by a launcher (``LOCAL_RANK`` set) whose parent
  dies (kill -9 of ``accelerate launch``) is re-parented; the watchdog sees that, sends
  itself SIGTERM (the normal stop path: a checkpoint where the run can still make one)
  and exits outright :data:`PARENT_GRACE_S` seconds later if still alive, also during
  start-up, when no stop path is installed yet.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time

from kdscale.lifecycle.exit import report_and_exit

STALL_EXIT_CODE = 3
PARENT_EXIT_CODE = 4
PARENT_GRACE_S = 30.0


class Watchdog:
    def __init__(self, stall_timeout_s: float, rank: int | str = "?", watch_parent: bool | None = None):
        self.stall_timeout_s = stall_timeout_s
        self.rank = rank
        self.activity = "starting up"
        self.last_progress = time.monotonic()
        self.parent = os.getppid()
        if watch_parent is None:
            watch_parent = "LOCAL_RANK" in os.environ and self.parent != 1
        self.watch_parent = watch_parent
        self._orphaned_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdscale-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def progress(self) -> None:
        """Something finished: an optimizer step, a validation, a checkpoint."""
        self.last_progress = time.monotonic()

    @contextlib.contextmanager
    def waiting(self, activity: str):
        """Name what the process waits for while inside (shown if it stalls there)."""
        previous, self.activity = self.activity, activity
        try:
            yield
        finally:
            self.activity = previous

    def _run(self) -> None:
        period = max(0.2, min(2.0, self.stall_timeout_s / 10))
        while not self._stop.wait(period):
            now = time.monotonic()
            if self.watch_parent:
                self._check_parent(now)
            if now - self.last_progress > self.stall_timeout_s:
                self._stalled(now)

    def _check_parent(self, now: float) -> None:
        if self._orphaned_at is None and os.getppid() != self.parent:
            self._orphaned_at = now
            print(f"kdscale (rank {self.rank}): the launcher (pid {self.parent}) is gone: stopping", file=sys.stderr,
                  flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        elif self._orphaned_at is not None and now - self._orphaned_at > PARENT_GRACE_S:
            print(f"kdscale (rank {self.rank}): still running {PARENT_GRACE_S:.0f} s after the launcher died "
                  f"(while {self.activity}): exiting", file=sys.stderr, flush=True)
            report_and_exit(PARENT_EXIT_CODE, f"rank {self.rank}: the launcher died")

    def _stalled(self, now: float) -> None:
        print(f"kdscale (rank {self.rank}): stalled: nothing finished for {now - self.last_progress:.0f} s "
              f"(train.stall_timeout_s={self.stall_timeout_s:g}) while {self.activity}; the stack of every thread "
              f"follows; exiting with status {STALL_EXIT_CODE} so that the launcher ends the job",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        report_and_exit(STALL_EXIT_CODE, f"rank {self.rank} stalled while {self.activity} "
                                         f"(train.stall_timeout_s={self.stall_timeout_s:g})")
