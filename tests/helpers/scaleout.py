"""Launch kdscale's probes (``python -m kdscale.probes``, :mod:`kdscale.probes`) as real processes: one
rank as a plain ``python``, more through ``launch/accelerate.sh`` (gloo on CPU). The scale-out
tests read what it wrote: one dict per rank.

A launch costs seconds of process start-up (imports, the process group) and a probe case a
fraction of that, so :func:`run_probes` runs several cases in one launch per rank count."""

from __future__ import annotations

import hashlib
import json
import os

from helpers.common import PYTHON, ROOT, run_cli

PROBES = ["-m", "kdscale.probes"]
ACCELERATE = os.path.join(ROOT, "launch", "accelerate.sh")


def _launch(folder, ranks: int, args: list[str], name: str):
    out = folder / f"{name.replace('=', '_')}-{ranks}.json"
    command = ([PYTHON, *PROBES] if ranks == 1 else ["bash", ACCELERATE, *PROBES]) + [str(out), *args]
    result = run_cli(command, env_extra={"KDSCALE_CPU_PROCS": str(ranks)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out) as fh:
        return json.load(fh)


def run_probe(folder, ranks: int, *args: str) -> list[dict]:
    """``python -m kdscale.probes OUT *args`` on ``ranks`` processes (``args``: ``train <strategy> <method>
    [key=value ...]`` or ``teacher``); the run must succeed. One dict per rank."""
    return _launch(folder, ranks, list(args), "-".join(args))


def run_probes(folder, ranks: int, *cases: tuple[str, ...]) -> list[list[dict]]:
    """Several probe cases (each as ``args`` of :func:`run_probe`) one after the other in one
    launch on ``ranks`` processes: per case, one dict per rank."""
    args = [arg for i, case in enumerate(cases) for arg in ((["+"] if i else []) + list(case))]
    name = f"{len(cases)}-cases-{hashlib.sha1(repr(cases).encode()).hexdigest()[:12]}"
    results = _launch(folder, ranks, args, name)
    return results if len(cases) > 1 else [results]
