"""The capacity planner (``kdscale plan``): its per-rank ZeRO figures against what real 2-rank
DeepSpeed engines hold (the train probe, as in test_zero), the byte formulas, the CLI output and
its one-line errors."""

from __future__ import annotations

import pytest
import torch
from helpers.common import ROOT

from kdscale.cli import main
from kdscale.config import load_config
from kdscale.planning.memory import NetworkSizes, plan_networks, rank_plan

DEMO = f"{ROOT}/configs/demo_kd.yaml"


def probe_plan(gpus: int):
    """The planner on the probe's own networks and settings (kdscale/probes/engine_train.py): a
    PlainNet(16) student distilled by KD from a frozen PlainNet(24), AdamW, fp32."""
    from kdscale.methods import MethodContext, get_method_class
    from kdscale.probes.networks import CLASSES, GLOBAL_BATCH, PlainNet
    from kdscale.teachers.frozen import FrozenTeacher

    cfg = load_config(None, [f"data.batch_size={GLOBAL_BATCH // gpus}", "optim.name=adamw", "train.precision=fp32",
                             "data.image_size=16", f"data.num_classes={CLASSES}"])
    torch.manual_seed(0)
    student, teacher = PlainNet(16), PlainNet(24)
    cls = get_method_class("kd")
    context = MethodContext(num_classes=CLASSES, image_size=16, method_name="kd", teacher_network=teacher,
                            teacher_role="frozen", teacher_name="plain24", teacher_pretrained=True)
    distiller = cls(student, cls.Params(), context).train()
    frozen = FrozenTeacher(teacher, [], torch.device("cpu"), None, False)
    return plan_networks(distiller, frozen, cfg, gpus)


@pytest.fixture(scope="module")
def zero_probes(tmp_path_factory):
    from helpers.scaleout import (
        run_probes,  # the same 2-rank gloo launch as the scale-out tests
    )

    folder = tmp_path_factory.mktemp("plan-probes")
    strategies = ("zero1", "zero2", "zero3")
    results = run_probes(folder, 2, *(("train", strategy, "kd") for strategy in strategies))  # one launch
    return dict(zip(strategies, results))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_zero_figures_match_real_engines(zero_probes, strategy):
    """Per rank, within 10%: parameters held (ZeRO-3: the partition), gradients kept for the
    optimizer, optimizer state (AdamW's two moments), and the fp32 master partition that
    ZeRO-1/2 clone (the elements their optimizer updates)."""
    row = next(r for r in probe_plan(2).rows if r.strategy == strategy and r.teacher_sharding == "replicated")
    for measured in zero_probes[strategy]:
        pairs = {"parameters": (row.parameters, measured["local_parameters"] * 4),
                 "gradients": (row.gradients, measured["gradient_bytes"]),
                 "optimizer state": (row.optimizer_states, measured["optimizer_state_bytes"])}
        if strategy != "zero3":
            pairs["master weights"] = (row.master_weights, measured["optimizer_parameters"] * 4)
        for what, (planned, real) in pairs.items():
            assert planned == pytest.approx(real, rel=0.10), (strategy, what, planned, real)


