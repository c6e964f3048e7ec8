"""A failure on purpose, for the fault tests: ``KDSCALE_FAIL_AT_STEP=N`` with
``KDSCALE_FAIL_RANK=R`` makes rank R raise right after its optimizer step N. Read once, when
the trainer is built; unset, it costs one integer comparison per step."""

from __future__ import annotations

import os


class InjectedFailure:
    def __init__(self, environ=os.environ):
        self.step = int(environ.get("KDSCALE_FAIL_AT_STEP", "-1"))
        self.rank = int(environ.get("KDSCALE_FAIL_RANK", "-1"))

    def check(self, step: int, rank: int) -> None:
        if step == self.step and rank == self.rank:
            raise RuntimeError(f"injected failure at step {step} (KDSCALE_FAIL_AT_STEP)")
