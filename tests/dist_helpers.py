"""Launch kdscale's engine probe (``kdscale/bench/engine_probe.py``) as real processes: one
rank as a plain ``python``, more through ``launch/accelerate.sh`` (gloo on CPU). The scale-out
tests (``test_zero.py``, ``test_feature_methods.py``, ``test_logit_methods.py``) read what it
wrote: one dict per rank."""

from __future__ import annotations

import json
import os

from conftest import PYTHON, ROOT, run_cli

WORKER = os.path.join(ROOT, "kdscale", "bench", "engine_probe.py")
ACCELERATE = os.path.join(ROOT, "launch", "accelerate.sh")


def run_probe(folder, ranks: int, *args: str) -> list[dict]:
    """``engine_probe.py OUT *args`` on ``ranks`` processes (``args``: ``train <strategy> <method>
    [key=value ...]`` or ``teacher``); the run must succeed."""
    out = folder / f"{'-'.join(args).replace('=', '_')}-{ranks}.json"
    command = ([PYTHON, WORKER] if ranks == 1 else ["bash", ACCELERATE, WORKER]) + [str(out), *args]
    result = run_cli(command, env_extra={"KDSCALE_CPU_PROCS": str(ranks)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out) as fh:
        return json.load(fh)
