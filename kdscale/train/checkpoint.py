"""Checkpoints: written atomically, resumed from the newest complete one.

A checkpoint is ``<run>/checkpoints/step-<8 digits>.pt``: written to ``.tmp``, flushed to
disk, then renamed, so a crash mid-write never leaves a file that looks complete. It
holds the Distiller's state (every trainable network), the optimizer, the step, the data
position, RNG states, the wandb run id and the resolved config. It is read back with
``weights_only=True``; a file that fails to load is skipped with a warning and the next
newer-to-older one is tried.
"""

from __future__ import annotations

import glob
import os
import random
import re
import warnings

import torch

from kdscale.models.weights import CHECKPOINT_MARKER

_NAME = re.compile(r"step-(\d{8})\.pt$")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    paths = [p for p in glob.glob(os.path.join(checkpoint_dir(run_dir), "step-*.pt")) if _NAME.search(p)]
    return sorted(paths, key=lambda p: int(_NAME.search(p).group(1)))


def save_checkpoint(run_dir: str, state: dict, step: int, keep: int) -> str:
    os.makedirs(checkpoint_dir(run_dir), exist_ok=True)
    path = os.path.join(checkpoint_dir(run_dir), f"step-{step:08d}.pt")
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        torch.save({CHECKPOINT_MARKER: 1, **state}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(run_dir)[:-max(1, keep)]:
        os.remove(old)
    return path


def load_latest_checkpoint(run_dir: str) -> tuple[str, dict] | None:
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a damaged file can fail in many ways
            warnings.warn(f"skipping unreadable checkpoint {path}: {type(err).__name__}: {err}", stacklevel=2)
    return None


def capture_rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
