"""The Slurm scripts on a real 2-node Slurm cluster started by the test: a CTKD job runs a
rank on each node and completes; a preempted job checkpoints, requeues itself, resumes
and finishes with a continuous step count in one wandb run (read back from its files)."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from helpers.common import ROOT
from helpers.slurm_cluster import SlurmCluster, slurm_available

from kdscale.analysis.wandb_files import read_runs
from kdscale.models import build_model

pytestmark = pytest.mark.slow  # real multi-process runs: the full tier only


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_available()
    if reason:
        pytest.skip(f"Slurm is {reason}")
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm"))).start()
    yield cluster
    cluster.stop()


def tiny_ctkd_env(synth_data, tmp_path, extra: str = "", procs_per_node: int = 1) -> dict:
    teacher = tmp_path / "expert.pt"
    torch.manual_seed(0)
    torch.save(build_model("resnet20", 10).state_dict(), teacher)
    overrides = (f"student.name=resnet8 teacher.name=resnet20 teacher.weights={teacher} "
                 f"data.train_shards={synth_data}/train-*.tar data.val_shards={synth_data}/val-*.tar "
                 "data.num_classes=10 data.image_size=32 data.batch_size=16 data.num_workers=1 data.shuffle_buffer=64 "
                 "method.scratch_layers=[layer2,layer3] method.teacher_layers=[layer2,layer3] "
                 "optim.lr=0.05 train.log_every_steps=1 train.checkpoint_every_steps=0 " + extra)
    return {"KDSCALE_OVERRIDES": overrides, "KDSCALE_OUTPUT": str(tmp_path / "runs"), "WANDB_MODE": "offline",
            "KDSCALE_CPU_PROCS_PER_NODE": str(procs_per_node), "KDSCALE_REPO": ROOT}


def submit(cluster, tmp_path, env) -> str:
    result = cluster.run(["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={tmp_path}/slurm-%j.out",
                          os.path.join(ROOT, "slurm", "ctkd_imagenet.sh")], env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def wait_for_training(run_dir, steps: int, tmp_path, job: str, timeout: float = 300) -> None:
    """Until ``steps`` training steps are logged (the job is under way), or fail with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and sum(1 for line in open(metrics) if "train/loss" in line) >= steps:
            return
        time.sleep(0.5)
    pytest.fail(f"training did not start: {open(tmp_path / f'slurm-{job}.out').read()[-3000:]}")


def test_ctkd_job_on_two_nodes(cluster, synth_data, tmp_path):
    env = tiny_ctkd_env(synth_data, tmp_path, "data.train_samples=320 train.epochs=1")
    job = submit(cluster, tmp_path, env)
    state = cluster.wait(job, timeout=600)
    log = open(tmp_path / f"slurm-{job}.out").read()
    assert state == "COMPLETED", log[-4000:]
    assert "kdscale slurm: node 0 (" in log and "kdscale slurm: node 1 (" in log  # one task per node
    run_dir = tmp_path / "runs" / "ctkd-imagenet-r34-r18"
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["completed"] and summary["world_size"] == 2 and summary["ranks_agree"]
    assert os.path.exists(summary["checkpoint"])
    runs = read_runs(str(run_dir))  # the offline wandb run, from its own files
    assert len(runs) == 1
    run = runs[0]
    assert run["group"] == "ctkd-imagenet-r34-r18" and run["job_type"] == "train"
    assert "method:ctkd" in run["tags"]
    logged = set().union(*run["history"])
    assert {"train/loss_hint", "train/loss_at_scratch", "train/loss_scratch_ce", "val/student_top1",
            "val/scratch_teacher_top1", "val/teacher_top1"} <= logged


