"""One owner per run directory: an OS file lock on ``<run>/.lock``, held by rank 0 for the
whole run. A second job on the same directory is refused at once with one line naming
the holder. The lock is the kernel's (``flock``): it ends with the process, even after
kill -9, so no stale lock is ever left behind; the file's text only names the holder.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

from kdscale.errors import KdscaleError

LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fh = None

    def acquire(self, what: str = "run", fix: str = "(it resumes from its last checkpoint), or choose another "
                                                        "experiment.name") -> "RunLock":
        """Take the lock or raise :class:`KdscaleError` naming its holder (``fix``: what to do)."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = _describe(fh.read())
            fh.close()
            run_dir = os.path.dirname(self.path)
            raise KdscaleError(f"{run_dir} is in use by another {what} ({holder}); wait for it to end or stop it "
                               f"{fix}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": datetime.datetime.now().isoformat(timespec="seconds")}))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def lock_for_ranks(ctx, run_dir: str, held: RunLock | None = None, **acquire) -> RunLock | None:
    """Rank 0 takes ``run_dir``'s lock (unless it already ``held`` it) and every rank of
    ``ctx`` learns whether it did: rank 0 raises the refusal, the others exit quietly with
    the same status."""
    import torch

    lock, refusal = held, None
    if ctx.is_main and lock is None:
        try:
            lock = RunLock(run_dir).acquire(**acquire)
        except KdscaleError as err:
            refusal = err
    held = torch.tensor([0.0 if refusal else 1.0], device=ctx.device)
    ctx.broadcast(held, src=0)
    if refusal is not None:
        raise refusal
    if held.item() == 0:
        raise SystemExit(2)  # rank 0 says why
    return lock
