"""A rank's helper processes: started deaf to the stop signals, ended before the rank exits.

A cluster ends a job by signalling *every* process of it (``scancel`` and the time limit
send SIGTERM to all of them; ``--signal=USR1`` without ``B:`` and a terminal's Ctrl-C
likewise). The rank stops cleanly on those signals (:mod:`kdscale.lifecycle.stop`), but its
helpers would die of them: a loader worker (the rank then fails with "DataLoader worker
exited unexpectedly"), the loader's forkserver, multiprocessing's resource tracker (which
ignores SIGINT and SIGTERM but dies of SIGUSR1, and its ``KeyError: '/mp-...'`` tracebacks
follow) and wandb's service (the final flush then raises ``ConnectionResetError``).

:func:`without_stop_signals` starts helpers with SIGINT, SIGTERM and SIGUSR1 *blocked* in
the starting thread. A child inherits the blocked mask through fork and exec (Python and
Go runtimes leave these signals blocked), so the helper never receives them; the rank
itself loses nothing: a stop signal that arrives meanwhile stays pending, or is taken by
another of the rank's threads, and its handler runs as usual.

The rank ends its helpers itself (:func:`end_helpers`, from the exit path and the stall
watchdog): SIGKILL to every descendant but the resource tracker, which is woken (SIGCONT)
and left to clean up and exit once its pipe closes. SIGKILL reaches stopped processes too,
so a worker frozen with SIGSTOP does not outlive its job.
"""

from __future__ import annotations

import contextlib
import os
import signal

from kdscale.lifecycle.stop import STOP_SIGNALS


@contextlib.contextmanager
def without_stop_signals():
    """Block the stop signals in this thread while helpers start (they inherit the mask)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_multiprocessing_helpers(forkserver: bool = True) -> None:
    """Start multiprocessing's resource tracker (and the forkserver) deaf to stop signals, now
    rather than lazily at the first worker's start."""
    from multiprocessing import forkserver as mp_forkserver
    from multiprocessing import resource_tracker

    with without_stop_signals():
        resource_tracker.ensure_running()
        # Starting the tracker unblocks SIGINT and SIGTERM in this thread again (it blocks and
        # unblocks them around its own start): block them anew before the forkserver starts.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if forkserver:
            mp_forkserver.ensure_running()


def _children_table() -> dict[int, list[int]]:
    table: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        table.setdefault(int(fields[1]), []).append(int(entry))
    return table


def descendants(pid: int | None = None) -> list[int]:
    """Every live descendant of ``pid`` (default: this process), from /proc."""
    if not os.path.isdir("/proc"):
        return []
    table = _children_table()
    found, frontier = [], [pid or os.getpid()]
    while frontier:
        for child in table.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child)
    return found


def _resource_tracker_pid() -> int | None:
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None)


def end_helpers() -> None:
    """SIGKILL every descendant but the resource tracker (woken, it exits by itself once this
    process's end closes its pipe, cleaning up what the workers left)."""
    tracker = _resource_tracker_pid()
    for pid in descendants():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGCONT if pid == tracker else signal.SIGKILL)
