"""CRD: the loss and bank update against a plain-Python reference of RepDistiller's formulas,
gradient routing, the negatives' law and determinism, the dataset indices the loader gives,
2 ranks = 1 rank under DDP and ZeRO-2 (real processes), and a resumed run's banks."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from helpers.common import base_overrides
from helpers.methods import (
    NUM_CLASSES,
    TRAIN_SAMPLES,
    batch,
    build_method,
    has_grad_from,
    no_grad_from,
)
from helpers.reference_crd import crd_step
from helpers.scaleout import declare

from kdscale import checkpoints as ckpt
from kdscale.data.loader import TrainStream
from kdscale.data.sample_index import sample_offsets, scan_labels, shard_labels
from kdscale.data.tar_reader import iter_samples
from kdscale.errors import KdscaleError
from kdscale.methods.contrast_memory import ContrastSampler, uniform_integers
from kdscale.models import build_model
from kdscale.train.__main__ import main as train_main

SMALL = {"feat_dim": 8, "nce_k": 6}


def _embeddings(method):
    """Record what the two embedding heads output in the next forward."""
    seen = {}
    for name in ("embed_student", "embed_teacher"):
        getattr(method, name).register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
    return seen


def _rows(t):
    return t.detach().double().tolist()


def _embedding(features, head) -> list[list[float]]:
    """RepDistiller's Embed in plain floats: ``l2(W f + b)`` of the flattened features."""
    weight, bias = _rows(head.linear.weight), head.linear.bias.detach().double().tolist()
    rows = []
    for f in features.detach().double().flatten(1).tolist():
        v = [sum(w * x for w, x in zip(w_row, f)) + b for w_row, b in zip(weight, bias)]
        norm = sum(x * x for x in v) ** 0.5
        rows.append([x / norm for x in v])
    return rows


def test_loss_and_banks_match_the_reference_over_two_steps():
    method, frozen = build_method("crd", teacher="resnet20", **SMALL)
    assert method.features.student_layers == method.features.teacher_layers == ["avgpool"]  # RepDistiller's feat[-1]
    seen = _embeddings(method)
    pooled = {}
    method.student.avgpool.register_forward_hook(lambda _m, _i, out: pooled.__setitem__("student", out))
    bank_s, bank_t = _rows(method.memory.student), _rows(method.memory.teacher)
    z = None
    for step, indices in enumerate(([3, 17, 42, 60], [3, 5, 17, 63])):  # rows 3 and 17 updated in step 0
        images, _ = batch(4, seed=step + 1)
        indices = torch.tensor(indices)
        targets = indices % NUM_CLASSES
        teacher_output = frozen(images)
        _, terms = method.forward_train(images, targets, teacher_output, sample_indices=indices)
        v_s = _embedding(pooled["student"], method.embed_student)  # the student's features through its head,
        v_t = _embedding(teacher_output.features["avgpool"], method.embed_teacher)  # the teacher's through its own
        assert torch.allclose(torch.tensor(v_s, dtype=torch.double), seen["embed_student"].double(), atol=1e-5)
        assert torch.allclose(torch.tensor(v_t, dtype=torch.double), seen["embed_teacher"].double(), atol=1e-5)
        contrast = torch.cat([indices[:, None], method.sampler(step, indices, SMALL["nce_k"])], 1).tolist()
        loss, z, bank_s, bank_t = crd_step(bank_s, bank_t, v_s, v_t, contrast, z, temperature=0.07, momentum=0.5)
        assert terms["crd"].item() == pytest.approx(0.8 * loss, rel=1e-5)
        assert (method.memory.z_student, method.memory.z_teacher) == pytest.approx(z, rel=1e-5)
        assert torch.allclose(method.memory.student.double(), torch.tensor(bank_s, dtype=torch.double), atol=1e-6)
        assert torch.allclose(method.memory.teacher.double(), torch.tensor(bank_t, dtype=torch.double), atol=1e-6)
    assert method.memory.draws == 2


def test_gradient_routing():
    method, frozen = build_method("crd", teacher="resnet20", kd_weight=1.0, **SMALL)
    images, _ = batch(4)
    indices = torch.tensor([1, 2, 3, 4])
    _, terms = method.forward_train(images, indices % NUM_CLASSES, frozen(images), sample_indices=indices)
    assert has_grad_from(terms["crd"], method.student)
    assert has_grad_from(terms["crd"], method.embed_student) and has_grad_from(terms["crd"], method.embed_teacher)
    for term in ("ce", "kd"):
        assert has_grad_from(terms[term], method.student)
        assert no_grad_from(terms[term], method.embed_student) and no_grad_from(terms[term], method.embed_teacher)
    assert set(method.trained_networks()) == {"student", "embed_student", "embed_teacher"}


