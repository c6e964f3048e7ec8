"""``accelerate launch -m kdscale.teach --config configs/x.yaml [overrides]``: write
teacher-output shards for ``teacher.source: shards`` training.

Stops like training (:mod:`kdscale.lifecycle.stop`): after SIGUSR1 or the preemption file
it keeps the shards in progress as resumable partials and exits 0 (requeue and rerun);
after SIGINT or SIGTERM the same, with 128 + the signal number. A stall watchdog ends a
rank that makes no progress for ``train.stall_timeout_s`` or outlives its launcher. The
job's lifecycle is :class:`kdscale.lifecycle.job.Job`, as for training."""

from __future__ import annotations

from kdscale.config.arguments import experiment_parser
from kdscale.errors import exit_on_user_error
from kdscale.log import one_voice


def main(argv: list[str] | None = None) -> dict:
    args = experiment_parser("kdscale teach", "Write teacher-output shards.").parse_args(argv)
    one_voice()
    with exit_on_user_error():
        from kdscale.config import load_config
        from kdscale.lifecycle.job import Job
        from kdscale.teach.run import teach
        from kdscale.teach.writer import check_teach_config

        cfg = load_config(args.config, args.overrides)
        check_teach_config(cfg)
        with Job.for_teaching(cfg) as job:
            summary = teach(cfg, job)
        if summary["exit_code"]:
            raise SystemExit(summary["exit_code"])  # interrupted by SIGINT/SIGTERM: not a success
        return summary


if __name__ == "__main__":
    from kdscale.lifecycle.exit import run_then_exit

    run_then_exit(main)
