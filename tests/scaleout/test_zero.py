"""Scale-out with real processes (2 ranks, gloo, CPU): DDP and DeepSpeed ZeRO-1/2/3 match a
single rank, shard optimizer state and parameters, shard a frozen teacher, resume after a
crash, and end a job whose rank failed."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers.common import ROOT, base_overrides, make_config, run_cli
from helpers.scaleout import ACCELERATE, declare

from kdscale.config import load_config
from kdscale.engines.deepspeed_config import build_deepspeed_config
from kdscale.errors import KdscaleError
from kdscale.models import build_model
from kdscale.train.loop import Trainer

pytestmark = pytest.mark.slow  # real multi-process runs: the full tier only

COMBOS = [("ddp", "kd"), ("zero1", "kd"), ("zero2", "kd"), ("zero3", "kd"), ("ddp", "prokt"), ("zero2", "prokt"),
          ("ddp", "ctkd"), ("zero2", "ctkd")]


FFL_CASES = {strategy: ("train", strategy, "ffcl", "share_trunk=true") for strategy in ("ddp", "zero2")}
declare((1, 2), *(("train", strategy, method) for strategy, method in COMBOS))
declare(2, ("teacher",), *FFL_CASES.values())


@pytest.fixture(scope="module")
def engine_runs(probes):
    """Every combination on 1 and on 2 ranks, and (2 ranks) the ZeRO-3 frozen teacher and FFL's
    shared trunk (the suite's pooled probe launches, one per rank count)."""
    runs = {(strategy, method, ranks): probes(ranks, "train", strategy, method)
            for strategy, method in COMBOS for ranks in (1, 2)}
    runs["teacher"] = probes(2, "teacher")
    for strategy, case in FFL_CASES.items():
        runs["ffl", strategy] = probes(2, *case)
    return runs


@pytest.mark.parametrize("strategy, method", COMBOS)
def test_two_ranks_match_one_rank(engine_runs, strategy, method):
    """Same seed, data and global batch (8 = 1 x 8 = 2 x 4): the first 5 global losses agree
    to 1e-5 relative (fp32 reduction order is the only difference)."""
    one, two = engine_runs[strategy, method, 1][0]["losses"], engine_runs[strategy, method, 2][0]["losses"]
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5)
    assert one[-1] < one[0]  # it trains


@pytest.mark.parametrize("strategy, method", [("zero1", "kd"), ("zero2", "kd"), ("zero3", "kd"), ("zero2", "prokt")])
def test_zero_halves_optimizer_state(engine_runs, strategy, method):
    ddp = engine_runs["ddp", method, 2]
    zero = engine_runs[strategy, method, 2]
    for rank in range(2):
        ratio = zero[rank]["optimizer_state_bytes"] / ddp[rank]["optimizer_state_bytes"]
        assert 0.45 < ratio < 0.55, (strategy, rank, ratio)
    # ProKT: both its networks (student and trained teacher) are in ZeRO engines.
    assert zero[0]["trainable_parameters"] == ddp[0]["trainable_parameters"]


def test_ctkd_shared_stem_is_one_set_of_parameters(engine_runs):
    """CTKD's student and scratch-teacher branches share the stem (conv1: 16x3x3x3 + 16): the
    optimizers hold it once under DDP (every rank) and ZeRO-2 (the partitions add up to it)."""
    stem = 16 * 3 * 3 * 3 + 16
    for ranks in (1, 2):
        for rank_result in engine_runs["ddp", "ctkd", ranks]:
            assert rank_result["per_network_parameters"] == rank_result["trainable_parameters"] + stem
            assert rank_result["optimizer_parameters"] == rank_result["trainable_parameters"]
    zero = engine_runs["zero2", "ctkd", 2]
    held = sum(rank_result["optimizer_parameters"] for rank_result in zero)
    assert zero[0]["trainable_parameters"] <= held < zero[0]["trainable_parameters"] + stem


def test_ffl_shared_trunk_is_one_set_of_parameters(engine_runs):
    """FFL's two branches share the trunk (the probe network's conv1 16x3x3x3 + 16 and layer1
    16x16x3x3 + 16): held once by the optimizers under DDP (every rank) and ZeRO-2 (the
    partitions add up to it), and the branches train."""
    trunk = (16 * 3 * 3 * 3 + 16) + (16 * 16 * 3 * 3 + 16)
    for rank_result in engine_runs["ffl", "ddp"]:
        assert rank_result["per_network_parameters"] == rank_result["trainable_parameters"] + trunk
        assert rank_result["optimizer_parameters"] == rank_result["trainable_parameters"]
    zero = engine_runs["ffl", "zero2"]
    held = sum(rank_result["optimizer_parameters"] for rank_result in zero)
    assert zero[0]["trainable_parameters"] <= held < zero[0]["trainable_parameters"] + trunk
    for run in (engine_runs["ffl", "ddp"], engine_runs["ffl", "zero2"]):
        assert run[0]["losses"][-1] < run[0]["losses"][0]


