"""One job's lifecycle, for every long-running entry point (``kdscale.train``, ``kdscale.teach``).

A :class:`Job` owns, set up in this order on enter and taken down in reverse on exit:

1. the directory's lock, taken by rank 0 before anything heavy is imported, so a second job
   on the same directory is refused at once (:mod:`.run_lock`);
2. the stall watchdog, started before the process group, so a start-up that hangs or
   outlives its launcher ends too (:mod:`.watchdog`);
3. the process group (:class:`kdscale.parallel.context.DistContext`), through which every
   rank learns whether rank 0 got the lock;
4. the stop state (:class:`JobStop`): the stop signals, the preemption file, and the cause
   the ranks agreed on: one object instead of flags spread over the loop;
5. the run's tracker, once the job makes one (:meth:`Job.track`), flushed on exit (as failed
   when the job raised).

An entry point passes a ``Job`` in; a component built without one (a test building a
``Trainer`` directly) makes and enters its own, and leaves it in its ``close()``.
"""

from __future__ import annotations

import contextlib
import os

from kdscale.lifecycle.run_lock import RunLock, lock_for_ranks
from kdscale.lifecycle.stop import StopSignals, cause_name, preempt_file_path
from kdscale.lifecycle.watchdog import Watchdog


class JobStop:
    """Whether and why this job stops: this rank's own request (a stop signal, or the
    preemption file once looked for), the cause every rank agreed on, and whether the job's
    loop has stopped for it."""

    def __init__(self, signals: StopSignals, preempt_file: str | None):
        self.signals, self.preempt_file = signals, preempt_file
        self.file_seen = False
        self.acted = False
        """The loop stopped for the agreed cause (with a checkpoint, where it writes one)."""

    def look_for_file(self) -> bool:
        """Look for the preemption file (a file-system call: not at every step); seen stays seen."""
        if self.preempt_file and not self.file_seen:
            self.file_seen = os.path.exists(self.preempt_file)
        return self.file_seen

    @property
    def requested_here(self) -> bool:
        return self.signals.received is not None or self.file_seen

    def local_cause(self) -> int:
        """This rank's cause, as the index the ranks' agreement reduces with max."""
        return self.signals.local_cause(self.file_seen)

    def agree(self, index: int) -> None:
        self.signals.agree(index)

    @property
    def agreed(self) -> bool:
        return self.signals.agreed is not None

    @property
    def name(self) -> str | None:
        """This rank's own signal (SIGTERM, ...), or the agreed cause's name, or None."""
        return self.signals.name or (cause_name(self.signals.agreed) if self.agreed else None)

    def describe(self) -> str:
        return self.signals.describe()

    def exit_code(self) -> int:
        return self.signals.exit_code()


class Job:
    def __init__(self, directory: str, stall_timeout_s: float, timeout_s: int, preempt_file: str | None = None,
                 what: str = "run", lock_fix: str | None = None, from_start: bool = True):
        """``directory``: what the job writes and locks (a run directory, teacher outputs);
        ``what`` and ``lock_fix`` word the refusal a second job gets. ``from_start``: the
        watchdog and the stop signals cover the start-up too (an entry point); otherwise
        only :meth:`running` (a component made in a test or a benchmark, which leaves the
        process's own signal handlers alone while it is not running)."""
        self.directory, self.stall_timeout_s, self.timeout_s = directory, stall_timeout_s, timeout_s
        self.what, self.lock_fix, self.from_start = what, lock_fix, from_start
        rank = os.environ.get("RANK", "0")
        self.lock: RunLock | None = None
        self.watchdog = Watchdog(stall_timeout_s, rank)
        self.ctx = None
        self.stop = JobStop(StopSignals(int(rank)), preempt_file_path(preempt_file))
        self.tracker = None
        self._signals_on = False

    @classmethod
    def for_training(cls, cfg, from_start: bool = True) -> "Job":
        return cls(cfg.run_dir, cfg.train.stall_timeout_s, cfg.distributed.timeout_s, cfg.train.preempt_file,
                   from_start=from_start)

    @classmethod
    def for_teaching(cls, cfg, from_start: bool = True) -> "Job":
        return cls(cfg.only_teacher("kdscale.teach").outputs, cfg.train.stall_timeout_s, cfg.distributed.timeout_s, cfg.train.preempt_file,
                   what="kdscale.teach job", lock_fix="(a rerun continues its shards), or choose another teacher.outputs",
                   from_start=from_start)

    def __enter__(self) -> "Job":
        try:
            if os.environ.get("RANK", "0") == "0":
                extra = {"what": self.what, "fix": self.lock_fix} if self.lock_fix else {}
                self.lock = RunLock(self.directory).acquire(**extra)
            if self.from_start:
                self.watchdog.start()
            from kdscale.parallel.context import DistContext

            self.ctx = DistContext.from_env(self.timeout_s)
            self.watchdog.rank = self.stop.signals.rank = self.ctx.rank
            self.lock = lock_for_ranks(self.ctx, self.directory, self.lock)
            if self.from_start:
                self._signals_up()
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def _signals_up(self) -> None:
        self.stop.signals.__enter__()
        self._signals_on = True

    def _signals_down(self) -> None:
        if self._signals_on:
            self.stop.signals.__exit__(None, None, None)
            self._signals_on = False

    @contextlib.contextmanager
    def running(self):
        """The job's main loop: the watchdog runs and the stop signals are caught (already so
        since the start for an entry point's job; for the rest, only in here)."""
        started_here = not self.from_start
        if started_here:
            self.watchdog.progress()
            self.watchdog.start()
            self._signals_up()
        try:
            yield self
        finally:
            if started_here:
                self._signals_down()
                self.watchdog.stop()

    def track(self, tracker):
        """Hand the job the run's tracker: it is flushed when the job ends."""
        self.tracker = tracker
        return tracker

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def close(self, failed: bool = True) -> None:
        """End the job, in the reverse order of its start; safe to call more than once."""
        if self.tracker is not None:
            self.tracker.finish(failed=failed)  # a no-op after a clean finish
        self._signals_down()
        self.watchdog.stop()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.ctx is not None:
            self.ctx.shutdown()
        else:
            from kdscale.parallel.context import shutdown_process_group

            shutdown_process_group()