def test_other_class_negatives_are_uniform_over_the_other_classes():
    labels = torch.arange(TRAIN_SAMPLES) % NUM_CLASSES
    sampler = ContrastSampler(labels, "other_class", seed=5)
    anchor = torch.tensor([13])  # class 3: rows 3, 13, ..., 63 (7 of 64)
    drawn = sampler(0, anchor.repeat(1), 57_000)[0]
    assert not (labels[drawn] == 3).any()
    counts = torch.bincount(drawn, minlength=TRAIN_SAMPLES)
    others = counts[labels != 3].double()
    assert len(others) == 57 and others.min() > 0.85 * 1000 and others.max() < 1.15 * 1000
    uniform = ContrastSampler(labels, "uniform", seed=5)(0, anchor, 64_000)[0]
    assert torch.bincount(uniform, minlength=TRAIN_SAMPLES).min() > 850  # every sample, its own class too


def test_negatives_are_a_function_of_seed_draw_and_index_only():
    sampler = ContrastSampler(torch.arange(TRAIN_SAMPLES) % NUM_CLASSES, "other_class", seed=1)
    both = sampler(4, torch.tensor([7, 30]), 50)
    assert torch.equal(both, sampler(4, torch.tensor([7, 30]), 50))  # deterministic
    assert torch.equal(both[1], sampler(4, torch.tensor([30]), 50)[0])  # the batch around it does not matter
    assert torch.equal(both.flip(0), sampler(4, torch.tensor([30, 7]), 50))
    assert not torch.equal(both, sampler(5, torch.tensor([7, 30]), 50))  # a new draw each step
    other_seed = ContrastSampler(torch.arange(TRAIN_SAMPLES) % NUM_CLASSES, "other_class", seed=2)
    assert not torch.equal(both, other_seed(4, torch.tensor([7, 30]), 50))
    ints = uniform_integers(0, 0, torch.arange(1000), 100, torch.full((1000,), 10))
    assert ints.min() == 0 and ints.max() == 9 and abs(ints.double().mean().item() - 4.5) < 0.05


def test_indices_number_the_samples_in_index_json_order(synth_data):
    shards = sorted(glob.glob(os.path.join(synth_data, "train-*.tar")))
    offsets, total = sample_offsets(shards)
    assert total == 1600 and sorted(offsets.values()) == list(range(0, 1600, 200))
    expected_index, expected_label = {}, []
    for shard in sorted(shards, key=lambda s: offsets[os.path.basename(s)]):
        for position, sample in enumerate(iter_samples(shard)):
            expected_index[sample["__key__"]] = offsets[os.path.basename(shard)] + position
            expected_label.append(int(sample["cls"]))
        assert shard_labels(shard) == expected_label[offsets[os.path.basename(shard)]:]
    scanned = []  # the trainer passes its stall watchdog's progress: a long scan is no stall
    labels = scan_labels(shards, offsets, total, on_shard=lambda: scanned.append(1))
    assert labels.tolist() == expected_label and len(scanned) == 8
    from kdscale.config import load_config

    data = load_config(None, base_overrides(synth_data, "/tmp/unused")).data
    stream = TrainStream(shards, data, seed=0, epoch=0, rank=0, world_size=1, batches_per_rank=50,
                         sample_offsets=offsets)
    seen = []
    for b in stream:
        assert [expected_index[k] for k in b.keys] == b.indices.tolist()
        assert torch.equal(labels[b.indices], b.targets)
        seen += b.indices.tolist()
    # An epoch streams 1600 samples through a 256-sample shuffle buffer over cycling shards,
    # so a few come twice and as many wait for the next epoch; the numbers stay each sample's.
    assert len(seen) == 1600 and set(seen) <= set(range(1600)) and len(set(seen)) > 1300


def test_a_subset_of_the_shards_is_numbered_on_its_own(synth_data):
    shards = [os.path.join(synth_data, f"train-00000{i}.tar") for i in (5, 2)]
    assert sample_offsets(shards) == ({"train-000002.tar": 0, "train-000005.tar": 200}, 400)


