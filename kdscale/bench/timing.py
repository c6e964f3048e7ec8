"""Side-by-side timing: candidates run in interleaved rounds on the same machine state,
and every figure reported is a ratio of medians taken in one run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_throughput(candidates: dict[str, tuple[Callable[[], None], int]], device: torch.device,
                           steps: int, rounds: int, warmup: int = 2) -> dict[str, dict]:
    """``candidates``: name -> (one step, images per step). Returns per name the median and
    all per-round images/s; rounds alternate A, B, C, A, B, C, ... to share any drift."""
    for step, _ in candidates.values():
        for _ in range(warmup):
            step()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, (step, images) in candidates.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            samples[name].append(images * steps / (time.perf_counter() - start))
    return {name: {"images_per_s": statistics.median(values), "rounds": values} for name, values in samples.items()}


def forward_flops(model: torch.nn.Module, image_size: int, device: torch.device) -> int:
    """FLOPs of one forward pass on one image (torch's flop counter: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    model.train(was_training)
    return counter.get_total_flops()
