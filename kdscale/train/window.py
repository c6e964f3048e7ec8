"""What the loop logs between two log steps: mean loss terms (over ranks), throughput,
data wait, bad samples (summed over ranks), memory."""

from __future__ import annotations

import resource
import time

import torch


def describe_losses(losses: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{name}={value.detach().float().item():.4g}" for name, value in losses.items())


class MetricsWindow:
    def __init__(self):
        self.bad_samples_epoch = 0
        self.reset()

    def reset(self) -> None:
        self.start, self.wait, self.images, self.count = time.perf_counter(), 0.0, 0, 0
        self.losses: dict[str, torch.Tensor] = {}

    def add_losses(self, losses: dict[str, torch.Tensor]) -> None:
        """One phase's terms of the current micro-batch (:meth:`add_batch` counts the batch)."""
        for name, value in losses.items():
            self.losses[name] = self.losses.get(name, 0.0) + value.detach()

    def add_batch(self, images: int) -> None:
        self.images += images
        self.count += 1

    def state(self, ctx) -> dict:
        """Every rank's running sums (a collective: every rank calls it at the same step), for
        the checkpoint: a run resumed mid-window logs what the uninterrupted run logs. The
        timings (throughput, data wait) are not kept: they restart with the resumed process."""
        names = sorted(self.losses)
        local = [torch.as_tensor(self.losses[n]).reshape(()) for n in names]
        row = torch.stack([v.double().cpu() for v in local] + [torch.tensor(float(self.bad_samples_epoch),
                                                                            dtype=torch.float64)])
        per_rank = ctx.gather(row.to(ctx.device)).cpu()
        return {"names": names, "dtypes": [str(v.dtype).removeprefix("torch.") for v in local],
                "per_rank": per_rank, "count": self.count}

    def restore(self, state: dict | None, rank: int, world_size: int, device: torch.device) -> None:
        """Take back this rank's sums (the same values, bit for bit, on the same world size;
        on another, each rank takes an equal share of the total, so the next log's mean over
        ranks is the same up to rounding)."""
        if not state:
            return
        per_rank = state["per_rank"]
        row = per_rank[rank] if per_rank.shape[0] == world_size else per_rank.sum(dim=0) / world_size
        self.losses = {name: row[i].to(getattr(torch, dtype)).to(device)
                       for i, (name, dtype) in enumerate(zip(state["names"], state["dtypes"]))}
        self.count = int(state["count"])
        self.bad_samples_epoch = int(round(row[-1].item()))

    def metrics(self, ctx, lr: float, epoch: int, device: torch.device) -> dict[str, float]:
        """The window's metrics (a collective: every rank calls it at the same step); resets."""
        elapsed = max(1e-9, time.perf_counter() - self.start)
        names = sorted(self.losses)
        count = max(1, self.count)
        values = [self.losses[n] / count for n in names]
        reduced = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()).cpu() for v in values]
                              + [torch.tensor(float(self.bad_samples_epoch))]).to(ctx.device)
        reduced = ctx.all_reduce(reduced, "sum")
        metrics = {f"train/loss_{n}": v / ctx.world_size for n, v in zip(names, reduced[:-1].tolist())}
        metrics["train/loss"] = sum(metrics.values())
        metrics.update({"train/lr": lr, "train/epoch": epoch, "perf/images_per_s": self.images / elapsed,
                        "data/skipped_samples": reduced[-1].item(), "perf/data_wait_frac": self.wait / elapsed,
                        "mem/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
        if device.type == "cuda":
            metrics["mem/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.reset()
        return metrics
