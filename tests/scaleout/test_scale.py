"""kdscale at the scale it claims, simulated here: 4 and 8 gloo processes of tiny networks.

- The engines (DDP, ZeRO-1/2/3) compute on 4 and 8 ranks what they compute on 1 with the
  same global batch, for KD, CTKD (a second trained network sharing the stem) and CRD
  (per-sample state sharded over the ranks); the ZeRO-3 frozen teacher too.
- An 8-process ZeRO-3 KD run with a ZeRO-3 teacher over uneven shards (8 training shards,
  the last one short; 101 validation samples in 2 shards, so 6 ranks have none) trains in
  lock-step, scores every validation sample once and prints each warning once.
- A DDP run stopped on 8 processes resumes on 4 and then on 1, keeping its global batch,
  its place in the epoch, its schedule and its wandb run; a ZeRO checkpoint refuses
  another world size in one line that says what to do.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers.common import ROOT, run_cli
from helpers.scaleout import ACCELERATE, declare

from kdscale.config import load_config
from kdscale.runtime.optim import lr_at

pytestmark = pytest.mark.slow  # real multi-process runs: the full tier only

CRD = ("nce_k=20", "feat_dim=16", "student_layer=layer2", "teacher_layer=layer2")
CASES = {"ddp-kd": ("train", "ddp", "kd"), "zero1-kd": ("train", "zero1", "kd"), "zero2-kd": ("train", "zero2", "kd"),
         "zero3-kd": ("train", "zero3", "kd"), "zero2-ctkd": ("train", "zero2", "ctkd"),
         "ddp-crd": ("train", "ddp", "crd", *CRD), "zero2-crd": ("train", "zero2", "crd", *CRD)}
WORLDS = (4, 8)


declare(1, *CASES.values())
declare(WORLDS, *CASES.values(), ("teacher",))


@pytest.fixture(scope="module")
def probe_runs(probes):
    """Every case on 1, 4 and 8 ranks, and the ZeRO-3 teacher on 4 and 8 (the suite's pooled
    probe launches: one per rank count)."""
    runs = {(name, world): probes(world, *case) for name, case in CASES.items() for world in (1, *WORLDS)}
    runs.update({("teacher", world): probes(world, "teacher") for world in WORLDS})
    return runs


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", list(CASES))
def test_many_ranks_match_one_rank(probe_runs, case, world):
    """Global batch 8 = 1 x 8 = 4 x 2 = 8 x 1 of BatchNorm-free nets: the 5 global losses agree
    to 1e-5 relative, the trained student's weights to fp32 reduction order, every rank
    ends with the same student, and CRD's banks (rows spread over the ranks, gathered) agree."""
    one, many = probe_runs[case, 1][0], probe_runs[case, world]
    assert len(many) == world
    assert len(one["losses"]) == len(many[0]["losses"]) == 5
    for a, b in zip(one["losses"], many[0]["losses"]):
        assert b == pytest.approx(a, rel=1e-5)
    if not case.endswith("crd"):  # CRD's contrast loss climbs while its banks fill with real embeddings
        assert one["losses"][-1] < one["losses"][0]  # it trains
    for rank_result in many:
        assert rank_result["losses"] == many[0]["losses"]
        assert rank_result["student_weights_head"] == many[0]["student_weights_head"]
    assert torch.allclose(torch.tensor(many[0]["student_weights_head"]), torch.tensor(one["student_weights_head"]),
                          rtol=1e-4, atol=1e-6)
    assert abs(many[0]["student_weights_sum"] - one["student_weights_sum"]) <= 1e-6 * one["student_weights_abs_sum"]
    for bank, total in one["gathered_state_sums"].items():
        assert many[0]["gathered_state_sums"][bank] == pytest.approx(total, rel=1e-5), bank
    if case.endswith("crd"):
        assert set(one["gathered_state_sums"]) == {"student", "teacher"}


