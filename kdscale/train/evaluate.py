"""Validation: top-1/top-5 of every network a method reports and of each online frozen
teacher (``val/<id>_top1``), plus the student's top-1 agreement with the teacher, over an
exact pass reduced across ranks.

With several online teachers, also the ensemble's own top-1/top-5 (``val/ensemble_top1``: the
weighted mean of the teachers' probabilities at T = 1, Hinton et al. 2015's ensemble) and the
student's agreement with each teacher (``val/agreement_<id>_top1``); ``val/agreement_top1`` is
then the agreement with the ensemble. Replayed teachers have no outputs on validation images
and are not scored."""

from __future__ import annotations

import torch

from kdscale.data.loader import Batch
from kdscale.errors import KdscaleError
from kdscale.methods import Distiller, TeacherOutput
from kdscale.methods.ensemble import ensemble_target_logits
from kdscale.runtime.device import autocast as run_autocast
from kdscale.train.knn_eval import KnnScores


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


def _teacher_logits(output: TeacherOutput | None) -> dict[str, torch.Tensor]:
    """Each online teacher's logits by id, and the ensemble's log-probabilities with several."""
    if output is None:
        return {}
    scored = {tid: logits.float() for tid, logits in output.members.items()}
    if len(scored) > 1:  # log of the weighted mean of the probabilities: the probs target at T = 1
        scored["ensemble"] = ensemble_target_logits(output, 1.0, "probs")
    return scored


@torch.no_grad()
def evaluate(distiller: Distiller, teachers, loader, ctx, autocast_dtype: torch.dtype | None,
             channels_last: bool, image_size: int, lockstep: bool = False, knn: KnnScores | None = None
             ) -> dict[str, float]:
    """Scores every network of ``distiller.evaluation_logits`` (in eval mode) and the online
    teachers of ``teachers`` (a :class:`~kdscale.train.teacher_source.TeacherSource`, or None).
    ``lockstep``: some parameters are ZeRO-3 partitioned, so ranks advance together.
    ``knn``: also the k-NN top-1 of summary features and the cosines (:mod:`kdscale.train.knn_eval`),
    from the same pass."""
    device = ctx.device
    autocast = run_autocast(device, autocast_dtype)
    teacher = teachers.evaluation_outputs if teachers is not None and teachers.online else None
    was_training = distiller.training
    distiller.eval()
    try:
        # Every rank needs the same names for the reduction, even one without a val shard.
        dummy = torch.zeros(1, 3, image_size, image_size, device=device)
        teacher_probe = teacher(dummy) if teacher is not None else None
        with autocast:  # as every evaluation call below: a trained module fed bf16 teacher features needs it
            probe = distiller.evaluation_logits(dummy, teacher_probe)
            if knn is not None:
                knn.names(distiller, dummy, teacher_probe)
        teacher_names = list(_teacher_logits(teacher_probe))
        clash = sorted(set(probe) & set(teacher_names))
        if clash:
            raise KdscaleError(f"teacher id {clash[0]!r} is also the name of a network method "
                               f"{distiller.name!r} scores (val/{clash[0]}_top1): give the teacher another id")
        names = list(probe) + teacher_names
        agree_with = [n for n in teacher_names if n != "ensemble"] if len(teacher_names) > 1 else []
        main_teacher = "ensemble" if agree_with else (teacher_names[0] if teacher_names else None)
        # Per name: top-1 hits, top-5 hits; per agreement: hits; then samples scored, samples skipped.
        agreements = ([main_teacher] if main_teacher else []) + agree_with
        counts = torch.zeros(2 * len(names) + len(agreements) + 2, dtype=torch.float64, device=device)
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
                if knn is not None:
                    knn.observe(distiller, images, targets, teacher_output, real)
            outputs.update(_teacher_logits(teacher_output))
            if not real:
                continue
            for i, name in enumerate(names):
                counts[2 * i] += _topk_hits(outputs[name], targets, 1)
                counts[2 * i + 1] += _topk_hits(outputs[name], targets, 5)
            student = outputs["student"].argmax(1)
            for j, name in enumerate(agreements):
                counts[2 * len(names) + j] += (student == outputs[name].argmax(1)).sum()
            counts[-2] += targets.numel()
        counts[-1] = skipped
        if knn is not None:
            memory = knn.memory_batches()
            with autocast:
                knn_metrics = knn.metrics(distiller, teacher, _lockstep(memory, ctx, dummy) if lockstep else
                                          ((b, True) for b in memory),
                                          float(ctx.all_reduce(counts[-2:-1].clone(), "sum")))
    finally:
        distiller.train(was_training)
    ctx.all_reduce(counts, "sum")
    total = max(1.0, counts[-2].item())
    metrics = {"val/samples": counts[-2].item(), "val/skipped_samples": counts[-1].item()}
    for i, name in enumerate(names):
        metrics[f"val/{name}_top1"] = 100.0 * counts[2 * i].item() / total
        metrics[f"val/{name}_top5"] = 100.0 * counts[2 * i + 1].item() / total
    for j, name in enumerate(agreements):
        key = "val/agreement_top1" if j == 0 else f"val/agreement_{name}_top1"
        metrics[key] = 100.0 * counts[2 * len(names) + j].item() / total
    if knn is not None:
        metrics.update(knn_metrics)
    return metrics