def test_zero3_partitions_trained_parameters(engine_runs):
    for method in ("kd",):
        for rank_result in engine_runs["zero3", method, 2]:
            share = rank_result["local_parameters"] / rank_result["trainable_parameters"]
            assert 0.45 < share < 0.55
        for rank_result in engine_runs["zero2", method, 2]:
            assert rank_result["local_parameters"] == rank_result["trainable_parameters"]


def test_zero3_frozen_teacher(engine_runs):
    for result in engine_runs["teacher"]:
        assert 0.45 < result["local_parameters"] / result["total_parameters"] < 0.55
        assert result["max_abs_diff"] < 1e-5  # same outputs as the unsharded teacher
        assert result["feature_shape"] == [4, 32, 8, 8]  # hooks still tap features


def test_zero3_teacher_is_built_partitioned(engine_runs):
    """Built under zero.Init with its weights loaded one submodule at a time, the teacher gives
    the unsharded teacher's outputs, and a rank never held it whole: its peak is its half
    plus about one layer (16 equal layers: at most 1/2 + 1/16 + rounding), where building it
    whole holds all of it."""
    for result in engine_runs["teacher"]:
        assert result["built_max_abs_diff"] < 1e-5
        assert result["built_feature_shape"] == [4, 32, 8, 8]
        assert 0.45 < result["built_local_parameters"] / result["total_parameters"] < 0.55
        total, layer = result["stack_parameters"], result["stack_layer_parameters"]
        assert result["whole_build_peak"] == total
        assert result["partitioned_build_peak"] <= total // 2 + layer + 16, result
        assert result["partitioned_build_peak"] >= total // 2  # the partitions are counted


@pytest.fixture()
def kd_overrides(synth_data, tmp_path):
    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(build_model("resnet20", 10).state_dict(), teacher)

    def make(name, *extra):
        return base_overrides(synth_data, str(tmp_path / "runs"), name=name) + [
            "method.name=kd", "student.name=resnet8", "teacher.name=resnet20", f"teacher.weights={teacher}",
            "data.train_samples=640", "train.epochs=2", "data.num_workers=1", "train.log_every_steps=1",
            "distributed.strategy=zero3", *extra]
    return make


def losses_by_step(run_dir):
    out = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        entry = json.loads(line)
        if "train/loss" in entry:
            out.setdefault(entry["step"], []).append(entry["train/loss"])
    return out


