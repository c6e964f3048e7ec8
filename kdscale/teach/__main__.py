"""``accelerate launch -m kdscale.teach --config configs/x.yaml [overrides]``: write
teacher-output shards for ``teacher.source: shards`` training."""

from __future__ import annotations

from kdscale.errors import exit_on_user_error
from kdscale.config.arguments import experiment_parser
from kdscale.log import setup_logging


def main(argv: list[str] | None = None) -> dict:
    args = experiment_parser("kdscale teach", "Write teacher-output shards.").parse_args(argv)
    setup_logging()
    with exit_on_user_error():
        from kdscale.config import load_config
        from kdscale.teach.writer import teach

        return teach(load_config(args.config, args.overrides))


if __name__ == "__main__":
    from kdscale.lifecycle.exit import run_then_exit

    run_then_exit(main)
