"""FitNet, RKD, PKT and SP: every term against an independent plain-Python computation of
its formula (``tests/helpers/reference.py``), gradient routing term by term, the layers they tap
(penultimate features, FitNet's regressor shapes), and a FitNet run whose export is the
student alone."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import reference as ref
from helpers.methods import batch, build_method, has_grad_from, no_grad_from, rows, tap
from helpers.scaleout import declare
from torch import nn

from kdscale.errors import KdscaleError
from kdscale.methods.relations import (
    penultimate_layer,
    pkt,
    rkd_angle,
    rkd_distance,
    similarity_preserving,
)
from kdscale.models import build_model

REL = 1e-4


def approx(value):
    return pytest.approx(value, rel=REL, abs=1e-7)


def _features(seed, shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rows(feature):
    return feature.detach().double().reshape(len(feature), -1).tolist()


@pytest.mark.parametrize("normalize", [False, True])
def test_rkd_terms_against_reference(normalize):
    fs, ft = _features(1, (5, 3, 2, 2)), _features(2, (5, 7)) * 3  # a map (flattened) and a vector
    assert rkd_distance(fs, ft, normalize).item() == approx(ref.rkd_distance_term(_rows(fs), _rows(ft), normalize))
    assert rkd_angle(fs, ft, normalize).item() == approx(ref.rkd_angle_term(_rows(fs), _rows(ft), normalize))
    # Large differences reach the linear part of the Huber loss.
    far = _features(3, (4, 6)) * 50
    assert rkd_distance(far, _features(4, (4, 6)) ** 3).item() == approx(
        ref.rkd_distance_term(_rows(far), _rows(_features(4, (4, 6)) ** 3)))


def test_pkt_and_sp_against_reference():
    fs, ft = _features(5, (6, 4, 3, 3)), _features(6, (6, 10))
    assert pkt(fs, ft).item() == approx(ref.pkt_term(_rows(fs), _rows(ft)))
    assert similarity_preserving(fs, ft).item() == approx(ref.sp_term(_rows(fs), _rows(ft)))
    relu = torch.relu(fs)  # non-negative features, as after a ReLU
    assert pkt(relu, ft, eps=1e-5).item() == approx(ref.pkt_term(_rows(relu), _rows(ft), eps=1e-5))


def test_fitnet_method():
    method, teacher = build_method("fitnet", "resnet8", "resnet20", beta=100.0, ce_weight=0.5)
    assert (method.hint.student_layers, method.hint.teacher_layers) == (["layer2"], ["layer2"])  # --hint_layer 2
    regressor = method.regressor
    assert regressor.conv.kernel_size == (1, 1) and isinstance(regressor.bn, nn.BatchNorm2d)
    images, targets = batch()
    out = teacher(images)
    probe = tap(method.student, ["layer2"])
    logits, losses = method(images, targets, out)
    fs = probe.pop()["layer2"]
    assert set(losses) == {"ce", "hint"}
    assert losses["ce"].item() == approx(0.5 * ref.ce(rows(logits), targets.tolist()))
    hinted = method.regressor(fs).detach().double().tolist()
    assert losses["hint"].item() == approx(100.0 * ref.mean_squared_error(hinted, out.features["layer2"].tolist()))


def test_fitnet_kd_and_stages():
    method, teacher = build_method("fitnet", "resnet8", "resnet20", kd_weight=0.9, temperature=4.0, hint_epochs=2,
                                   beta=10.0)
    assert method.teacher_needs().logits
    images, targets = batch()
    out = teacher(images)
    for epoch, hint_on in [(0, True), (1, True), (2, False), (5, False)]:
        method.set_epoch(epoch)
        logits, losses = method(images, targets, out)
        assert set(losses) == {"ce", "hint", "kd"}
        kd = 0.9 * ref.kd_term(rows(out.logits), rows(logits), 4.0)
        assert losses["kd"].item() == approx(0.0 if hint_on else kd)
        assert (losses["ce"].item() == 0.0) == hint_on and (losses["hint"].item() == 0.0) == (not hint_on)
        # The terms that are off stay in the graph (weight 0): DDP and ZeRO see every parameter.
        assert all(t.requires_grad for t in losses.values())


@pytest.mark.parametrize("student, teacher, conv", [
    ("resnet8", "wrn_16_2", nn.Conv2d),  # layer2 (32, 16x16) -> block2 (64, 16x16): 1x1
    ("resnet8", "resnet20", nn.Conv2d)])
def test_fitnet_regressor_maps_onto_the_teacher(student, teacher, conv):
    method, frozen = build_method("fitnet", student, teacher)
    images, _ = batch()
    out = frozen(images)
    probe = tap(method.student, method.hint.student_layers)
    method.student(images)
    mapped = method.regressor(probe.pop()[method.hint.student_layers[0]])
    assert mapped.shape == out.features[method.hint.teacher_layers[0]].shape
    assert type(method.regressor.conv) is conv


@pytest.mark.parametrize("student_layer, teacher_layer, kind, kernel", [
    ("layer1", "layer2", nn.Conv2d, (3, 3)),  # student 32x32 -> teacher 16x16: stride-2 3x3
    ("layer3", "layer2", nn.ConvTranspose2d, (4, 4)),  # 8x8 -> 16x16
])
def test_fitnet_regressor_kinds(student_layer, teacher_layer, kind, kernel):
    method, _ = build_method("fitnet", "resnet8", "resnet20", student_layer=student_layer, teacher_layer=teacher_layer)
    assert type(method.regressor.conv) is kind and method.regressor.conv.kernel_size == kernel
    plain, _ = build_method("fitnet", "resnet8", "resnet20", regressor_bn=False)
    assert isinstance(plain.regressor.bn, nn.Identity)


def test_fitnet_rejects_a_vector_layer():
    with pytest.raises(KdscaleError, match=r"method.student_layer: FitNet regresses feature maps"):
        build_method("fitnet", "resnet8", "resnet20", student_layer="fc")


def _expected_pairs(method, teacher_out, layers_s, layers_t, images):
    probe = tap(method.student, layers_s)
    method.student(images)
    fs = probe.pop()
    return [(_rows(fs[s]), _rows(teacher_out.features[t])) for s, t in zip(layers_s, layers_t)]


@pytest.mark.parametrize("normalize", [False, True])
def test_rkd_method(normalize):
    method, teacher = build_method("rkd", "resnet8", "resnet20", normalize=normalize, distance_weight=25.0,
                                   angle_weight=50.0)
    assert method.features.student_layers == ["avgpool"] and method.features.teacher_layers == ["avgpool"]
    images, targets = batch(size=6)
    out = teacher(images)
    logits, losses = method(images, targets, out)
    (s, t), = _expected_pairs(method, out, ["avgpool"], ["avgpool"], images)
    assert set(losses) == {"ce", "distance", "angle"}
    assert losses["ce"].item() == approx(ref.ce(rows(logits), targets.tolist()))
    assert losses["distance"].item() == approx(25.0 * ref.rkd_distance_term(s, t, normalize))
    assert losses["angle"].item() == approx(50.0 * ref.rkd_angle_term(s, t, normalize))


def test_pkt_method():
    method, teacher = build_method("pkt", "resnet8", "wrn_16_2", beta=30000.0, kd_weight=0.5)
    images, targets = batch(size=6)
    out = teacher(images)
    logits, losses = method(images, targets, out)
    (s, t), = _expected_pairs(method, out, ["avgpool"], ["avgpool"], images)
    assert set(losses) == {"ce", "pkt", "kd"}
    assert losses["pkt"].item() == approx(30000.0 * ref.pkt_term(s, t))
    assert losses["kd"].item() == approx(0.5 * ref.kd_term(rows(out.logits), rows(logits), 4.0))


def test_sp_method():
    method, teacher = build_method("sp", "resnet8", "wrn_16_2", beta=3000.0)
    assert method.features.student_layers == ["layer3"] and method.features.teacher_layers == ["block3"]
    images, targets = batch(size=6)
    out = teacher(images)
    _, losses = method(images, targets, out)
    (s, t), = _expected_pairs(method, out, ["layer3"], ["block3"], images)
    assert set(losses) == {"ce", "sp"}
    assert losses["sp"].item() == approx(3000.0 * ref.sp_term(s, t))
    # Several layer pairs are summed (the paper's sum over pairs).
    multi, teacher = build_method("sp", "resnet8", "wrn_16_2", student_layers=["layer2", "layer3"],
                                  teacher_layers=["block2", "block3"], beta=2.0)
    out = teacher(images)
    _, losses = multi(images, targets, out)
    pairs = _expected_pairs(multi, out, ["layer2", "layer3"], ["block2", "block3"], images)
    assert losses["sp"].item() == approx(2.0 * sum(ref.sp_term(s, t) for s, t in pairs))


def test_relations_ignore_autocast():
    """Under bf16 autocast the Gram and angle products stay float32: the same values as without."""
    fs, ft = _features(13, (6, 32)) + 3, _features(14, (6, 32)) + 3
    for loss in (rkd_distance, rkd_angle, pkt, similarity_preserving):
        plain = loss(fs, ft)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = loss(fs, ft)
        assert mixed.dtype == torch.float32 and mixed.item() == pytest.approx(plain.item(), rel=1e-6), loss.__name__


# -- which layers ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2", "torchvision:resnet18"])
def test_penultimate_is_the_input_of_the_last_linear(name):
    model = build_model(name, 10).eval()
    layer = penultimate_layer(model, 32, "test")
    seen = {}
    model.fc.register_forward_pre_hook(lambda _m, inputs: seen.update(fc=inputs[0]))
    model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: seen.update(tap=out))
    with torch.no_grad():
        model(_features(9, (3, 3, 32, 32)))
    assert torch.equal(seen["tap"].flatten(1), seen["fc"])


def test_penultimate_needs_a_module_before_the_head():
    class Functional(nn.Module):  # the pooling is a function: no module's output is the head's input
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(self.conv(x).mean(dim=(2, 3)))

    with pytest.raises(KdscaleError, match="cannot tell which module of Functional feeds its last linear layer 'fc'"):
        penultimate_layer(Functional(), 16, "method.student_layer")


# -- gradient routing ------------------------------------------------------------------
def test_fitnet_routing():
    method, frozen = build_method("fitnet", "resnet8", "resnet20")
    images, targets = batch()
    _, losses = method(images, targets, frozen(images))
    assert has_grad_from(losses["hint"], method.regressor)
    assert has_grad_from(losses["hint"], method.student.layer2)  # up to the guided layer
    assert no_grad_from(losses["hint"], method.student.layer3) and no_grad_from(losses["hint"], method.student.fc)
    assert no_grad_from(losses["ce"], method.regressor)


@pytest.mark.parametrize("name, terms", [("rkd", ["distance", "angle"]), ("pkt", ["pkt"]), ("sp", ["sp"])])
def test_relation_terms_train_the_student(name, terms):
    method, frozen = build_method(name, "resnet8", "resnet20")
    images, targets = batch()
    _, losses = method(images, targets, frozen(images))
    for term in terms:
        assert has_grad_from(losses[term], method.student), term
        if name == "sp":  # the last stage's output, before pooling: the head is not reached
            assert no_grad_from(losses[term], method.student.fc)


def test_relations_do_not_train_the_teacher_side():
    """The teacher's features enter as constants even when they carry a graph."""
    ft = _features(11, (5, 6)).requires_grad_(True)
    fs = _features(12, (5, 6)).requires_grad_(True)
    for loss in (rkd_distance(fs, ft), rkd_angle(fs, ft), pkt(fs, ft), similarity_preserving(fs, ft)):
        g_s, g_t = torch.autograd.grad(loss, [fs, ft], allow_unused=True)
        assert g_s is not None and g_s.abs().sum() > 0 and g_t is None


