"""Each training sample's stable dataset index, and the label of every index.

Methods that keep state per sample (CRD's memory banks) need to know *which* sample of the
dataset each image of a batch is, whatever the shuffle, the rank or the resume. kdscale
numbers the samples of the training shards in the order ``index.json`` records them: the
shards in the order of the split's ``records`` (the order they were written), and inside a
shard the samples in tar order. Sample ``j`` of the shard whose records come after ``n``
samples (of the shards given) has index ``n + j``; a subset of a split is numbered
``0 .. N-1`` on its own, so per-sample state covers exactly the samples trained on. A bad
sample keeps its number (the reader counts every sample it sees), so the numbering never
shifts.

The label table (``scan_labels``) reads only the ``.cls`` members of local shards: every
other member is skipped with a seek (:func:`~kdscale.data.tar_reader.iter_samples` with
``fields``), so a scan costs about one header read per member.
Ranks scan disjoint shards and combine their tables with one all-reduce.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch

from kdscale.data.shards import INDEX_FILE, read_index
from kdscale.data.tar_reader import iter_samples
from kdscale.errors import KdscaleError

INDEX_FIELD = "__index__"


def sample_offsets(shards: list[str], key: str = "data.train_shards") -> tuple[dict[str, int], int]:
    """(shard file name -> index of its first sample, samples in these shards) from the
    ``index.json`` beside ``shards``, numbering only the given shards, in the order the index
    records them; a one-line error naming the fix when it cannot be read."""
    index_path = os.path.join(os.path.dirname(shards[0]), INDEX_FILE)
    fix = ("write the shards with `kdscale shards synth`, `from-folder` or `from-torchvision`, whose index.json "
           "records each shard's sample count")
    if not os.path.isfile(index_path):
        raise KdscaleError(f"{key}: this method numbers the training samples from {index_path}, which does not "
                           f"exist; {fix}")
    names = {os.path.basename(s) for s in shards}
    for split in read_index(index_path).get("splits", {}).values():
        records = [r for r in split.get("records") or [] if r.get("name") in names]
        if len(records) != len(names) or any(not isinstance(r.get("samples"), int) for r in records):
            continue
        offsets, start = {}, 0
        for record in records:
            offsets[record["name"]] = start
            start += record["samples"]
        return offsets, start
    raise KdscaleError(f"{key}: {index_path} records no per-shard sample counts for these shards (a split's "
                       f"\"records\" must list every one of them); {fix}")


def numbered(samples: Iterator[dict], first_index: int) -> Iterator[dict]:
    """The samples of one shard with their dataset index under ``__index__``."""
    for position, sample in enumerate(samples):
        sample[INDEX_FIELD] = first_index + position
        yield sample


def _parse_label(raw: bytes) -> int:
    try:
        return int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return -1


def shard_labels(path: str) -> list[int]:
    """Labels of one shard's samples in tar order (-1 where a sample has no readable ``.cls``):
    a local shard's other members are skipped with seeks; a remote one is streamed whole."""
    remote = "://" in path or path.startswith("pipe:")
    return [_parse_label(s["cls"]) if "cls" in s else -1 for s in iter_samples(path, None if remote else {"cls"})]


def scan_labels(shards: list[str], offsets: dict[str, int], total: int, ctx=None,
                on_shard: Callable[[], None] | None = None) -> torch.Tensor:
    """The label of every sample index (int64, -1 where unknown). Under a process group
    (``ctx``, a :class:`~kdscale.parallel.context.DistContext`) each rank reads
    ``shards[rank::world_size]`` and one all-reduce (max) on its device gives every rank the
    whole table. ``on_shard`` is called after each shard (the stall watchdog's progress); rank
    0 shows a progress bar."""
    from kdscale.progress import progress_bar

    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    labels = torch.full((total,), -1, dtype=torch.long)
    mine = sorted(shards)[rank::world]
    for shard in progress_bar(mine, desc="labels", unit="shard", disable=rank != 0 or len(mine) < 8):
        first = offsets[os.path.basename(shard)]
        found = torch.tensor(shard_labels(shard), dtype=torch.long)
        labels[first:first + len(found)] = found
        if on_shard is not None:
            on_shard()
    if world > 1:
        labels = ctx.all_reduce(labels.to(ctx.device), op="max").cpu()
    return labels