def test_byte_formulas():
    """The table of kdscale.planning.memory's docstring, on 4 ranks, SGD with momentum."""
    cfg = load_config(None, ["optim.name=sgd", "train.precision=bf16"])
    sizes = NetworkSizes(trained=4_000_000, trained_persistent=0, trained_buffer_bytes=0, phases=1,
                         teacher=400_000_000, teacher_persistent=0, teacher_largest_module=10)
    psi, bucket = 4_000_000, 4 * 500_000_000
    ddp, zero1, zero2, zero3 = (rank_plan(s, "replicated", sizes, 0, cfg, 4, 100.0)
                                for s in ("ddp", "zero1", "zero2", "zero3"))
    assert (ddp.parameters, ddp.gradients, ddp.optimizer_states, ddp.master_weights, ddp.buffers) == \
        (4 * psi, 4 * psi, 4 * psi, 0, 4 * psi)
    assert (zero1.gradients, zero1.optimizer_states, zero1.master_weights, zero1.buffers) == \
        (4 * psi, psi, psi, bucket)  # DeepSpeed's default: overlap_comm off below stage 3
    assert (zero2.parameters, zero2.gradients) == (4 * psi, psi)
    assert (zero3.parameters, zero3.gathered, zero3.gradients, zero3.master_weights) == (psi, 4 * psi, psi, 0)
    assert ddp.teacher == 4 * 400_000_000
    # A ZeRO-3 teacher: its partition, plus the largest module and DeepSpeed's prefetch bucket (5e7).
    assert rank_plan("zero2", "zero3", sizes, 0, cfg, 4, 100.0).teacher == 4 * (100_000_000 + 10 + 50_000_000)
    # Ring all-reduce of fp32 gradients: 2 (N-1)/N x 4 bytes x Ψ; ZeRO-3 1.5 times that.
    assert ddp.comm_bytes == zero1.comm_bytes == 2 * 0.75 * 4 * psi
    assert zero3.comm_bytes == 3 * 0.75 * 4 * psi
    assert ddp.comm_seconds == pytest.approx(ddp.comm_bytes / 12.5e9)
    adamw = rank_plan("zero2", "none", sizes, 0, load_config(None, ["optim.name=adamw"]), 4, 100.0)
    assert adamw.optimizer_states + adamw.master_weights == 12 * psi // 4  # the paper's K = 12, over N


def test_cli_prints_every_strategy_and_what_fits(capsys):
    main(["plan", "--config", DEMO, "--gpus", "2", "--gpu-memory", "1", "data.batch_size=16"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line[1:].startswith(("ddp ", "zero"))]
    assert [(r[0].lstrip("*"), r[1]) for r in rows] == [(s, t) for s in ("ddp", "zero1", "zero2", "zero3")
                                                        for t in ("replicated", "zero3")]
    assert rows[0][0] == "*ddp"  # the config's own strategy (auto without DeepSpeed: DDP)
    assert "at batch 16 x 32px" in out and "frozen teacher resnet20" in out
    # DeepSpeed's fixed gradient buckets (5e8 fp32 elements, 1.86 GiB) leave only DDP under 1 GiB.
    assert "fits in 1 GiB: ddp/replicated, ddp/zero3\n" in out
    assert all(r[-1] == ("yes" if r[0].endswith("ddp") else "no") for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--gpus", "0"], "--gpus must be at least 1, got 0"),
    (["--gpus", "2", "--gpu-memory", "-1"], "--gpu-memory must be a positive number of GiB per GPU, got -1.0"),
    (["--gpus", "2", "--config", "/nonexistent/plan.yaml"], "config file not found: /nonexistent/plan.yaml"),
    (["--gpus", "2", "optim.lrr=1"], "command-line override optim.lrr: unknown key; did you mean 'optim.lr'?"),
])
def test_bad_input_gives_one_clear_line(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--config", DEMO, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kdscale: error: ") and message in err, err


def test_crd_banks_are_planned_per_rank():
    """CRD keeps two float32 rows of feat_dim per training sample, sharded across ranks: the plan
    counts ceil(N / ranks) of them in every row's buffers and says so."""
    from kdscale.planning.memory import plan_config
    from kdscale.planning.report import format_plan

    cfg = load_config(f"{ROOT}/configs/crd_cifar100.yaml", ["teacher.weights=null"])
    plans = {gpus: plan_config(cfg, gpus) for gpus in (1, 4)}
    assert plans[1].sizes.rank_state_bytes(1) == 50000 * 2 * 128 * 4
    assert plans[4].sizes.rank_state_bytes(4) == 12500 * 2 * 128 * 4
    ddp = {gpus: next(r for r in plan.rows if r.strategy == "ddp") for gpus, plan in plans.items()}
    assert ddp[1].buffers - ddp[4].buffers == (50000 - 12500) * 2 * 128 * 4  # DDP's buckets do not change
    text = format_plan(plans[4], cfg, "configs/crd_cifar100.yaml")
    assert "per-sample state: 1024 bytes x 50000 samples, sharded: 0.01 GiB per rank (in buffers)" in text
