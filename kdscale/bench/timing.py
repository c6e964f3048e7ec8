"""Side-by-side timing: candidates run in interleaved rounds on the same machine state.

Every ratio is computed per round (its candidates ran one after the other in that round)
and summarised over the rounds by its median and interquartile range (25th to 75th
percentile), so a reader sees the spread next to the figure."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(values: Sequence[float]) -> dict:
    """Median, 25th and 75th percentile (linear interpolation, as numpy's default), their
    difference ``iqr`` and the values themselves (``rounds``)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("spread of no values")
    if len(values) == 1:
        q25 = q75 = values[0]
    else:
        q25, _, q75 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "q25": q25, "q75": q75, "iqr": q75 - q25, "rounds": values}


def ratio_over_rounds(numerator: Sequence[float], denominator: Sequence[float]) -> dict:
    """``numerator[r] / denominator[r]`` for each round ``r``, summarised by :func:`spread`."""
    if len(numerator) != len(denominator):
        raise ValueError(f"{len(numerator)} rounds against {len(denominator)}")
    return spread([n / d for n, d in zip(numerator, denominator)])


def exact_ratio(value: float) -> dict:
    """A ratio that is computed, not timed (bytes): one round, no spread."""
    return spread([value])


def interleaved_rounds(candidates: dict[str, tuple[Callable[[], None], int]], device: torch.device,
                       steps: int, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """``candidates``: name -> (one step, images per step). Returns per name the images/s of
    each round; a round runs every candidate once (A, B, C, A, B, C, ...) so that any drift
    of the machine hits the candidates of a round alike."""
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
    return samples


def throughput_summary(samples: dict[str, list[float]]) -> dict[str, dict]:
    """Per candidate: median images/s (``images_per_s``), its IQR and the per-round values."""
    out = {}
    for name, values in samples.items():
        summary = spread(values)
        out[name] = {"images_per_s": summary["median"], "iqr": summary["iqr"], "rounds": summary["rounds"]}
    return out


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
