"""`kdscale bench`: its ratios are computed per measurement round from its own measurements
and reported as median and interquartile range, in the JSON and in the printed table. No
timing is asserted. The memory section's probes are not relaunched here: ZeRO's per-rank
memory is measured by tests/scaleout/test_zero.py; here its ratios are checked on given bytes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kdscale.bench.distributed import memory_ratios
from kdscale.bench.runner import format_report
from kdscale.bench.timing import exact_ratio, ratio_over_rounds, spread
from kdscale.cli import main as cli

COMPUTE_RATIOS = ["overhead_kdscale_vs_hand_written", "online_kd_vs_student_only", "online_kd_measured_bound",
                  "online_kd_fraction_of_bound", "shard_kd_vs_student_only", "kdscale_vs_torchdistill"]
TIMED_RATIOS = COMPUTE_RATIOS + ["webdataset_vs_imagefolder", "replay_vs_webdataset", "per_process_efficiency_2_vs_1"]
SPREAD_KEYS = {"median", "q25", "q75", "iqr", "rounds"}


def test_spread_is_median_and_interquartile_range():
    values = [3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0]
    summary = spread(values)
    assert summary["median"] == pytest.approx(np.median(values))
    assert summary["q25"] == pytest.approx(np.percentile(values, 25))
    assert summary["q75"] == pytest.approx(np.percentile(values, 75))
    assert summary["iqr"] == pytest.approx(summary["q75"] - summary["q25"])
    assert summary["rounds"] == values
    assert exact_ratio(0.5) == {"median": 0.5, "q25": 0.5, "q75": 0.5, "iqr": 0.0, "rounds": [0.5]}


def test_ratio_is_taken_within_each_round():
    # Both candidates slow down together in round 2: per-round ratios stay 2, the ratio of medians would not.
    summary = ratio_over_rounds([200.0, 100.0, 210.0], [100.0, 50.0, 105.0])
    assert summary["rounds"] == pytest.approx([2.0, 2.0, 2.0]) and summary["iqr"] == pytest.approx(0.0)
    with pytest.raises(ValueError):
        ratio_over_rounds([1.0], [1.0, 2.0])


def test_memory_ratios_and_report_of_given_bytes():
    def rank(params, grads, state):
        return {"parameter_bytes": params, "gradient_bytes": grads, "optimizer_state_bytes": state}
    per_rank = {"ddp": [rank(100, 100, 200)], "zero1": [rank(100, 100, 100)], "zero2": [rank(100, 50, 100)],
                "zero3": [rank(50, 50, 100)]}
    ratios = memory_ratios(per_rank)
    assert {name: r["median"] for name, r in ratios.items()} == {
        "zero1_optimizer_state_vs_ddp": 0.5, "zero2_optimizer_state_vs_ddp": 0.5,
        "zero3_optimizer_state_vs_ddp": 0.5, "zero3_parameters_vs_ddp": 0.5}
    result = {"date": "today", "command": "kdscale bench", "ratios": dict(ratios, online_kd_fraction_of_bound=spread(
        [0.8, 0.85, 0.95])), "machine": {"cores": 2, "cpu": "cpu", "gpu": None, "torch": "2"},
        "memory": {"per_rank_bytes": per_rank}}
    report = format_report(result)
    assert "| zero2_optimizer_state_vs_ddp | 0.500 | exact | 1 | <= 0.55 | yes |" in report
    assert "| online_kd_fraction_of_bound | 0.850 | 0.075 (0.825-0.900) | 3 | >= 0.9 | no |" in report
    assert "- zero2: 100 / 50 / 100" in report


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cli(["bench", "--quick", "--out", str(out), "--teacher", "resnet20", "--sections", "compute,data,scaling"])
    return json.load(open(out / "bench.json")), (out / "bench.md").read_text()


@pytest.mark.slow  # real multi-process runs: the full tier only
def test_every_ratio_has_median_and_iqr(bench):
    result, report = bench
    assert set(TIMED_RATIOS) == set(result["ratios"])
    for key in ("date", "command", "machine", "settings", "compute", "data", "scaling"):
        assert key in result
    assert result["machine"]["cores"] >= 1 and "torch" in result["machine"]
    rounds = result["settings"]["rounds"]
    for name, entry in result["ratios"].items():
        assert set(entry) == SPREAD_KEYS, name
        assert all(math.isfinite(v) and v > 0 for v in entry["rounds"]), name
        recomputed = spread(entry["rounds"])
        for key in ("median", "q25", "q75", "iqr"):
            assert entry[key] == pytest.approx(recomputed[key]), (name, key)
        expected_rounds = rounds["compute"] if name in COMPUTE_RATIOS else rounds[
            "scaling" if name.startswith("per_process") else "data"]
        assert len(entry["rounds"]) == expected_rounds, name
        row = f"| {name} | {entry['median']:.3f} | {entry['iqr']:.3f} ({entry['q25']:.3f}-{entry['q75']:.3f}) |"
        assert row in report, name


@pytest.mark.slow
def test_ratios_are_taken_per_round_from_the_measurements(bench):
    result, _ = bench
    speed = {k: v["rounds"] for k, v in result["compute"]["throughput"].items()}
    ratios = {k: v["rounds"] for k, v in result["ratios"].items()}

    def per_round(a, b):
        return [x / y for x, y in zip(a, b)]
    assert ratios["overhead_kdscale_vs_hand_written"] == pytest.approx(per_round(speed["kdscale_kd_online"],
                                                                                 speed["hand_written_kd"]))
    assert ratios["kdscale_vs_torchdistill"] == pytest.approx(per_round(speed["kdscale_kd_online"],
                                                                        speed["torchdistill_kd"]))
    assert ratios["shard_kd_vs_student_only"] == pytest.approx(per_round(speed["kdscale_kd_shards"],
                                                                         speed["kdscale_student_only"]))
    # The bound of online KD: a student-only step plus the teacher's forward, timed in the same round.
    bound = [1 / (1 / s + 1 / t) for s, t in zip(speed["kdscale_student_only"], speed["teacher_forward"])]
    assert ratios["online_kd_measured_bound"] == pytest.approx(per_round(bound, speed["kdscale_student_only"]))
    assert ratios["online_kd_fraction_of_bound"] == pytest.approx(per_round(speed["kdscale_kd_online"], bound))
    for name, entry in result["compute"]["throughput"].items():
        assert entry["images_per_s"] == pytest.approx(np.median(entry["rounds"])), name
        assert entry["iqr"] == pytest.approx(np.percentile(entry["rounds"], 75) - np.percentile(entry["rounds"], 25))
    flop = result["compute"]["flop_model"]  # information only: not a ratio with a goal
    assert flop["teacher_forward_gflops"] > flop["student_forward_gflops"] > 0
    data = {k: v["rounds"] for k, v in result["data"]["throughput"].items()}
    assert ratios["webdataset_vs_imagefolder"] == pytest.approx(per_round(data["kdscale_webdataset"],
                                                                          data["torchvision_imagefolder"]))
    assert ratios["replay_vs_webdataset"] == pytest.approx(per_round(data["kdscale_teacher_shard_replay"],
                                                                     data["kdscale_webdataset"]))
    startup = result["data"]["worker_startup_s"]
    assert startup["forkserver"] > 0 and startup["fork"] > 0  # --workers 2 by default
    scaling = result["scaling"]["images_per_s"]
    assert ratios["per_process_efficiency_2_vs_1"] == pytest.approx(
        per_round([s / 2 for s in scaling["2"]["rounds"]], scaling["1"]["rounds"]))


@pytest.mark.slow
def test_same_first_batch_loss_as_torchdistill(bench):
    result, _ = bench
    losses = result["compute"]["first_batch_loss"]
    assert losses["kdscale"] == pytest.approx(losses["torchdistill"], rel=1e-5)


@pytest.mark.slow  # real multi-process runs
def test_crd_banks_halve_per_rank_on_two_ranks(tmp_path):
    """``kdscale bench --sections crd`` at 200000 samples: each of 2 ranks holds half the rows,
    and the resident memory the banks add is what their bytes say (not a whole bank per rank)."""
    from kdscale.bench.distributed import bench_crd

    result = bench_crd(str(tmp_path), samples=200_000, negatives=256, steps=1)
    one, two = result["per_rank"]["1"], result["per_rank"]["2"]
    assert one[0]["rows"] == 200_000 and [r["rows"] for r in two] == [100_000, 100_000]
    assert one[0]["bank_bytes"] == 2 * 200_000 * 128 * 4
    assert result["ratios"]["crd_bank_bytes_2_vs_1_rank"]["median"] == 0.5
    for rank in one + two:
        assert 0.5 * rank["bank_bytes"] < rank["resident_bytes_added"] < 1.5 * rank["bank_bytes"], rank
        assert rank["step_seconds"] > 0
