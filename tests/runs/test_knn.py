"""k-NN evaluation (kdscale/train/knn.py, the DINO protocol): golden values against a plain-loop
reference, chunking, separable and shuffled data, 2 real gloo processes equal 1, and the
refusal of unknown labels."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdscale.errors import KdscaleError
from kdscale.parallel.context import DistContext
from kdscale.train.knn import knn_predict, knn_top1, knn_top1_distributed


def reference_scores(memory, labels, queries, num_classes, k, temperature):
    """Plain Python: normalise, sort the memory by cosine similarity, weight the first k votes by exp(s/T)."""
    def unit(row):
        norm = math.sqrt(sum(x * x for x in row))
        return [x / norm for x in row]

    memory = [unit(r) for r in memory.tolist()]
    labels = labels.tolist()
    out = []
    for q in (unit(r) for r in queries.tolist()):
        sims = sorted(((sum(a * b for a, b in zip(q, m)), i) for i, m in enumerate(memory)), reverse=True)
        votes = [0.0] * num_classes
        for s, i in sims[:k]:
            votes[labels[i]] += math.exp(s / temperature)
        out.append(votes)
    return out


def ranked(votes):
    """Classes by decreasing score, the lowest index first among equal scores."""
    return sorted(range(len(votes)), key=lambda c: (-votes[c], c))


def tiny(num_classes=4, n=30, m=12, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, num_classes, (n,), generator=g),
            torch.randn(m, d, generator=g, dtype=dtype), torch.randint(0, num_classes, (m,), generator=g))


@pytest.mark.parametrize("k", [1, 5, 29, 30, 50])  # k >= N: every memory row votes
@pytest.mark.parametrize("num_classes", [4, 7])
def test_matches_the_plain_loop_reference(k, num_classes):
    memory, labels, queries, targets = tiny(num_classes)
    ref = reference_scores(memory, labels, queries, num_classes, k, 0.07)
    scores = knn_predict(memory, labels, queries, num_classes, k=k, temperature=0.07)
    assert scores.dtype == torch.float64 and scores.shape == (12, num_classes)
    torch.testing.assert_close(scores, torch.tensor(ref, dtype=torch.float64), rtol=1e-10, atol=0)
    top1 = 100 * sum(ranked(v)[0] == t for v, t in zip(ref, targets.tolist())) / 12
    top5 = 100 * sum(t in ranked(v)[:min(5, k)] for v, t in zip(ref, targets.tolist())) / 12
    result = knn_top1(memory, labels, queries, targets, num_classes, k=k, temperature=0.07)
    assert result.top1 == pytest.approx(top1) and result.top5 == pytest.approx(top5)
    # float32 features: float32 arithmetic, the same votes to float32 precision
    scores32 = knn_predict(memory.float(), labels, queries.float(), num_classes, k=k)
    assert scores32.dtype == torch.float32
    torch.testing.assert_close(scores32.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-4, atol=0)


def test_defaults_are_dinos():
    memory, labels, queries, _ = tiny(n=40)
    ref = reference_scores(memory, labels, queries, 4, 20, 0.07)
    torch.testing.assert_close(knn_predict(memory, labels, queries, 4), torch.tensor(ref, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunking_does_not_change_the_result(dtype):
    memory, labels, queries, targets = tiny(dtype=dtype)
    whole = knn_predict(memory, labels, queries, 4, k=5, chunk=12)
    for chunk in (1, 3, 5, 12, 1000):
        torch.testing.assert_close(knn_predict(memory, labels, queries, 4, k=5, chunk=chunk), whole)
        assert knn_top1(memory, labels, queries, targets, 4, k=5, chunk=chunk) == \
            knn_top1(memory, labels, queries, targets, 4, k=5, chunk=12)


def clusters(per_class=100, num_classes=4, d=8, seed=1):
    """Well-separated classes: unit centres along the first axes plus small noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = torch.eye(d)[labels] + 0.05 * torch.randn(len(labels), d, generator=g)
    return features, labels


def test_separated_clusters_are_all_right_and_shuffled_labels_are_chance():
    memory, labels = clusters(seed=1)
    queries, targets = clusters(seed=2)
    assert knn_top1(memory, labels, queries, targets, 4) == (100.0, 100.0)
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]
    top1, top5 = knn_top1(memory, shuffled, queries, targets, 4)
    assert 15 < top1 < 35  # chance is 25 %
    assert top5 == 100.0  # min(5, k) >= 4 classes


def test_unknown_labels_are_refused_in_one_line():
    memory, labels, queries, targets = tiny()
    labels[3] = -1
    with pytest.raises(KdscaleError, match=r"1 memory and 0 query row\(s\).*-1 = unknown") as err:
        knn_top1(memory, labels, queries, targets, 4)
    assert "\n" not in str(err.value)
    targets[0] = 4  # out of range for 4 classes
    with pytest.raises(KdscaleError, match=r"1 memory and 1 query"):
        knn_top1(memory, labels, queries, targets, 4)
    with pytest.raises(KdscaleError, match="empty"):
        knn_predict(memory[:0], labels[:0], queries, 4)


# Two ranks with different numbers of memory rows and queries; their concatenation in rank order is `tiny()`.
SPLIT_MEMORY, SPLIT_QUERIES = 17, 7


def _rank(rank: int, store_path: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    ctx = DistContext(rank, 2, rank, torch.device("cpu"))
    memory, labels, queries, targets = tiny(num_classes=7)
    mem = slice(0, SPLIT_MEMORY) if rank == 0 else slice(SPLIT_MEMORY, None)
    qry = slice(0, SPLIT_QUERIES) if rank == 0 else slice(SPLIT_QUERIES, None)
    results = {}
    for k in (5, 30, 50):
        for dtype in (torch.float64, torch.float32):
            results[(k, str(dtype))] = tuple(knn_top1_distributed(
                ctx, memory[mem].to(dtype), labels[mem], queries[qry].to(dtype), targets[qry], 7, k=k, chunk=3))
    bad = labels[mem].clone()
    if rank == 1:
        bad[0] = -1  # only rank 1 sees it; both ranks must refuse (neither waits in a collective)
    try:
        knn_top1_distributed(ctx, memory[mem], bad, queries[qry], targets[qry], 7)
        results["refused"] = ""
    except KdscaleError as err:
        results["refused"] = str(err)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    mp.start_processes(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    memory, labels, queries, targets = tiny(num_classes=7)
    for k in (5, 30, 50):
        for dtype in (torch.float64, torch.float32):
            one = tuple(knn_top1(memory.to(dtype), labels, queries.to(dtype), targets, 7, k=k))
            assert r0[(k, str(dtype))] == r1[(k, str(dtype))] == one, (k, dtype)
    assert "1 memory and 0 query row(s)" in r0["refused"] and r0["refused"] == r1["refused"]
