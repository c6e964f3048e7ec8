"""Launch kdscale's probes (``python -m kdscale.probes``, :mod:`kdscale.probes`) as real processes: one
rank as a plain ``python``, more through ``launch/accelerate.sh`` (gloo on CPU). The scale-out
tests read what it wrote: one dict per rank.

A launch costs seconds of process start-up (imports, the process group) and a probe case a
fraction of that, so :func:`run_probes` runs several cases in one launch per rank count,
and the suite's probe cases are pooled: each test module declares its cases when it is
imported (:func:`declare`), and the session's ``probes`` fixture (:class:`ProbePool`) runs
every declared case of a rank count in one launch, the first time a test asks for one."""

from __future__ import annotations

import hashlib
import json
import os

from helpers.common import PYTHON, ROOT, run_cli

PROBES = ["-m", "kdscale.probes"]
ACCELERATE = os.path.join(ROOT, "launch", "accelerate.sh")


def _launch(folder, ranks: int, args: list[str], name: str, timeout: int = 300):
    out = folder / f"{name.replace('=', '_')}-{ranks}.json"
    command = ([PYTHON, *PROBES] if ranks == 1 else ["bash", ACCELERATE, *PROBES]) + [str(out), *args]
    result = run_cli(command, env_extra={"KDSCALE_CPU_PROCS": str(ranks)}, timeout=timeout)
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
    results = _launch(folder, ranks, args, name, timeout=240 + 30 * len(cases))
    return results if len(cases) > 1 else [results]


_DECLARED: dict[int, list[tuple[str, ...]]] = {}


def declare(ranks, *cases: tuple[str, ...]) -> None:
    """Cases (each as ``args`` of :func:`run_probe`) that tests will ask the ``probes`` fixture
    for on each of ``ranks`` (an int or several); called at a test module's import."""
    for count in (ranks,) if isinstance(ranks, int) else ranks:
        pooled = _DECLARED.setdefault(count, [])
        pooled += [tuple(case) for case in cases if tuple(case) not in pooled]


class ProbePool:
    """The session's probe results: on the first request for a rank count, every case declared
    for it runs in one launch; a case not declared is an error in the test, not a new launch."""

    def __init__(self, folder):
        self.folder, self.done = folder, {}

    def __call__(self, ranks: int, *case: str) -> list[dict]:
        """One dict per rank for ``case`` on ``ranks`` processes."""
        if tuple(case) not in _DECLARED.get(ranks, []):
            raise AssertionError(f"probe case {case} on {ranks} rank(s) is not declared (helpers.scaleout.declare)")
        if ranks not in self.done:
            cases = list(_DECLARED[ranks])
            self.done[ranks] = dict(zip(cases, run_probes(self.folder, ranks, *cases), strict=True))
        return self.done[ranks][tuple(case)]


def assert_two_ranks_train_as_one(one: dict, two: list[dict]) -> None:
    """A ``train`` probe on 2 ranks equals it on 1 rank: the same 5 global losses (which fall),
    the same student on both ranks, and the 1-rank student's weights."""
    import pytest
    import torch

    assert len(one["losses"]) == len(two[0]["losses"]) == 5
    for a, b in zip(one["losses"], two[0]["losses"]):
        assert b == pytest.approx(a, rel=1e-5)
    assert one["losses"][-1] < one["losses"][0]  # it trains
    assert two[0]["student_weights_head"] == two[1]["student_weights_head"]
    assert torch.allclose(torch.tensor(two[0]["student_weights_head"]), torch.tensor(one["student_weights_head"]),
                          rtol=1e-4, atol=1e-6)
