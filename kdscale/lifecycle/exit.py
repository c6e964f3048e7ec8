"""Process exit without interpreter teardown, and the status a job reports.

A rank whose work is done must exit 0 every time. Under load, torch's static destructors
at interpreter shutdown sometimes find a thread still joinable and abort the process
("terminate called without an active exception", SIGABRT) after all the work was written:
seen here at the end of 2-rank ``kdscale.teach`` and of the engine probes. Entry points
therefore flush what they own (trackers and the process group, in their own ``finally``),
then flush the standard streams, end their helper processes
(:func:`kdscale.lifecycle.helpers.end_helpers`) and leave with ``os._exit``, which runs no
destructors.

Under kdscale's job launcher (:mod:`kdscale.lifecycle.launcher`, which sets
:data:`STATUS_DIR_ENV`) a rank also writes its status and the reason to that folder, and the
launcher gives the job that status. A stop every rank agreed on (0, 130, 143) then exits 0,
so that ``accelerate launch``'s agent ends quietly; any other status (a refused run 2, a
stall 3, a failure 1) waits up to :data:`KILL_WAIT_S` for the launcher to end the whole job
first, so that the agent never prints a traceback of its own.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable

from kdscale.errors import KdscaleError

STATUS_DIR_ENV = "KDSCALE_JOB_STATUS_DIR"
STOP_STATUSES = (0, 128 + signal.SIGINT, 128 + signal.SIGTERM)
KILL_WAIT_S = 30.0
_reason = [""]


def set_exit_reason(reason: str) -> None:
    """One line on why this process is about to end, for the job launcher's report."""
    _reason[0] = reason


def _rank() -> str:
    return os.environ.get("RANK", "0")


def register() -> None:
    """Under the job launcher: tell it this rank's pid (it forwards signals to the ranks) and
    record stop signals from the start (the launcher passes them on ignored)."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if not folder:
        return
    from kdscale.lifecycle.stop import record_early_signals

    record_early_signals()
    path = os.path.join(folder, f"rank{_rank()}.pid")
    with open(f"{path}.tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(f"{path}.tmp", path)


def report_and_exit(code: int, reason: str | None = None) -> None:
    """End the helpers, report the status to the job launcher if there is one, and exit."""
    from kdscale.lifecycle.helpers import end_helpers

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    end_helpers()
    folder = os.environ.get(STATUS_DIR_ENV)
    if folder and os.path.isdir(folder):
        path = os.path.join(folder, f"rank{_rank()}.json")
        try:
            with open(f"{path}.tmp", "w") as fh:
                json.dump({"rank": int(_rank()), "code": code, "reason": reason or _reason[0]}, fh)
            os.replace(f"{path}.tmp", path)
        except OSError:
            pass
        else:
            if code in STOP_STATUSES:
                os._exit(0)
            time.sleep(KILL_WAIT_S)  # the launcher ends the job (this process included) before then
    os._exit(code)


def run_then_exit(main: Callable[[], object]) -> None:
    """Run ``main`` and exit with its status (0, a ``SystemExit`` code, or 1 after printing
    the traceback of any other exception), skipping interpreter teardown."""
    register()
    from kdscale.lifecycle.helpers import start_multiprocessing_helpers

    start_multiprocessing_helpers(forkserver=False)  # the resource tracker, deaf to stop signals, before anyone else
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
            set_exit_reason(str(stop.code))
        elif isinstance(stop.__context__, KdscaleError):  # exit_on_user_error printed it as one line
            set_exit_reason(f"error: {stop.__context__}")
    except KeyboardInterrupt:
        code = 130
    except BaseException as err:  # noqa: BLE001 - reported, then the status says it failed
        traceback.print_exc()
        set_exit_reason(f"rank {_rank()} failed: {type(err).__name__}: {err}")
        code = 1
    report_and_exit(code)