def test_crash_ends_job_and_resume_reproduces(kd_overrides, tmp_path):
    launch = ["bash", ACCELERATE, "-m", "kdscale.train"]
    straight = run_cli(launch + kd_overrides("straight"), timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    crashed = run_cli(launch + kd_overrides("resumed", "train.checkpoint_every_steps=3"), timeout=600,
                      env_extra={"KDSCALE_FAIL_AT_STEP": "14", "KDSCALE_FAIL_RANK": "1"})
    assert crashed.returncode != 0
    assert "kdscale: rank 1 failed: RuntimeError: injected failure at step 14" in crashed.stderr
    run_dir = tmp_path / "runs" / "resumed"
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-00000010", "step-00000012"]
    resumed = run_cli(launch + kd_overrides("resumed", "train.checkpoint_every_steps=3"), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 12 (epoch 1, batch 2)" in resumed.stdout
    reference, replayed = losses_by_step(tmp_path / "runs" / "straight"), losses_by_step(run_dir)
    assert sorted(reference) == sorted(replayed) == list(range(1, 21))
    for step, values in replayed.items():
        for value in values:  # steps 13-14 ran twice: before the crash and after the resume
            assert value == pytest.approx(reference[step][0], rel=1e-4), step
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["completed"] and summary["strategy"] == "zero3" and summary["step"] == 20
    student = build_model("resnet8", 10, summary["export"])  # the gathered export loads into the plain model
    assert sum(p.numel() for p in student.parameters()) > 0


def test_zero3_teacher_run_equals_replicated_teacher(kd_overrides, tmp_path):
    """kdscale.train on 2 ranks with the frozen teacher built partitioned (ZeRO-3) gives the
    losses of the replicated teacher, and so do two copies of it, one partitioned and one
    replicated (their ensemble is the teacher); SOKD, whose bridge is built from the teacher's
    layers, trains from the partitioned teacher's shape twin."""
    launch = ["bash", ACCELERATE, "-m", "kdscale.train"]
    runs = {}
    teacher = tmp_path / "teacher.pt"  # written by the kd_overrides fixture
    # Two copies of the teacher, one partitioned and one replicated: their ensemble is the teacher.
    pair = (f"teachers=[{{name: resnet20, weights: {teacher}, sharding: zero3}}, "
            f"{{name: resnet20, weights: {teacher}, sharding: replicated}}]")
    for name, method, sharding, *extra in (("replicated", "kd", "replicated"), ("sharded", "kd", "zero3"),
                                           ("sokd", "sokd", "zero3"), ("pair", "kd", "replicated", pair)):
        overrides = kd_overrides(name, "distributed.strategy=ddp", f"method.name={method}",
                                 f"distributed.teacher_sharding={sharding}", "train.stop_after_steps=4", *extra)
        if extra:
            overrides = [o for o in overrides if not o.startswith("teacher.")]
        result = run_cli(launch + overrides, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = losses_by_step(tmp_path / "runs" / name)
    assert sorted(runs["replicated"]) == sorted(runs["sharded"]) == sorted(runs["pair"]) == [1, 2, 3, 4]
    for step, values in runs["sharded"].items():
        assert values[0] == pytest.approx(runs["replicated"][step][0], rel=1e-5), step
        assert runs["pair"][step][0] == pytest.approx(runs["replicated"][step][0], rel=1e-5), step
    assert sorted(runs["sokd"]) == [1, 2, 3, 4] and all(v[0] == v[0] for v in runs["sokd"].values())


def test_deepspeed_config_conflicts(tmp_path):
    def ds_file(content):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(content))
        return str(path)

    cases = [
        ({"train_micro_batch_size_per_gpu": 16}, "train_micro_batch_size_per_gpu=16 conflicts with data.batch_size=32"),
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 conflicts with train.grad_accum_steps=1"),
        ({"bf16": {"enabled": True}}, "bf16.enabled is true; kdscale applies mixed precision itself"),
        ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
        ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3 conflicts with the requested ZeRO stage 2"),
    ]
    for content, message in cases:
        cfg = load_config(None, ["data.batch_size=32", f"distributed.deepspeed_config={ds_file(content)}"])
        with pytest.raises(KdscaleError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build_deepspeed_config(cfg, stage=2, world_size=2)
    cfg = load_config(None, ["data.batch_size=32", f"distributed.deepspeed_config={ROOT}/configs/deepspeed/zero2.json"])
    ds = build_deepspeed_config(cfg, stage=2, world_size=2)
    assert ds["train_batch_size"] == 64 and ds["zero_optimization"]["stage"] == 2


def test_resume_refuses_another_strategy(synth_data, tmp_path):
    Trainer(make_config(synth_data, str(tmp_path), "student.name=resnet8", "data.train_samples=128",
                        "train.stop_after_steps=2", name="ddp-run")).train()
    with pytest.raises(KdscaleError, match="was written under ddp, this run uses zero2; resume with "
                                           "distributed.strategy=ddp"):
        Trainer(make_config(synth_data, str(tmp_path), "student.name=resnet8", "data.train_samples=128",
                            "distributed.strategy=zero2", name="ddp-run"))


def test_zero3_teacher_needs_two_processes(synth_data, tmp_path):
    cfg = make_config(synth_data, str(tmp_path), "method.name=kd", "student.name=resnet8", "teacher.name=resnet20",
                      "distributed.teacher_sharding=zero3")
    with pytest.raises(KdscaleError, match="partitions the teacher across processes, but this run has 1"):
        Trainer(cfg)


def test_accelerate_deepspeed_config_file_selects_zero(synth_data, tmp_path):
    """The standard launch flags: accelerate's DeepSpeed config picks the strategy (auto)."""
    command = [os.path.join(ROOT, ".venv", "bin", "accelerate"), "launch", "--config_file",
               os.path.join(ROOT, "configs", "accelerate", "deepspeed.yaml"), "--num_processes", "2",
               "--main_process_port", "0", "-m", "kdscale.train",
               *base_overrides(synth_data, str(tmp_path), name="acc"), "student.name=resnet8",
               "data.train_samples=128", "data.num_workers=1"]
    result = run_cli(command, env_extra={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.load(open(tmp_path / "acc" / "summary.json"))
    assert summary["strategy"] == "zero2" and summary["world_size"] == 2 and summary["completed"]
