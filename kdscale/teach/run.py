"""``kdscale.teach`` as a job: the writer (:mod:`.writer`) inside the job lifecycle
(:mod:`kdscale.lifecycle.job`), its tracker, the ranks' agreement on why they stopped, and the
summary."""

from __future__ import annotations

import time

import torch

from kdscale.config.schema import ExperimentConfig
from kdscale.lifecycle.job import Job
from kdscale.log import log
from kdscale.teach.writer import TeacherOutputWriter, check_teach_config


def teach(cfg: ExperimentConfig, job: Job | None = None) -> dict:
    """Write the teacher outputs; ``summary["exit_code"]`` is 0, or 128 + N after SIGINT or
    SIGTERM (stopped, not finished; SIGUSR1 and the preemption file are 0: requeue). Every
    rank exits with the same status: the ranks agree on the strongest stop cause among them.
    ``job``: the entry point's (:mod:`kdscale.lifecycle.job`); without one, its own."""
    check_teach_config(cfg)
    own = job is None
    job = job or Job.for_teaching(cfg, from_start=False).__enter__()
    try:
        with job.running():
            summary = _teach(cfg, job)
    except BaseException:
        if own:
            job.close(failed=True)
        raise
    if own:
        job.close(failed=False)
    log.info(f"teacher outputs: {summary['samples_written']} samples in {summary['shards_written']} new "
             f"shards ({summary['shards_reused']} already done) in {summary['outputs']}")
    if summary["ranks_stopped"]:
        why = f"{summary['stopped_by']} received" if summary["stopped_by"] else "preempted"
        log.info(f"{why}: stopped with {summary['shards_partial']} shard(s) partly written; run the same command "
                 f"again to continue")
    return summary


def _teach(cfg: ExperimentConfig, job: Job) -> dict:
    from kdscale.config import config_to_dict
    from kdscale.runtime.tracking import Tracker

    ctx = job.ctx
    writer = TeacherOutputWriter(cfg, ctx, job.watchdog, job.stop)
    tracker = job.track(Tracker(cfg, config_to_dict(cfg), None, ctx.is_main, job_type="teach"))
    start = time.perf_counter()
    summary = writer.run()
    summary["images_per_s"] = summary["samples_written"] / max(1e-9, time.perf_counter() - start)
    cause = ctx.all_reduce(torch.tensor([float(job.stop.local_cause())], device=ctx.device), "max")
    job.stop.agree(int(cause.item()))  # a rank that got no signal exits as its peers do
    summary["stopped_by"], summary["exit_code"] = job.stop.name, job.stop.exit_code()
    tracker.log({"teach/samples_written": summary["samples_written"],
                 "teach/shards_written": summary["shards_written"],
                 "perf/images_per_s": summary["images_per_s"]}, 0)
    tracker.finish(failed=False)
    return summary
