"""``python -m kdscale.train --config configs/x.yaml key.sub=value ...``

Also the module that ``accelerate launch -m kdscale.train`` runs on every process.
"""

from __future__ import annotations

import argparse

from kdscale.errors import exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdscale train", description="Train or distill a classifier.")
    parser.add_argument("--config", "-c", help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.1 data.batch_size=256")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with exit_on_user_error():
        from kdscale.config import load_config
        from kdscale.train.loop import Trainer

        cfg = load_config(args.config, args.overrides)
        return Trainer(cfg).train()


if __name__ == "__main__":
    main()
