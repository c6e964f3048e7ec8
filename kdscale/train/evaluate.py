"""Validation: top-1/top-5 of every network a method reports and of the frozen teacher,
plus student-teacher top-1 agreement, over an exact pass reduced across ranks."""

from __future__ import annotations

import torch

from kdscale.data.loader import Batch
from kdscale.methods import Distiller
from kdscale.runtime.device import autocast as run_autocast
from kdscale.teachers.frozen import FrozenTeacher


def _topk_hits(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == targets[:, None]).any(dim=1).sum()


def _lockstep(batches, ctx, dummy):
    """Yield (batch, real) until every rank is done; a finished rank yields ``dummy`` so
    that all ranks keep making the same forward calls (ZeRO-3 gathers in each forward)."""
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        flag = torch.tensor([0.0 if batch is None else 1.0], device=ctx.device)
        if ctx.all_reduce(flag, "max").item() == 0:
            return
        yield (batch, True) if batch is not None else (dummy, False)


@torch.no_grad()
def evaluate(distiller: Distiller, teacher: FrozenTeacher | None, loader, ctx, autocast_dtype: torch.dtype | None,
             channels_last: bool, image_size: int, lockstep: bool = False) -> dict[str, float]:
    """Scores every network of ``distiller.evaluation_logits`` (in eval mode) and the teacher.
    ``lockstep``: some parameters are ZeRO-3 partitioned, so ranks advance together."""
    device = ctx.device
    autocast = run_autocast(device, autocast_dtype)
    was_training = distiller.training
    distiller.eval()
    try:
        # Every rank needs the same names for the reduction, even one without a val shard.
        dummy = torch.zeros(1, 3, image_size, image_size, device=device)
        with autocast:  # as every evaluation call below: a trained module fed bf16 teacher features needs it
            probe = distiller.evaluation_logits(dummy, teacher(dummy) if teacher is not None else None)
        names = list(probe) + (["teacher"] if teacher is not None else [])
        # Per name: top-1 hits, top-5 hits; then agreement hits, samples scored, samples skipped.
        counts = torch.zeros(2 * len(names) + 3, dtype=torch.float64, device=device)
        dummy = Batch(torch.zeros(1, 3, image_size, image_size), torch.zeros(1, dtype=torch.long), [], 0)
        batches = _lockstep(loader, ctx, dummy) if lockstep else ((b, True) for b in loader)
        skipped = 0
        for batch, real in batches:
            images, targets = batch.images, batch.targets
            if real:
                skipped += batch.bad_samples
            if images.shape[0] == 0:  # a batch that only reports skipped samples
                if not lockstep:
                    continue
                images, targets, real = dummy.images, dummy.targets, False
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            teacher_output = teacher(images) if teacher is not None else None
            with autocast:
                outputs = {name: logits.float()
                           for name, logits in distiller.evaluation_logits(images, teacher_output).items()}
            if teacher_output is not None:
                outputs["teacher"] = teacher_output.logits.float()
            if not real:
                continue
            for i, name in enumerate(names):
                counts[2 * i] += _topk_hits(outputs[name], targets, 1)
                counts[2 * i + 1] += _topk_hits(outputs[name], targets, 5)
            if teacher is not None:
                counts[-3] += (outputs["student"].argmax(1) == outputs["teacher"].argmax(1)).sum()
            counts[-2] += targets.numel()
        counts[-1] = skipped
    finally:
        distiller.train(was_training)
    ctx.all_reduce(counts, "sum")
    total = max(1.0, counts[-2].item())
    metrics = {"val/samples": counts[-2].item(), "val/skipped_samples": counts[-1].item()}
    for i, name in enumerate(names):
        metrics[f"val/{name}_top1"] = 100.0 * counts[2 * i].item() / total
        metrics[f"val/{name}_top5"] = 100.0 * counts[2 * i + 1].item() / total
    if teacher is not None:
        metrics["val/agreement_top1"] = 100.0 * counts[-3].item() / total
    return metrics