def test_preemption_checkpoints_requeues_and_resumes(cluster, synth_data, tmp_path):
    """2 nodes x 2 processes (4 ranks: one of them neither first nor last on its node or in
    the job), preempted, requeued and resumed in the same wandb run."""
    env = tiny_ctkd_env(synth_data, tmp_path, "data.train_samples=640 train.epochs=2 train.preempt_check_steps=1",
                        procs_per_node=2)
    job = submit(cluster, tmp_path, env)
    run_dir = tmp_path / "runs" / "ctkd-imagenet-r34-r18"
    wait_for_training(run_dir, 4, tmp_path, job)
    # What `#SBATCH --signal=B:USR1@300` does before the time limit or a preemption.
    signal = cluster.run(["scancel", "--signal=USR1", "--batch", job])
    assert signal.returncode == 0, signal.stderr
    state = cluster.wait(job, timeout=600)
    log = open(tmp_path / f"slurm-{job}.out").read()
    assert state == "COMPLETED", log[-4000:]
    restarts = cluster.run(["scontrol", "show", "job", job]).stdout
    assert "Restarts=1" in restarts
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["world_size"] == 4 and summary["ranks_agree"]
    assert summary["completed"] and summary["step"] == summary["total_steps"] == 2 * 640 // (16 * 4)
    steps = sorted({json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl") if "train/loss" in line})
    assert steps == list(range(1, summary["total_steps"] + 1))  # continuous across the requeue
    runs = read_runs(str(run_dir))
    assert len(runs) == 1 and len(runs[0]["files"]) == 2  # one wandb run, two sessions
    history_steps = sorted({row["_step"] for row in runs[0]["history"] if "train/loss" in row})
    assert history_steps == steps


def test_missing_config_fails_clearly(cluster, tmp_path):
    env = {"KDSCALE_CONFIG": "configs/does_not_exist.yaml", "KDSCALE_REPO": ROOT}
    job = submit(cluster, tmp_path, env)
    state = cluster.wait(job, timeout=120)
    log = open(tmp_path / f"slurm-{job}.out").read()
    assert state == "FAILED"
    assert "kdscale slurm: error: config file not found: configs/does_not_exist.yaml" in log


def test_sweep_as_a_job_array(cluster, synth_data, tmp_path):
    """``kdscale sweep --slurm``: one array task per grid run, each a normal kdscale job."""
    from helpers.sweeps import PYTHON, write_config

    config = write_config(tmp_path, synth_data)
    env = {"KDSCALE_CPU_PROCS_PER_NODE": "1", "KDSCALE_REPO": ROOT, "WANDB_MODE": "disabled"}
    result = cluster.run([PYTHON, "-m", "kdscale.cli", "sweep", "--config", config, "--methods", "vanilla,dml",
                          "--seeds", "0,1", "--slurm", f"--sbatch=--chdir={ROOT}",
                          f"--sbatch=--output={tmp_path}/slurm-%A_%a.out"], env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    job = result.stdout.strip().rsplit("array job ", 1)[1].split()[0]
    for task, (method, seed) in enumerate([("vanilla", 0), ("vanilla", 1), ("dml", 0), ("dml", 1)]):
        state = cluster.wait(f"{job}_{task}", timeout=600)
        log = open(tmp_path / f"slurm-{job}_{task}.out").read()
        assert state == "COMPLETED", log[-3000:]
        summary = json.load(open(tmp_path / "runs" / f"grid-{method}-s{seed}" / "summary.json"))
        assert summary["completed"] and summary["method"] == method


def test_scancel_signals_every_process_and_the_job_resumes(cluster, synth_data, tmp_path):
    """``scancel`` sends SIGTERM to every process of the job (batch shell, srun, kdscale's
    launcher, accelerate, ranks, workers, helpers): a checkpoint at one agreed step within
    KillWait (10 s here), no traceback, status 143 for each node, and a resubmission resumes."""
    env = tiny_ctkd_env(synth_data, tmp_path, "data.train_samples=640 train.epochs=2")
    job = submit(cluster, tmp_path, env)
    run_dir = tmp_path / "runs" / "ctkd-imagenet-r34-r18"
    wait_for_training(run_dir, 3, tmp_path, job)
    cancel = cluster.run(["scancel", job])
    assert cancel.returncode == 0, cancel.stderr
    assert cluster.wait(job, timeout=120) == "CANCELLED"
    time.sleep(2)  # the output file's last lines
    log = open(tmp_path / f"slurm-{job}.out").read()
    for bad in ("Traceback", "exited unexpectedly", "SignalException", "ChildFailedError"):
        assert bad not in log, log[-4000:]
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["stopped_by"] == "SIGTERM" and not summary["completed"], log[-4000:]
    assert summary["checkpoint"].endswith(f"step-{summary['step']:08d}.pt")
    assert "job ended with status 143" in log
    again = submit(cluster, tmp_path, env)
    assert cluster.wait(again, timeout=600) == "COMPLETED", open(tmp_path / f"slurm-{again}.out").read()[-4000:]
    final = json.load(open(run_dir / "summary.json"))
    assert final["completed"] and final["step"] == final["total_steps"]
    steps = sorted({json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl") if "train/loss" in line})
    assert steps == list(range(1, final["total_steps"] + 1))  # continuous across the cancel and the resubmission
    runs = read_runs(str(run_dir))
    assert len(runs) == 1  # one wandb run