def test_a_non_finite_step_leaves_the_banks_and_z_alone():
    """Under train.nonfinite=skip a step with a non-finite loss is dropped: its embeddings must
    not reach the banks, nor its scores set Z (a NaN row would poison every later loss)."""
    from kdscale.methods.contrast_memory import ContrastMemory

    memory = ContrastMemory(64, 4, seed=0)
    sampler = ContrastSampler(torch.arange(64) % NUM_CLASSES, "other_class", seed=0)
    before = memory.student.clone(), memory.teacher.clone()
    v = torch.nn.functional.normalize(torch.randn(4, 4), dim=1)
    broken = v.clone()
    broken[1] = float("nan")
    loss = memory.contrast_loss(broken, v, torch.tensor([1, 2, 3, 4]), sampler, 6, 0.07, 0.5)
    assert not torch.isfinite(loss)
    assert torch.equal(memory.student, before[0]) and torch.equal(memory.teacher, before[1])
    assert memory.z_student < 0 and memory.draws == 1
    loss = memory.contrast_loss(v, v, torch.tensor([1, 2, 3, 4]), sampler, 6, 0.07, 0.5)
    assert torch.isfinite(loss) and memory.z_student > 0 and not torch.equal(memory.student, before[0])


def test_shards_without_index_json_are_refused(tmp_path, synth_data):
    import shutil

    shutil.copy(os.path.join(synth_data, "train-000000.tar"), tmp_path / "train-000000.tar")
    with pytest.raises(KdscaleError, match="index.json"):
        sample_offsets([str(tmp_path / "train-000000.tar")])


def test_a_config_without_labels_is_refused():
    with pytest.raises(KdscaleError, match="labels"):
        from kdscale.methods import MethodContext, get_method_class

        cls = get_method_class("crd")
        context = MethodContext(num_classes=10, image_size=32, method_name="crd",
                                teacher_network=build_model("resnet20", 10), teacher_role="frozen")
        cls(build_model("resnet8", 10), cls.Params(), context)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("crd-teacher") / "resnet20.pt")
    torch.manual_seed(7)
    torch.save(build_model("resnet20", 10).state_dict(), path)
    return path


def _crd_run(synth_data, out, teacher_file, *extra):
    return train_main(base_overrides(synth_data, str(out), name="crd") + [
        "method.name=crd", "student.name=resnet8", "teacher.name=resnet20", f"teacher.weights={teacher_file}",
        "data.train_samples=320", "train.epochs=1", "method.nce_k=64", "method.feat_dim=16",
        "train.checkpoint_every_steps=5", *extra])


@pytest.mark.slow
def test_a_resumed_run_restores_the_banks(synth_data, tmp_path, teacher_file):
    """Stopped after 7 steps and resumed from its step-5 checkpoint, a run ends with the banks
    (and Z, draw count, losses) of a run that never stopped."""
    straight = _crd_run(synth_data, tmp_path / "a", teacher_file)
    stopped = _crd_run(synth_data, tmp_path / "b", teacher_file, "train.stop_after_steps=7")
    assert stopped["step"] == 7 and not stopped["completed"]
    os.remove(stopped["checkpoint"])  # resume from step 5: two steps of bank updates to redo
    resumed = _crd_run(synth_data, tmp_path / "b", teacher_file)
    assert resumed["completed"] and resumed["step"] == straight["step"] == 10
    a = ckpt.load_latest_checkpoint(straight["run_dir"])[1]["method_state"]
    b = ckpt.load_latest_checkpoint(resumed["run_dir"])[1]["method_state"]
    assert a["draws"] == b["draws"] == 10 and (a["z_student"], a["z_teacher"]) == (b["z_student"], b["z_teacher"])
    assert torch.equal(a["student"], b["student"]) and torch.equal(a["teacher"], b["teacher"])
    assert a["student"].shape == (1600, 16)


PROBE_ARGS = ("crd", "nce_k=20", "feat_dim=16", "student_layer=layer2", "teacher_layer=layer2")
declare((1, 2), *(("train", strategy, *PROBE_ARGS) for strategy in ("ddp", "zero2")))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_two_ranks_equal_one(probes, strategy):
    """The probe's BN-free nets on a global batch of 8 split over 2 ranks: the same losses,
    banks and Z as 1 rank (DDP), and ZeRO-2 trains to the same numbers."""
    one, (two, _) = probes(1, "train", strategy, *PROBE_ARGS)[0], probes(2, "train", strategy, *PROBE_ARGS)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["gathered_state_scalars"] == pytest.approx(one["gathered_state_scalars"], rel=1e-6)
    assert two["gathered_state_sums"] == pytest.approx(one["gathered_state_sums"], rel=1e-5)
    for bank in ("student", "teacher"):  # row by row: rank 0 reassembles the shards in dataset order
        assert two["gathered_state_values"][bank] == pytest.approx(one["gathered_state_values"][bank], abs=1e-5)


