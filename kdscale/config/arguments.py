"""The command line every experiment entry point takes: ``--config FILE`` and dotted
overrides (``optim.lr=0.1``)."""

from __future__ import annotations

import argparse


def experiment_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", "-c", help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.1 data.batch_size=256")
    return parser
