"""Faults done for real to real jobs: Ctrl-C, kill -9 of the launcher, a second job on the
same run directory, a frozen loader worker, kill -9 inside checkpoint writes, a diverged
run. Each test checks that the run ends in bounded time, says why, and loses nothing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from helpers.common import PYTHON, ROOT, base_overrides
from helpers.jobs import (
    ACCELERATE,
    descendants,
    finish,
    is_rank,
    processes,
    start,
    train_steps,
    wait_for_steps,
)

pytestmark = pytest.mark.slow  # real multi-process runs: the full tier only


def overrides(synth_data, out, name, *extra):
    return base_overrides(synth_data, str(out), name=name) + [
        "student.name=resnet8", "data.train_samples=640", "train.log_every_steps=1", "train.preempt_check_steps=1",
        *extra]


def final_weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "export", "student.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(synth_data, tmp_path_factory):
    """The 2-rank reference run (3 epochs of 10 steps) and the 1-rank one (3 x 20 steps)."""
    out = tmp_path_factory.mktemp("reference")
    runs = {}
    for ranks in (1, 2):
        log = out / f"ranks{ranks}.log"
        job = start(overrides(synth_data, out, f"ref{ranks}", "train.epochs=3", "data.num_workers=1"), log, ranks)
        assert finish(job, 300) == 0, open(log).read()[-3000:]
        runs[ranks] = out / f"ref{ranks}"
    return runs


def test_sigint_stops_every_rank_at_one_step_and_resumes_exactly(synth_data, tmp_path, uninterrupted):
    args = overrides(synth_data, tmp_path, "ref2", "train.epochs=3", "data.num_workers=1")
    log = tmp_path / "first.log"
    job = start(args, log, ranks=2)
    wait_for_steps(tmp_path / "ref2", 4, job, log)
    os.killpg(job.pid, signal.SIGINT)  # Ctrl-C in the job's terminal: every process gets it
    code = finish(job, 60)
    text = open(log).read()
    assert code == 130, text[-3000:]  # interrupted, not finished: the job's status is the ranks' 128 + SIGINT
    assert "SIGINT received: stopping at the next step with a checkpoint" in text
    assert "stopped at step" in text and "run the same command again" in text
    # No rank fails (accelerate's own agent prints a traceback of its SignalException).
    assert "/kdscale/" not in text and "exited unexpectedly" not in text, text[-3000:]
    summary = json.load(open(tmp_path / "ref2" / "summary.json"))
    assert summary["stopped_by"] == "SIGINT" and not summary["completed"]
    assert summary["checkpoint"].endswith(f"step-{summary['step']:08d}.pt")
    assert 4 <= summary["step"] < 30
    job = start(args, tmp_path / "second.log", ranks=2)
    assert finish(job, 300) == 0, open(tmp_path / "second.log").read()[-3000:]
    assert f"resumed from {summary['checkpoint']}" in open(tmp_path / "second.log").read()
    resumed, reference = final_weights(tmp_path / "ref2"), final_weights(uninterrupted[2])
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert sorted(set(train_steps(tmp_path / "ref2"))) == list(range(1, 31))


def test_second_job_on_a_run_directory_is_refused_at_once(synth_data, tmp_path):
    args = overrides(synth_data, tmp_path, "locked", "train.epochs=2")
    first = start(args, tmp_path / "first.log")
    wait_for_steps(tmp_path / "locked", 2, first, tmp_path / "first.log")
    began = time.monotonic()
    second = subprocess.run([PYTHON, "-m", "kdscale.train", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert time.monotonic() - began < 10
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "is in use by another run (pid " in lines[0], second.stderr
    assert f"pid {first.pid} on " in lines[0]
    assert finish(first, 300) == 0
    steps = train_steps(tmp_path / "locked")
    assert sorted(steps) == list(range(1, 41))  # nothing logged twice
    again = subprocess.run([PYTHON, "-m", "kdscale.train", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]  # the lock is free: it starts (and finds the run done)


def test_killed_launcher_leaves_no_rank_alive(synth_data, tmp_path):
    log = tmp_path / "job.log"
    job = start(overrides(synth_data, tmp_path, "orphans", "train.epochs=20", "data.num_workers=1"), log, ranks=2)
    wait_for_steps(tmp_path / "orphans", 2, job, log)
    family = descendants(job.pid)
    ranks = [p for p in family if is_rank(processes().get(p, (0, ""))[1])]
    assert len(ranks) == 2, processes()
    os.kill(job.pid, signal.SIGKILL)  # the launcher alone
    job.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(p in processes() for p in family):
        time.sleep(0.5)
    alive = [p for p in family if p in processes()]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"still alive 60 s after the launcher died: {alive}"
    assert "the launcher (pid" in open(log).read()


def test_frozen_loader_worker_ends_the_job_with_stacks(synth_data, tmp_path):
    log = tmp_path / "job.log"
    job = start(overrides(synth_data, tmp_path, "frozen", "train.epochs=20", "data.num_workers=1",
                          "train.stall_timeout_s=15"), log, ranks=2)
    wait_for_steps(tmp_path / "frozen", 2, job, log)
    table = processes()
    servers = [p for p in descendants(job.pid) if "forkserver" in table.get(p, (0, ""))[1]]
    workers = [p for p in table if table[p][0] in servers]
    assert workers, table
    family = descendants(job.pid)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        code = finish(job, 15 + 90)
        time.sleep(2)
        left = [p for p in family if p in processes()]  # before this test ends them by hand
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    text = open(log).read()
    assert code == 3, text[-3000:]  # the stall's status, at the job level
    assert time.monotonic() - stopped < 15 + 90
    assert "stalled: nothing finished for" in text and "waiting for a batch from the data loader" in text, text[-4000:]
    assert "Thread 0x" in text or "Current thread 0x" in text  # faulthandler's stacks
    assert not left, f"outlived the job (stopped workers, forkserver, resource tracker): {left}"


def test_kill9_inside_checkpoint_writes_never_loads_a_partial_one(synth_data, tmp_path, uninterrupted):
    args = overrides(synth_data, tmp_path, "ref1", "train.epochs=3", "data.num_workers=1",
                     "train.checkpoint_every_steps=1", "train.keep_checkpoints=2")
    checkpoints = tmp_path / "ref1" / "checkpoints"
    inside_writes = 0
    for attempt in range(5):
        log = tmp_path / f"attempt{attempt}.log"
        job = start(args, log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and job.poll() is None:
            names = os.listdir(checkpoints) if checkpoints.exists() else []
            if any(".tmp" in name for name in names) and len(train_steps(tmp_path / "ref1")) > attempt * 8 + 2:
                os.killpg(job.pid, signal.SIGKILL)  # lands while a checkpoint is being written
                inside_writes += 1
                break
        job.wait()
        text = open(log).read()
        assert "unreadable checkpoint" not in text, text[-3000:]
        if attempt:
            assert "resumed from" in text, text[-3000:]
    for path in checkpoints.iterdir():  # whatever the kills left: complete checkpoints only
        if ".tmp" not in path.name:
            torch.load(path, weights_only=True)
    assert inside_writes >= 3, "checkpoints are not written under a temporary name"
    job = start(args, tmp_path / "last.log")
    assert finish(job, 300) == 0, open(tmp_path / "last.log").read()[-3000:]
    assert not [p for p in checkpoints.iterdir() if ".tmp" in p.name]
    resumed, reference = final_weights(tmp_path / "ref1"), final_weights(uninterrupted[1])
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.parametrize("policy, expected", [
    ("stop", "the loss is not finite at step"),
    ("skip", "non-finite steps in a row (train.max_nonfinite_skips=2)"),
])
def test_diverged_run_fails_loudly_and_exports_nothing(synth_data, tmp_path, policy, expected):
    log = tmp_path / "job.log"
    job = start(overrides(synth_data, tmp_path, "nan", "optim.lr=1e6", "optim.schedule=constant",
                          f"train.nonfinite={policy}", "train.max_nonfinite_skips=2", "train.epochs=2"), log, ranks=2)
    code = finish(job, 300)
    text = open(log).read()
    assert code != 0
    assert expected in text and "nothing is exported" in text, text[-3000:]
    assert "different weights" not in text
    summary = json.load(open(tmp_path / "nan" / "summary.json"))
    assert summary["completed"] is False and summary["error"] and "export" not in summary
    assert not (tmp_path / "nan" / "export").exists()
    if policy == "skip":
        assert summary["nonfinite_skipped"] == 2


def test_full_disk_while_writing_a_checkpoint(synth_data, tmp_path):
    """A run directory on a 2 MB file system: the third checkpoint does not fit. The run
    stops with one line, the older checkpoints stay loadable, and once there is space the
    same command resumes from the newest complete one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        args = overrides(synth_data, disk, "full", "train.epochs=2", "train.checkpoint_every_steps=2",
                         "train.keep_checkpoints=5", "wandb.mode=disabled")
        failed = subprocess.run([PYTHON, "-m", "kdscale.train", *args], cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        assert failed.returncode == 2, failed.stderr[-3000:]
        errors = [line for line in failed.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
        assert "kdscale: error: no space left on the device of" in errors[0] and "is intact" in errors[0]
        checkpoints = sorted((disk / "full" / "checkpoints").iterdir())
        assert checkpoints and not [p for p in checkpoints if ".tmp" in p.name]
        for path in checkpoints:
            torch.load(path, weights_only=True)
        newest = int(checkpoints[-1].name[5:13])
        assert not (disk / "full" / "export").exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        resumed = subprocess.run([PYTHON, "-m", "kdscale.train", *args], cwd=ROOT, capture_output=True, text=True,
                                 timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"at step {newest} " in resumed.stdout
        assert json.load(open(disk / "full" / "summary.json"))["completed"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_kill9_of_one_rank_ends_the_job(synth_data, tmp_path):
    log = tmp_path / "job.log"
    job = start(overrides(synth_data, tmp_path, "onerank", "train.epochs=20", "data.num_workers=1"), log, ranks=2)
    wait_for_steps(tmp_path / "onerank", 2, job, log)
    table = processes()
    family = descendants(job.pid)
    ranks = [p for p in family if is_rank(table.get(p, (0, ""))[1])]
    assert len(ranks) == 2, table
    os.kill(ranks[-1], signal.SIGKILL)
    code = finish(job, 90)  # the launcher ends the other rank and reports the failure
    assert code != 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(p in processes() for p in family):
        time.sleep(0.5)
    assert not [p for p in family if p in processes()]  # no rank, worker or forkserver left behind


# -- signals as clusters send them: to every process, to the process group, to the launcher --------
def logged_training(run_dir) -> dict[int, dict]:
    """Step -> the logged training metrics without timings; fails on a step logged twice."""
    out = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        entry = json.loads(line)
        if "train/loss" in entry:
            assert entry["step"] not in out, f"step {entry['step']} logged twice"
            out[entry["step"]] = {k: v for k, v in entry.items() if k.startswith(("train/", "data/"))}
    return out


def signal_every(pids: list[int], signum: int) -> None:
    """The signal to each of these processes, as ``scancel`` or ``--signal`` without ``B:`` do."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def no_traceback(text: str) -> None:
    for bad in ("Traceback", "exited unexpectedly", "resource_tracker", "KeyError", "SignalException",
                "ChildFailedError"):
        assert bad not in text, f"{bad!r} in the job's output:\n{text[-4000:]}"


def test_sigterm_to_every_process_stops_at_one_step_and_resumes_exactly(synth_data, tmp_path, uninterrupted):
    """As ``scancel`` and a time limit do: SIGTERM to the launcher, the ranks, their loader
    workers, the forkserver, the resource tracker and wandb's service, at a random step."""
    import random

    at = random.Random().randint(3, 9)
    print(f"SIGTERM to every process after step {at}")
    args = overrides(synth_data, tmp_path, "ref2", "train.epochs=3", "data.num_workers=1", "wandb.mode=offline")
    log = tmp_path / "first.log"
    job = start(args, log, ranks=2)
    wait_for_steps(tmp_path / "ref2", at, job, log)
    family = [job.pid, *descendants(job.pid)]
    assert any("wandb" in processes().get(p, (0, ""))[1] for p in family), "no wandb service to signal"
    signal_every(family, signal.SIGTERM)
    code = finish(job, 90)
    text = open(log).read()
    assert code == 143, text[-3000:]
    no_traceback(text)
    assert "SIGTERM received: stopping at the next step with a checkpoint" in text
    assert "job ended with status 143" in text
    # wandb's service handles SIGTERM itself and goes: said in one line, the history stays in metrics.jsonl.
    assert text.count("wandb stopped answering") <= 1
    summary = json.load(open(tmp_path / "ref2" / "summary.json"))
    assert summary["stopped_by"] == "SIGTERM" and not summary["completed"]
    assert summary["checkpoint"].endswith(f"step-{summary['step']:08d}.pt") and at <= summary["step"] < 30
    time.sleep(1)
    assert not [p for p in family if p in processes()], "a process of the job outlived it"
    job = start(args, tmp_path / "second.log", ranks=2)
    assert finish(job, 300) == 0, open(tmp_path / "second.log").read()[-3000:]
    resumed, reference = final_weights(tmp_path / "ref2"), final_weights(uninterrupted[2])
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert logged_training(tmp_path / "ref2") == logged_training(uninterrupted[2])
    runs = {path.name.rsplit("-", 1)[-1] for path in (tmp_path / "ref2" / "wandb").glob("offline-run-*")}
    assert len(runs) == 1, runs  # one wandb run across the stop and the resume


@pytest.mark.parametrize("delivery", ["every process", "process group"])
def test_sigusr1_stops_cleanly_with_status_0(synth_data, tmp_path, delivery):
    """``--signal=USR1`` without ``B:`` (every process), and USR1 to the launcher's process
    group: a clean preemption stop (exit 0), the launcher survives, nothing prints a traceback."""
    args = overrides(synth_data, tmp_path, "usr1", "train.epochs=3", "data.num_workers=1")
    log = tmp_path / "job.log"
    job = start(args, log, ranks=2)
    wait_for_steps(tmp_path / "usr1", 3, job, log)
    if delivery == "process group":
        os.killpg(job.pid, signal.SIGUSR1)
    else:
        signal_every([job.pid, *descendants(job.pid)], signal.SIGUSR1)
    code = finish(job, 90)
    text = open(log).read()
    assert code == 0, text[-3000:]
    no_traceback(text)
    summary = json.load(open(tmp_path / "usr1" / "summary.json"))
    assert summary["stopped_by"] == "SIGUSR1" and summary["preempted"] and not summary["completed"]


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_the_launcher_alone_gives_the_job_status(synth_data, tmp_path, signum, status):
    args = overrides(synth_data, tmp_path, "alone", "train.epochs=3")
    log = tmp_path / "job.log"
    job = start(args, log, ranks=2)
    wait_for_steps(tmp_path / "alone", 3, job, log)
    os.kill(job.pid, signum)  # kdscale's launcher passes it on to the ranks
    code = finish(job, 90)
    text = open(log).read()
    assert code == status, text[-3000:]
    no_traceback(text)
    assert f"{signal.Signals(signum).name} received" in text
    # A rank that got the signal from its peer says so and exits with the same status.
    summary = json.load(open(tmp_path / "alone" / "summary.json"))
    assert summary["stopped_by"] == signal.Signals(signum).name


def test_refused_second_job_has_status_2_at_the_job_level(synth_data, tmp_path):
    args = overrides(synth_data, tmp_path, "taken", "train.epochs=3")
    first = start(args, tmp_path / "first.log")
    wait_for_steps(tmp_path / "taken", 2, first, tmp_path / "first.log")
    second = subprocess.run(["bash", ACCELERATE, "-m", "kdscale.train", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, KDSCALE_CPU_PROCS="2"))
    assert second.returncode == 2, second.stderr[-3000:]
    no_traceback(second.stdout + second.stderr)
    assert "is in use by another run (pid " in second.stderr
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
