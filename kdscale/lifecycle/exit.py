"""Process exit without interpreter teardown.

A rank whose work is done must exit 0 every time. Under load, torch's static destructors
at interpreter shutdown sometimes find a thread still joinable and abort the process
("terminate called without an active exception", SIGABRT) after all the work was written:
seen here at the end of 2-rank ``kdscale.teach`` and of the engine probes. Entry points
therefore flush what they own (trackers and the process group, in their own ``finally``),
then flush the standard streams and leave with ``os._exit``, which runs no destructors.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable


def run_then_exit(main: Callable[[], object]) -> None:
    """Run ``main`` and exit with its status (0, a ``SystemExit`` code, or 1 after printing
    the traceback of any other exception), skipping interpreter teardown."""
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - reported, then the status says it failed
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