# -- a real run ------------------------------------------------------------------------
@pytest.mark.slow  # a real training run: the full tier
def test_fitnet_export_is_the_student_alone(synth_data, tmp_path):
    from helpers.common import short_distillation_run
    from safetensors.torch import load_file

    summary = short_distillation_run(synth_data, tmp_path, "fitnet")
    assert summary["completed"]
    exported = load_file(summary["export"])
    assert set(exported) == set(build_model("resnet8", 10).state_dict())  # no regressor.* keys
    student = build_model("resnet8", 10, summary["export"])  # loads into the plain model
    assert sum(p.numel() for p in student.parameters()) > 0
    with open(f"{summary['run_dir']}/metrics.jsonl") as fh:
        terms = {k for line in fh for k in json.loads(line) if k.startswith("train/loss_")}
    assert terms == {"train/loss_ce", "train/loss_hint"}


# -- scale-out (slow tier): the engine probe's BN-free nets, global batch 8 -------------------
FITNET = {strategy: ("train", strategy, "fitnet", "regressor_bn=false") for strategy in ("ddp", "zero2")}
declare((1, 2), *FITNET.values())
declare(2, ("train", "zero2", "fitnet"))


@pytest.fixture(scope="module")
def fitnet_runs(probes):
    """BN-free FitNet under DDP and ZeRO-2 on 1 and on 2 ranks, and (2 ranks) the BN regressor
    under ZeRO-2 (the suite's pooled probe launches)."""
    runs = {(strategy, ranks): probes(ranks, *case) for strategy, case in FITNET.items() for ranks in (1, 2)}
    runs["bn"] = probes(2, "train", "zero2", "fitnet")
    return runs


