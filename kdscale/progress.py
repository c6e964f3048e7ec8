"""A rank-0 progress bar: steps, loss, images/s and ETA. Quiet on other ranks.

When output is not a terminal (CI logs, Slurm files) it prints a line at most every
30 seconds instead of redrawing.
"""

from __future__ import annotations

import sys


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar that redraws on a terminal and prints a line every 30 s otherwise."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(iterable, mininterval=0.5 if interactive else 30.0, dynamic_ncols=True, **kwargs)


class ProgressBar:
    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            self.bar = progress_bar(total=total, initial=initial, unit="step", desc="train")

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def set_postfix(self, loss: float, img_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={loss:.4f} img/s={img_s:.0f}", refresh=False)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
