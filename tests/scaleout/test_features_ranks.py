"""The ``features`` method on 2 ranks equals 1 rank (real processes, gloo, CPU), under DDP and
ZeRO-2: the student and its adaptor heads (summary MLP, spatial per-location MLP) train to
the same losses and weights (:func:`kdscale.probes.engine_train.run_train`)."""

from __future__ import annotations

import pytest
from helpers.scaleout import assert_two_ranks_train_as_one, declare

from kdscale.probes.networks import PlainNet

pytestmark = pytest.mark.slow  # real multi-process runs: the full tier only

CASES = {strategy: ("train", strategy, "features") for strategy in ("ddp", "zero2")}
declare((1, 2), *CASES.values())


@pytest.mark.parametrize("strategy", list(CASES))
def test_features_on_two_ranks_match_one_rank(probes, strategy):
    one, two = probes(1, *CASES[strategy])[0], probes(2, *CASES[strategy])
    assert_two_ranks_train_as_one(one, two)
    student_only = sum(p.numel() for p in PlainNet(16).parameters())
    assert one["trainable_parameters"] > student_only  # the adaptor heads train beside the student


def test_zero3_vit_feature_teacher_equals_replicated(synth_data, tmp_path):
    """kdscale.train on 2 ranks: a timm ViT feature teacher (its own cls_token and pos_embed, the
    parameters only its own forward hook gathers) partitioned by ZeRO-3 beside a replicated CNN
    teacher gives the losses of the same ViT replicated, step by step; the summary and the
    token grid come through the engine."""
    import json
    import os

    import torch
    from helpers.common import base_overrides, run_cli
    from helpers.scaleout import ACCELERATE

    from kdscale.models import build_model

    torch.manual_seed(0)
    vit = build_model("timm:test_vit", 0, timm_options={"img_size": 32, "patch_size": 8})
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    torch.save(build_model("resnet20", 10).state_dict(), tmp_path / "cnn.pt")
    losses = {}
    for sharding in ("replicated", "zero3"):
        teachers = (f"teachers=[{{id: vit, name: 'timm:test_vit', weights: {tmp_path / 'vit.pt'}, sharding: {sharding}, "
                    f"timm_options: {{img_size: 32, patch_size: 8}}, targets: [summary, spatial]}}, "
                    f"{{id: cnn, name: resnet20, weights: {tmp_path / 'cnn.pt'}, targets: [summary]}}]")
        result = run_cli(["bash", ACCELERATE, "-m", "kdscale.train"] + base_overrides(
            synth_data, str(tmp_path / "runs"), name=sharding) + [
            "method.name=features", "student.name=resnet8", teachers, "data.train_samples=256", "train.epochs=1",
            "train.stop_after_steps=3", "train.log_every_steps=1", "train.knn_eval=never"], timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[sharding] = [json.loads(line) for line in open(os.path.join(tmp_path, "runs", sharding, "metrics.jsonl"))
                            if "train/loss" in line]
    assert [e["step"] for e in losses["zero3"]] == [e["step"] for e in losses["replicated"]] == [1, 2, 3]
    for a, b in zip(losses["replicated"], losses["zero3"]):
        for term in ("train/loss_summary_vit", "train/loss_spatial_vit", "train/loss_summary_cnn"):
            assert b[term] == pytest.approx(a[term], rel=1e-5), (term, a, b)
