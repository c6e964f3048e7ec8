"""``python -m kdscale.train --config configs/x.yaml key.sub=value ...``

Also the module that ``accelerate launch -m kdscale.train`` runs on every process. A user
error prints one line and exits 2; any other failure names the rank that failed before
the traceback, and the launcher then stops the other ranks.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from kdscale.errors import KdscaleError, exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdscale train", description="Train or distill a classifier.")
    parser.add_argument("--config", "-c", help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.1 data.batch_size=256")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    # torch.distributed's deprecation notices fire on every ZeRO collective.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    with exit_on_user_error():
        from kdscale.config import load_config
        from kdscale.dist.context import shutdown_process_group
        from kdscale.lifecycle.watchdog import Watchdog
        from kdscale.train.loop import Trainer

        cfg = load_config(args.config, args.overrides)
        # Started before the process group, so a start-up that hangs or outlives its launcher ends too.
        watchdog = Watchdog(cfg.train.stall_timeout_s, os.environ.get("RANK", "0")).start()
        trainer = None
        try:
            trainer = Trainer(cfg, watchdog=watchdog)
            summary = trainer.train()
        except Exception as err:
            if os.environ.get("WORLD_SIZE", "1") != "1" and not isinstance(err, KdscaleError):
                print(f"kdscale: rank {os.environ.get('RANK', '?')} failed: {type(err).__name__}: {err}",
                      file=sys.stderr, flush=True)
            raise
        finally:  # flush wandb and metrics, release the run directory, end the process group
            if trainer is not None:
                trainer.close()
            else:
                watchdog.stop()
                shutdown_process_group()
        if trainer.signals.exit_code():
            raise SystemExit(trainer.signals.exit_code())  # interrupted by SIGINT/SIGTERM: not a success
        return summary


if __name__ == "__main__":
    from kdscale.lifecycle.exit import run_then_exit

    run_then_exit(main)
