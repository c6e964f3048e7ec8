"""User-facing errors.

Anything a user can fix (a bad config key, a missing file, a wrong model name) is raised
as :class:`KdscaleError`. Entry points catch it with :func:`exit_on_user_error` and print
one line naming the file, key or shard and the fix, then exit non-zero instead of
showing a traceback. Genuine bugs still raise their normal tracebacks.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

USER_ERROR_EXIT_CODE = 2


class KdscaleError(Exception):
    """An error caused by input the user can correct; its message says how."""


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn a :class:`KdscaleError` into a one-line message and exit code 2."""
    try:
        yield
    except KdscaleError as err:
        rank = os.environ.get("RANK")
        prefix = f"kdscale (rank {rank})" if rank not in (None, "0") else "kdscale"
        print(f"{prefix}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None
