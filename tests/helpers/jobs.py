"""Real jobs for the fault tests: start one in its own session (as a terminal would), wait
for its training steps, end it in bounded time, and find its processes (ranks, loader
workers, launchers) in ``/proc``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from helpers.common import PYTHON, ROOT

ACCELERATE = os.path.join(ROOT, "launch", "accelerate.sh")


def start(args, log_path, ranks: int = 1, env_extra: dict | None = None) -> subprocess.Popen:
    """A job in its own session (as a terminal would start it); stdout+stderr to ``log_path``."""
    command = ["bash", ACCELERATE, "-m", "kdscale.train", *args] if ranks > 1 else \
        [PYTHON, "-m", "kdscale.train", *args]
    env = dict(os.environ, KDSCALE_CPU_PROCS=str(ranks), **(env_extra or {}))
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(job: subprocess.Popen, timeout: float) -> int:
    try:
        return job.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        pytest.fail(f"job still running after {timeout} s")


def train_steps(run_dir) -> list[int]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [entry["step"] for entry in map(json.loads, open(path).read().splitlines()[:-1] or [])
            if "train/loss" in entry]


def wait_for_steps(run_dir, count: int, job: subprocess.Popen, log_path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(train_steps(run_dir)) >= count:
            return
        if job.poll() is not None:
            pytest.fail(f"job ended early ({job.returncode}): {open(log_path).read()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"training did not reach {count} steps: {open(log_path).read()[-3000:]}")


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            table[int(entry)] = (int(fields[1]), cmdline)
    return table


def is_rank(command_line: str) -> bool:
    """A rank's command line (not accelerate's, nor kdscale's job launcher's, which name the module too)."""
    words = command_line.split()
    return "kdscale.train" in words and not any(w.endswith(("accelerate", "accelerate.commands.launch",
                                                            "kdscale.lifecycle.launcher")) for w in words)


def descendants(pid: int) -> list[int]:
    table = processes()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, (ppid, _) in table.items() if ppid == parent]
        found += children
        frontier += children
    return found
