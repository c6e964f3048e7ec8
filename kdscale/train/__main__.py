"""``python -m kdscale.train --config configs/x.yaml key.sub=value ...``

Also the module that ``accelerate launch -m kdscale.train`` runs on every process. A user
error prints one line and exits 2; any other failure names the rank that failed before
the traceback, and the launcher then stops the other ranks.
"""

from __future__ import annotations

import os
import warnings

from kdscale.config.arguments import experiment_parser
from kdscale.errors import KdscaleError, exit_on_user_error
from kdscale.lifecycle.exit import set_exit_reason
from kdscale.log import log, setup_logging


def main(argv: list[str] | None = None) -> dict:
    args = experiment_parser("kdscale train", "Train or distill a classifier.").parse_args(argv)
    # torch.distributed's deprecation notices fire on every ZeRO collective.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    setup_logging()
    with exit_on_user_error():
        from kdscale.config import load_config
        from kdscale.lifecycle.run_lock import RunLock
        from kdscale.lifecycle.watchdog import Watchdog
        from kdscale.parallel.context import shutdown_process_group

        cfg = load_config(args.config, args.overrides)
        # Rank 0 takes the run directory before the heavy imports: a second job is refused at once.
        lock = RunLock(cfg.run_dir).acquire() if os.environ.get("RANK", "0") == "0" else None
        # Started before the process group, so a start-up that hangs or outlives its launcher ends too.
        watchdog = Watchdog(cfg.train.stall_timeout_s, os.environ.get("RANK", "0")).start()
        trainer = None
        try:
            from kdscale.train.loop import Trainer

            trainer = Trainer(cfg, watchdog=watchdog, lock=lock)
            summary = trainer.train()
        except Exception as err:
            if os.environ.get("WORLD_SIZE", "1") != "1" and not isinstance(err, KdscaleError):
                log.error(f"rank {os.environ.get('RANK', '?')} failed: {type(err).__name__}: {err}")
            raise
        finally:  # flush wandb and metrics, release the run directory, end the process group
            if trainer is not None:
                trainer.close()
            else:
                watchdog.stop()
                if lock is not None:
                    lock.release()
                shutdown_process_group()
        if summary["completed"]:
            if trainer.signals.received is not None:
                log.info(f"{trainer.signals.name} arrived after the last step: the run is complete (exit 0)")
            return summary
        if summary["preempted"]:
            set_exit_reason(f"{trainer.signals.describe()}: stopped at step {summary['step']} with a checkpoint "
                            f"(exit {trainer.signals.exit_code()}); run the same command again to resume")
        if trainer.signals.exit_code():
            raise SystemExit(trainer.signals.exit_code())  # interrupted by SIGINT/SIGTERM: not a success
        return summary


if __name__ == "__main__":
    from kdscale.lifecycle.exit import run_then_exit

    run_then_exit(main)