def test_banks_restore_on_another_rank_count():
    """A checkpoint holds the banks whole; each rank of any count takes its rows back, and the
    shards of every count start from the same rows."""
    from kdscale.methods.contrast_memory import ContrastMemory

    whole = ContrastMemory(50, 4, seed=3)
    whole.student.add_(1.0)  # as if trained
    whole.z_student, whole.z_teacher, whole.draws = 7.0, 8.0, 9
    state = whole.gathered()
    for world in (2, 3):
        for rank in range(world):
            shard = ContrastMemory(50, 4, seed=3, rank_and_world=(rank, world))
            assert torch.equal(shard.teacher, whole.teacher[rank::world])  # same initial rows on any count
            shard.restore(state)
            assert torch.equal(shard.student, whole.student[rank::world])
            assert (shard.z_student, shard.z_teacher, shard.draws) == (7.0, 8.0, 9)
    with pytest.raises(KdscaleError, match="feat_dim"):
        ContrastMemory(50, 8, seed=3).restore(state)


def test_chunked_nce_gradient_is_the_formula_s():
    """HeldPairsNCE keeps d loss / d anchors from its forward: it equals autograd's over the
    plain formula, and passes gradcheck (chunks smaller than the pairs, so several are summed)."""
    from kdscale.methods import contrast_memory as cm

    gen = torch.Generator().manual_seed(0)
    anchors = torch.randn(5, 4, dtype=torch.double, generator=gen, requires_grad=True)
    bank = torch.randn(30, 4, dtype=torch.double, generator=gen)
    sample = torch.arange(5).repeat_interleave(7)
    row = torch.randint(0, 30, (35,), generator=gen)
    positive = torch.arange(35) % 7 == 0
    args = (bank, sample, row, positive, 3.0, 0.5, 6, 30)
    old, cm.PAIRS_PER_CHUNK = cm.PAIRS_PER_CHUNK, 8
    try:
        assert torch.autograd.gradcheck(lambda a: cm.HeldPairsNCE.apply(a, *args), (anchors,))
        chunked = torch.autograd.grad(cm.HeldPairsNCE.apply(anchors, *args), anchors)[0]
    finally:
        cm.PAIRS_PER_CHUNK = old
    p = torch.exp((bank[row] * anchors[sample]).sum(1) / 0.5) / 3.0
    noise = 6 / 30
    plain = -torch.where(positive, torch.log(p / (p + noise + 1e-7)), torch.log(noise / (p + noise + 1e-7))).sum()
    assert torch.allclose(cm.HeldPairsNCE.apply(anchors, *args), plain)
    assert torch.allclose(chunked, torch.autograd.grad(plain, anchors)[0])


def test_relaxed_positives_are_same_class_samples():
    """``positive: relax`` (RepDistiller's --mode relax): column 0 is a sample of the anchor's
    class, itself included, drawn uniformly and deterministically; ``exact`` is the sample itself."""
    labels = torch.arange(TRAIN_SAMPLES) % NUM_CLASSES
    sampler = ContrastSampler(labels, "other_class", seed=3)
    # the same anchor over 7000 steps (a draw is a function of seed, step and index)
    drawn = torch.cat([sampler.positives(draw, torch.tensor([13]), "relax") for draw in range(7000)])
    assert (labels[drawn] == 3).all()
    counts = torch.bincount(drawn, minlength=TRAIN_SAMPLES)[labels == 3]  # 3, 13, ..., 63: 7 samples
    assert len(counts) == 7 and counts.min() > 850
    again = torch.cat([sampler.positives(draw, torch.tensor([13]), "relax") for draw in range(5)])
    assert torch.equal(drawn[:5], again)
    assert torch.equal(sampler.positives(0, torch.tensor([5, 9]), "exact"), torch.tensor([5, 9]))
    method, frozen = build_method("crd", teacher="resnet20", positive="relax", **SMALL)
    images, _ = batch(4)
    indices = torch.tensor([1, 2, 3, 4])
    _, terms = method.forward_train(images, indices % NUM_CLASSES, frozen(images), sample_indices=indices)
    assert torch.isfinite(terms["crd"])
