"""``kdscale plan`` with several frozen teachers: every online teacher's bytes under the row's
placement (4Ψ replicated; its partition Ψ/N plus what ZeRO-3 keeps whole under zero3), a
replayed teacher none, the configured mix of placements as its own row, every teacher's
outputs in the measured activations, and nothing refused."""

from __future__ import annotations

import math

import pytest
import yaml
from helpers.common import ROOT

from kdscale.config import load_config
from kdscale.planning.memory import plan_config
from kdscale.planning.report import format_plan

BASE = f"{ROOT}/configs/kd_cifar100.yaml"
A, B = ("a", "resnet32x4"), ("b", "wrn_40_2")


def config(tmp_path, teachers: list[dict], *overrides: str):
    """configs/kd_cifar100.yaml (resnet8x4 student) with ``teachers`` in place of its teacher."""
    raw = yaml.safe_load(open(BASE))
    del raw["teacher"]
    raw["teachers"] = teachers
    path = tmp_path / "teachers.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(str(path), list(overrides))


def row(plan, strategy: str, placement: str):
    return next(r for r in plan.rows if (r.strategy, r.teacher_sharding) == (strategy, placement))


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan-teachers")
    two = config(tmp, [{"id": tid, "name": name} for tid, name in (A, B)])
    singles = {tid: config(tmp, [{"id": tid, "name": name}]) for tid, name in (A, B)}
    return two, {gpus: plan_config(two, gpus) for gpus in (2, 4)}, {tid: plan_config(cfg, 4)
                                                                    for tid, cfg in singles.items()}


def test_two_online_teachers_are_both_counted(plans):
    cfg, two, single = plans
    sizes = two[4].sizes
    assert [(t.id, t.name, t.sharding) for t in sizes.teachers] == [("a", "resnet32x4", "replicated"),
                                                                   ("b", "wrn_40_2", "replicated")]
    params = {t.id: t.parameters for t in sizes.teachers}
    assert params == {"a": 7_433_860, "b": 2_255_156}
    assert sizes.teacher == sum(params.values())
    buffers = sum(t.buffer_bytes for t in sizes.teachers)
    for strategy in ("ddp", "zero1", "zero2", "zero3"):
        # Replicated: each teacher's 4 bytes per parameter, plus its BN buffers; the sum of the single-teacher plans.
        replicated = row(two[4], strategy, "replicated")
        assert replicated.teacher == buffers + 4 * sum(params.values())
        assert replicated.teacher == sum(row(single[tid], strategy, "replicated").teacher for tid in params)
    for gpus, plan in two.items():
        # ZeRO-3: each teacher's partition, its persistent tensors, and one forward's working set (the larger).
        zero3 = row(plan, "ddp", "zero3")
        live = max(min(t.parameters - t.persistent, t.largest_module + 50_000_000) for t in sizes.teachers)
        assert zero3.teacher == buffers + 4 * (sum(math.ceil(t.parameters / gpus) + t.persistent
                                                   for t in sizes.teachers) + live)
    assert row(two[2], "ddp", "zero3").teacher - row(two[4], "ddp", "zero3").teacher == 4 * sum(
        math.ceil(p / 2) - math.ceil(p / 4) for p in params.values())
    # Each ZeRO-3 teacher all-gathers its weights every micro-batch: both add to the step's communication.
    comm = row(two[4], "ddp", "zero3").comm_bytes - row(two[4], "ddp", "replicated").comm_bytes
    assert comm == pytest.approx(4 * 0.75 * sum(params.values()), abs=4)


def test_both_teachers_run_in_the_activation_measurement(plans):
    """The step keeps both teachers' logits and their mean: more bytes per sample than with either alone."""
    _, two, single = plans
    assert two[4].activation.per_sample > max(p.activation.per_sample for p in single.values())


def test_two_teachers_refuse_nothing_and_are_listed(plans):
    cfg, two, _ = plans
    plan = two[4]
    assert [(r.strategy, r.teacher_sharding) for r in plan.rows] == [
        (s, t) for s in ("ddp", "zero1", "zero2", "zero3") for t in ("replicated", "zero3")]
    assert all(plan.fits(r) for r in plan.rows)
    text = format_plan(plan, cfg, "teachers.yaml")
    assert ("frozen teachers a (resnet32x4): 7.43 M parameters (replicated), b (wrn_40_2): 2.26 M parameters "
            "(replicated)") in text
    assert "\n*ddp    replicated" in text


def test_configured_mix_of_placements_is_a_row(tmp_path):
    """a under ZeRO-3, b replicated: the ``mixed`` rows count each as configured, and are the config's."""
    cfg = config(tmp_path, [{"id": "a", "name": "resnet8x4", "sharding": "zero3"}, {"id": "b", "name": "resnet20"}],
                 "data.image_size=16")
    plan = plan_config(cfg, 2)
    assert {r.teacher_sharding for r in plan.rows} == {"replicated", "zero3", "mixed"}
    a, b = plan.sizes.teachers
    mixed = row(plan, "zero2", "mixed")
    live = min(a.parameters - a.persistent, a.largest_module + 50_000_000)
    assert mixed.teacher == a.buffer_bytes + b.buffer_bytes + 4 * (
        math.ceil(a.parameters / 2) + a.persistent + live + b.parameters)
    assert "\n*ddp    mixed" in format_plan(plan, cfg, None)


def test_a_replayed_teacher_holds_nothing(tmp_path):
    """An online teacher beside one replayed from its output shards: only the online one is counted."""
    cfg = config(tmp_path, [{"id": "a", "name": "resnet20"}, {"id": "r", "source": "shards", "outputs": "unused"}],
                 "data.image_size=16", "data.augment=imagenet")
    plan = plan_config(cfg, 2)
    online, replayed = plan.sizes.teachers
    assert replayed.replayed and replayed.parameters == 0 and online.parameters == 278_324
    assert row(plan, "ddp", "replicated").teacher == online.buffer_bytes + 4 * online.parameters
    assert "r (?): replayed from shards, no parameters" in format_plan(plan, cfg, None)
