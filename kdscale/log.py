"""kdscale's run log: one ``logging`` logger, ``kdscale``, rank 0 only.

Every line a run writes about itself goes through :data:`log`, prefixed ``kdscale:``
(``kdscale: warning:`` for warnings): progress on stdout, warnings and errors on stderr.
Only rank 0's records are written, so N processes do not print N copies; a record that
concerns one rank (a failure, a worker's skipped sample) passes with ``extra=EVERY_RANK``,
as does anything at ERROR.

A job's processes (:func:`one_voice`, called first by ``kdscale.train`` and ``kdscale.teach``)
also send Python warnings through this logger, so N ranks print one copy, and keep the
libraries' own chatter (DeepSpeed's logger and its build notice, torch's CUDA lookup) to
rank 0; importing kdscale as a library changes neither.

Left as plain writes to stderr, by design: what signal handlers and the stall watchdog
print (they must not wait on a lock that the interrupted code may hold) and the one-line
user errors of the command-line entry points (:mod:`kdscale.errors`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

log = logging.getLogger("kdscale")
EVERY_RANK = {"every_rank": True}


class RankZeroFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.ERROR or getattr(record, "every_rank", False)


class PrefixFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        kind = "warning: " if record.levelno == logging.WARNING else ""
        return f"kdscale: {kind}{record.getMessage()}"


class StdoutHandler(logging.StreamHandler):
    """Progress to ``sys.stdout``, warnings and errors to ``sys.stderr``, whatever they are at
    the time (pytest and notebooks replace them)."""

    def emit(self, record: logging.LogRecord) -> None:
        self._current = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        super().emit(record)

    @property
    def stream(self):
        return getattr(self, "_current", sys.stdout)

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(rank: int | None = None) -> logging.Logger:
    """Send kdscale's records to stdout/stderr, rank 0's only (``rank`` defaults to ``$RANK``).
    Idempotent: a later call updates the rank."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    handler = next((h for h in log.handlers if isinstance(h, StdoutHandler)), None)
    if handler is None:
        handler = StdoutHandler()
        handler.setFormatter(PrefixFormatter())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    handler.filters = [RankZeroFilter(rank)]
    return log


def _warning_to_log(message, category, filename, lineno, file=None, line=None) -> None:
    log.warning(f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})")


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


LIBRARY_LOGGERS = ("DeepSpeed", "torch.utils.cpp_extension", "accelerate")
"""Loggers whose warnings every rank would print alike: errors only on ranks other than 0."""


def one_voice(rank: int | None = None) -> None:
    """Make a job's N processes print one copy of what they all say: Python warnings go
    through :data:`log` (rank 0's only, ``kdscale: warning: UserWarning: ... (file:line)``),
    and :data:`LIBRARY_LOGGERS` keep errors only on the other ranks. Called before the
    heavy imports (DeepSpeed warns while it is imported); ``rank`` defaults to ``$RANK``.
    A record about one rank still passes with ``extra=EVERY_RANK``."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    setup_logging(rank)
    warnings.showwarning = _warning_to_log
    if rank != 0:
        for name in LIBRARY_LOGGERS:  # a logger's filter outlives the library's own set-up of it
            logger = logging.getLogger(name)
            if not any(isinstance(f, _ErrorsOnly) for f in logger.filters):
                logger.addFilter(_ErrorsOnly())


setup_logging()  # on import: a rank's records are formatted and filtered even before a trainer exists


def human_bytes(count: float, digits: int = 1) -> str:
    """A byte count for a log line in binary units: ``512 B``, ``17.0 KiB``, ``6.13 TiB``
    (``digits`` after the point above bytes)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.{digits}f} {unit}"
        count /= 1024
    return f"{count:.{digits}f} TiB"
