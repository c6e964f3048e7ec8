"""The teachers' feature statistics a method needs before its first step (the ``features``
method's ``standardize``: :mod:`kdscale.methods.feature_standardization`).

Every rank reads the first ``batches`` micro-batches of epoch 0 (the same stream training then
reads again from its start), runs the run's teachers on them as a training step would (online,
or replayed from their shards), and sums each wanted target's count, sum and sum of outer
products in float64; the sums are reduced over ranks, so every rank sets the same statistics.
Each rank makes the same number of teacher calls (a ZeRO-3 teacher needs every rank in each
forward). A resumed run has its statistics in the checkpoint and gathers none.
"""

from __future__ import annotations

import torch

from kdscale.log import log
from kdscale.methods.feature_standardization import accumulate
from kdscale.progress import progress_bar
from kdscale.train.window import MetricsWindow


def gather_feature_statistics(distiller, teacher, inputs, ctx, watchdog, batches: int) -> None:
    """``distiller.feature_statistics()`` gathered over ``batches`` micro-batches per rank (at most
    an epoch's) and handed to ``distiller.set_feature_statistics``."""
    wanted = distiller.feature_statistics()
    if not wanted:
        return
    count = min(batches, inputs.plan.micro_batches_per_epoch)
    log.info(f"gathering feature statistics of {', '.join(wanted)} over {count} batch(es) per rank before training")
    sums: dict[str, list] = {}
    loader = iter(inputs.train_loader(0, 0))
    bar = progress_bar(total=count, unit="batch", desc="statistics", disable=not ctx.is_main)
    with torch.no_grad():
        for _ in range(count):
            images, _targets, replayed, _indices = inputs.on_device(inputs.next_batch(loader, MetricsWindow()), 0, 0)
            output = teacher(images, replayed)
            for name, (tid, kind) in wanted.items():
                part = accumulate(output.member_features[tid][kind])
                sums[name] = list(part) if name not in sums else [a + b for a, b in zip(sums[name], part)]
            watchdog.progress()
            bar.update(1)
    bar.close()
    del loader  # ends the loader's workers
    for name, (rows, total, outer) in sums.items():
        packed = torch.cat([torch.tensor([rows], dtype=torch.float64, device=total.device), total, outer.flatten()])
        packed = ctx.all_reduce(packed.to(ctx.device), "sum")
        width = total.shape[0]
        distiller.set_feature_statistics(name, float(packed[0]), packed[1:1 + width], packed[1 + width:].view(width, width))
