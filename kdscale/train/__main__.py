"""``python -m kdscale.train --config configs/x.yaml key.sub=value ...``

Also the module that ``accelerate launch -m kdscale.train`` runs on every process. A user
error prints one line and exits 2; any other failure names the rank that failed before
the traceback, and the launcher then stops the other ranks. The job's lifecycle (lock,
watchdog, process group, stop signals, tracker, teardown) is :class:`kdscale.lifecycle.job.Job`.
"""

from __future__ import annotations

import os
import warnings

from kdscale.config.arguments import experiment_parser
from kdscale.errors import KdscaleError, exit_on_user_error
from kdscale.lifecycle.exit import set_exit_reason
from kdscale.log import log, one_voice


def main(argv: list[str] | None = None) -> dict:
    args = experiment_parser("kdscale train", "Train or distill a classifier.").parse_args(argv)
    # torch.distributed's deprecation notices fire on every ZeRO collective.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    one_voice()
    with exit_on_user_error():
        from kdscale.config import load_config
        from kdscale.lifecycle.job import Job

        cfg = load_config(args.config, args.overrides)
        # The job takes the run directory before the heavy imports: a second job is refused at once.
        with Job.for_training(cfg) as job:
            try:
                from kdscale.train.loop import Trainer

                summary = Trainer(cfg, job).train()
            except Exception as err:
                if os.environ.get("WORLD_SIZE", "1") != "1" and not isinstance(err, KdscaleError):
                    log.error(f"rank {os.environ.get('RANK', '?')} failed: {type(err).__name__}: {err}")
                raise
        stop = job.stop
        if summary["completed"]:
            if stop.signals.received is not None:
                log.info(f"{stop.signals.name} arrived after the last step: the run is complete (exit 0)")
            return summary
        if summary["preempted"]:
            set_exit_reason(f"{stop.describe()}: stopped at step {summary['step']} with a checkpoint "
                            f"(exit {stop.exit_code()}); run the same command again to resume")
        if stop.exit_code():
            raise SystemExit(stop.exit_code())  # interrupted by SIGINT/SIGTERM: not a success
        return summary


if __name__ == "__main__":
    from kdscale.lifecycle.exit import run_then_exit

    run_then_exit(main)