@pytest.mark.parametrize("world", WORLDS)
def test_zero_shares_shrink_with_the_ranks(probe_runs, world):
    """Each rank's optimizer state under ZeRO-1/2/3 and its parameters under ZeRO-3 are about
    1/world of DDP's (the partitions are padded to equal sizes)."""
    ddp = probe_runs["ddp-kd", world][0]
    for strategy in ("zero1", "zero2", "zero3"):
        for rank_result in probe_runs[f"{strategy}-kd", world]:
            share = rank_result["optimizer_state_bytes"] / ddp["optimizer_state_bytes"]
            assert 0.9 / world < share < 1.1 / world + 0.01, (strategy, world, share)
    held = [r["local_parameters"] for r in probe_runs["zero3-kd", world]]
    trainable = ddp["trainable_parameters"]
    assert all(0.9 / world < h / trainable < 1.1 / world + 0.01 for h in held), held
    assert sum(held) >= trainable


@pytest.mark.parametrize("world", WORLDS)
def test_zero3_teacher_on_many_ranks(probe_runs, world):
    """The ZeRO-3 frozen teacher (handed over whole, or built partitioned) gives the unsharded
    teacher's outputs on every rank, each holding about 1/world of it; building it, a rank's
    peak is its share plus about one layer of the 16."""
    for result in probe_runs["teacher", world]:
        total = result["total_parameters"]
        assert result["max_abs_diff"] < 1e-5 and result["built_max_abs_diff"] < 1e-5
        for held in (result["local_parameters"], result["built_local_parameters"]):
            assert total / world <= held <= total / world + world, (world, held, total)
        stack, layer = result["stack_parameters"], result["stack_layer_parameters"]
        assert stack / world <= result["partitioned_build_peak"] <= stack / world + layer + 16 * world, result


# -- kdscale.train on 8 processes ------------------------------------------------------------------
@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory):
    """190 training samples in 8 shards of 25 (the last holds 15) and 101 validation samples
    in 2 shards (51 + 50)."""
    from kdscale.data.synth import write_synthetic_shards

    out = tmp_path_factory.mktemp("uneven")
    write_synthetic_shards(str(out / "train"), num_classes=10, train_samples=190, val_samples=0, image_size=32,
                           samples_per_shard=25, difficulty=0.2, seed=1, progress=False)
    write_synthetic_shards(str(out / "val"), num_classes=10, train_samples=0, val_samples=101, image_size=32,
                           samples_per_shard=51, difficulty=0.2, seed=2, progress=False)
    return out


def train_args(data, out, name, *extra):
    return ["-m", "kdscale.train", f"experiment.name={name}", f"experiment.output_dir={out}",
            f"data.train_shards={data}/train/train-*.tar", f"data.val_shards={data}/val/val-*.tar",
            "data.num_classes=10", "data.num_workers=1", "data.shuffle_buffer=64", "train.log_every_steps=1",
            "method.name=kd", "student.name=resnet8", "teacher.name=resnet8", "optim.schedule=cosine", *extra]


