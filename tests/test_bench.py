"""`kdscale bench --quick` runs for real; its ratios are computed from its own
measurements and its JSON has every field. No timing is asserted."""

from __future__ import annotations

import json
import math

import pytest

from kdscale.cli import main as cli

pytestmark = pytest.mark.slow  # real multi-process runs: the full tier only

RATIOS = ["overhead_kdscale_vs_hand_written", "online_kd_vs_student_only", "online_kd_flop_bound",
          "shard_kd_vs_student_only", "online_kd_fraction_of_bound", "kdscale_vs_torchdistill",
          "webdataset_vs_imagefolder", "replay_vs_webdataset", "zero1_optimizer_state_vs_ddp",
          "zero2_optimizer_state_vs_ddp", "zero3_optimizer_state_vs_ddp", "zero3_parameters_vs_ddp",
          "per_process_efficiency_2_vs_1"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cli(["bench", "--quick", "--out", str(out), "--teacher", "resnet20"])
    return json.load(open(out / "bench.json")), (out / "bench.md").read_text()


def test_json_has_every_field(bench):
    result, report = bench
    assert set(RATIOS) <= set(result["ratios"])
    for key in ("date", "command", "machine", "settings", "compute", "data", "memory", "scaling"):
        assert key in result
    assert result["machine"]["cores"] >= 1 and "torch" in result["machine"]
    for name in RATIOS:
        value = result["ratios"][name]
        assert math.isfinite(value) and value > 0, name
        assert name in report


def test_ratios_come_from_the_measurements(bench):
    result, _ = bench
    speed = {k: v["images_per_s"] for k, v in result["compute"]["throughput"].items()}
    ratios = result["ratios"]
    assert ratios["overhead_kdscale_vs_hand_written"] == pytest.approx(speed["kdscale_kd_online"] / speed["hand_written_kd"])
    assert ratios["kdscale_vs_torchdistill"] == pytest.approx(speed["kdscale_kd_online"] / speed["torchdistill_kd"])
    assert ratios["shard_kd_vs_student_only"] == pytest.approx(speed["kdscale_kd_shards"] / speed["kdscale_student_only"])
    flops_s, flops_t = result["compute"]["student_forward_gflops"], result["compute"]["teacher_forward_gflops"]
    assert ratios["online_kd_flop_bound"] == pytest.approx(3 * flops_s / (3 * flops_s + flops_t))
    assert flops_t > flops_s > 0
    for name, entry in result["compute"]["throughput"].items():
        rounds = sorted(entry["rounds"])
        assert entry["images_per_s"] == pytest.approx(rounds[len(rounds) // 2]), name
    data = {k: v["images_per_s"] for k, v in result["data"]["throughput"].items()}
    startup = result["data"]["worker_startup_s"]
    assert startup["forkserver"] > 0 and startup["fork"] > 0  # --workers 2 by default
    assert ratios["webdataset_vs_imagefolder"] == pytest.approx(data["kdscale_webdataset"] / data["torchvision_imagefolder"])
    memory = result["memory"]["per_rank_bytes"]
    assert ratios["zero2_optimizer_state_vs_ddp"] == pytest.approx(memory["zero2"][0]["optimizer_state_bytes"]
                                                                   / memory["ddp"][0]["optimizer_state_bytes"])
    # Memory is deterministic: ZeRO halves the optimizer state on 2 ranks, ZeRO-3 the parameters too.
    assert 0.45 < ratios["zero2_optimizer_state_vs_ddp"] < 0.55
    assert 0.45 < ratios["zero3_parameters_vs_ddp"] < 0.55
    scaling = result["scaling"]["images_per_s"]
    assert ratios["per_process_efficiency_2_vs_1"] == pytest.approx(scaling["2"] / 2 / scaling["1"])


def test_same_first_batch_loss_as_torchdistill(bench):
    result, _ = bench
    losses = result["compute"]["first_batch_loss"]
    assert losses["kdscale"] == pytest.approx(losses["torchdistill"], rel=1e-5)