@pytest.mark.slow  # real 2-process runs
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_fitnet_two_ranks_match_one_rank(strategy, fitnet_runs):
    """The student and the regressor (BN-free here, like the probe's nets, so that a split batch
    changes nothing) train under DDP and ZeRO-2: 2 x 4 images give 1 x 8's losses."""
    one, two = fitnet_runs[strategy, 1], fitnet_runs[strategy, 2]
    for a, b in zip(one[0]["losses"], two[0]["losses"], strict=True):
        assert b == pytest.approx(a, rel=1e-5)
    assert one[0]["losses"][-1] < one[0]["losses"][0]
    from kdscale.probes.networks import PlainNet

    regressor = 16 * 24 + 24  # 1x1 conv (with bias) from the probe student's 16 channels to the teacher's 24
    student = sum(p.numel() for p in PlainNet(16).parameters())
    assert one[0]["trainable_parameters"] == student + regressor  # the regressor is trained with the student
    held = [rank["optimizer_parameters"] for rank in two]
    if strategy == "ddp":
        assert held == [one[0]["trainable_parameters"]] * 2
    else:  # ZeRO-2 partitions the student's and the regressor's optimizer state
        assert sum(held) >= one[0]["trainable_parameters"] and max(held) < 0.6 * one[0]["trainable_parameters"]


@pytest.mark.slow  # real 2-process runs
def test_fitnet_with_bn_regressor_trains_under_zero2(fitnet_runs):
    two = fitnet_runs["bn"]
    losses = two[0]["losses"]
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert two[0]["trainable_parameters"] == two[0]["per_network_parameters"]