def launch(world: int, args: list[str], timeout: int = 400):
    return run_cli(["bash", ACCELERATE, *args], env_extra={"KDSCALE_CPU_PROCS": str(world)}, timeout=timeout)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_eight_process_zero3_run_over_uneven_shards(uneven_data, tmp_path):
    """8 ranks, ZeRO-3 student and ZeRO-3 teacher, batch 4 per rank: 190 // 32 = 5 steps in
    lock-step although one shard is short, validation scores the 101 samples exactly once
    (6 ranks hold no validation shard and run the teacher's lock-step dummy batches), and
    the teacher.weights warning, DeepSpeed's notices and torch's CUDA lookup appear once, not
    8 times. The checkpoint it leaves refuses 4 processes in one line saying what to do."""
    args = train_args(uneven_data, tmp_path, "z8", "distributed.strategy=zero3", "distributed.teacher_sharding=zero3",
                      "data.batch_size=4", "train.epochs=1", "wandb.mode=offline")
    result = launch(8, args)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    logged = metrics(tmp_path / "z8")
    assert [e["step"] for e in logged if "train/loss" in e] == [1, 2, 3, 4, 5]
    validation = [e for e in logged if "val/samples" in e]
    assert len(validation) == 1 and validation[0]["val/samples"] == 101
    assert output.count("teacher.weights is not set") == 1, output[-4000:]
    assert "kdscale: warning: UserWarning: teacher.weights is not set" in result.stderr
    for chatter in ("get_accelerator", "built successfully", "No CUDA runtime is found"):
        assert output.count(chatter) <= 1, chatter
    refused = launch(4, train_args(uneven_data, tmp_path, "z8", "distributed.strategy=zero3",
                                   "distributed.teacher_sharding=zero3", "data.batch_size=4", "train.epochs=2"))
    assert refused.returncode == 2
    line = next(x for x in refused.stderr.splitlines() if "holds ZeRO shards of 8 processes" in x)
    assert "resume on 8 processes" in line and "kdscale checkpoint consolidate" in line, line
    consolidated = run_cli([os.path.join(ROOT, ".venv", "bin", "kdscale"), "checkpoint", "consolidate",
                            str(tmp_path / "z8")])
    assert consolidated.returncode == 0, consolidated.stderr[-3000:]
    from safetensors.torch import load_file

    student = load_file(str(tmp_path / "z8" / "export" / "step-00000005-student.safetensors"))
    exported = load_file(str(tmp_path / "z8" / "export" / "student.safetensors"))  # gathered by the run itself
    assert student.keys() == exported.keys()
    assert all(torch.equal(student[k].to(exported[k].dtype), exported[k]) for k in exported)


def test_ddp_run_resumes_on_four_then_one_process(uneven_data, tmp_path):
    """Stopped after 3 of 11 steps on 8 processes (2 per rank: global batch 16), resumed on 4
    (accumulation 2) to step 7, then on 1 (accumulation 8) to the end: every step is logged
    once, the learning rate follows the uninterrupted schedule, each resume starts at the
    step it stopped (the same place in the epoch), and the offline wandb run is one."""
    common = ("data.batch_size=2", "train.epochs=1", "wandb.mode=offline", "optim.lr=0.05")
    first = launch(8, train_args(uneven_data, tmp_path, "ddp", *common, "train.stop_after_steps=3"))
    assert first.returncode == 0, first.stderr[-4000:]
    second = launch(4, train_args(uneven_data, tmp_path, "ddp", *common, "train.stop_after_steps=7"))
    assert second.returncode == 0, second.stderr[-4000:]
    assert "train.grad_accum_steps 1 -> 2 keeps its global batch of 16" in second.stdout
    assert "at step 3 (epoch 0, batch 6)" in second.stdout
    third = run_cli([os.path.join(ROOT, ".venv", "bin", "python"),
                     *train_args(uneven_data, tmp_path, "ddp", *common)], timeout=400)
    assert third.returncode == 0, third.stderr[-4000:]
    assert "train.grad_accum_steps 1 -> 8 keeps its global batch of 16" in third.stdout
    assert "at step 7 (epoch 0, batch 56)" in third.stdout
    logged = metrics(tmp_path / "ddp")
    steps = [e["step"] for e in logged if "train/loss" in e]
    assert steps == list(range(1, 12))
    lrs = [e["train/lr"] for e in logged if "train/lr" in e]
    optim = load_config(None, ["optim.schedule=cosine", "optim.lr=0.05"]).optim
    assert lrs == pytest.approx([lr_at(s - 1, 11, 11, optim) for s in steps], rel=1e-9)  # one schedule throughout
    summary = json.load(open(tmp_path / "ddp" / "summary.json"))
    assert summary["completed"] and summary["step"] == 11 and summary["world_size"] == 1
    runs = os.listdir(tmp_path / "ddp" / "wandb")
    ids = {name.rsplit("-", 1)[-1] for name in runs if name.startswith("offline-run-")}
    assert len(ids) == 1, runs
