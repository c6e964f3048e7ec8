"""ReviewKD: the hierarchical context loss and the whole ABF chain against independent
references (``tests/helpers/reference_reviewkd.py``: plain Python, and other tensor operations than
kdscale's), the warm-up, gradient routing term by term, the ABF chain's channels and shapes
on the CIFAR pairs (the authors' ``build_review_kd`` lists), the layers it refuses, and
(slow) 2 ranks = 1 rank under DDP and ZeRO-2 and a run whose export is the student alone."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import reference as ref
from helpers import reference_reviewkd as rref
from helpers.methods import batch, build_method, has_grad_from, no_grad_from, rows, tap
from helpers.scaleout import declare
from torch import nn

from kdscale.errors import KdscaleError
from kdscale.methods import MethodContext, TeacherOutput, get_method_class
from kdscale.methods.reviewkd import hierarchical_context_loss
from kdscale.models import FeatureTaps, build_model

REL = 1e-4


def approx(value):
    return pytest.approx(value, rel=REL, abs=1e-7)


def _maps(seed, shape, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _nested(tensor):
    return tensor.detach().double().tolist()


# -- the hierarchical context loss -------------------------------------------------------
@pytest.mark.parametrize("size", [8, 5, 4, 2, 1])  # 5: uneven adaptive bins; 4: level 4 skipped; 1: MSE alone
def test_hcl_against_reference(size):
    fs, ft = _maps(1, (2, 3, size, size)), _maps(2, (2, 3, size, size), 2.0) + 0.5
    assert hierarchical_context_loss([fs], [ft]).item() == approx(rref.hcl([_nested(fs)], [_nested(ft)]))


def test_hcl_weights_by_hand_and_sum_over_levels():
    # A 2x2 map uses level 1 only, at weight 1/2: (mse + mse_pooled / 2) / 1.5.
    fs, ft = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), torch.zeros(1, 1, 2, 2)
    assert hierarchical_context_loss([fs], [ft]).item() == approx((7.5 + 0.5 * 6.25) / 1.5)
    # An 8x8 map: weights 1, 1/2, 1/4, 1/8 for the full size and levels 4, 2, 1, over 1.875.
    fs, ft = torch.ones(1, 1, 8, 8) * 2, torch.zeros(1, 1, 8, 8)
    assert hierarchical_context_loss([fs], [ft]).item() == approx(4.0)
    pairs = [(_maps(3, (2, 4, 8, 8)), _maps(4, (2, 4, 8, 8))), (_maps(5, (2, 6, 1, 1)), _maps(6, (2, 6, 1, 1)))]
    total = hierarchical_context_loss([s for s, _ in pairs], [t for _, t in pairs]).item()
    assert total == approx(sum(rref.hcl_pair(_nested(s), _nested(t)) for s, t in pairs))


# -- the method's terms against the references --------------------------------------------
def _expected(method, frozen, images, targets, epoch):
    """(ce, review, kd) computed by the references from the same networks and inputs."""
    out = frozen(images)
    probe = tap(method.student, method.features.student_layers)
    logits = method.student(images)
    student = probe.pop()
    probe.remove()
    maps = [student[layer].detach().double() for layer in method.features.student_layers]
    maps = [m.reshape(*m.shape, 1, 1) if m.dim() == 2 else m for m in maps]
    teacher = [out.features[layer].double() for layer in method.features.teacher_layers]
    teacher = [t.reshape(*t.shape, 1, 1) if t.dim() == 2 else t for t in teacher]
    outputs = rref.review(method.abfs, maps, [tuple(t.shape[-2:]) for t in teacher])
    p = method.params
    review = p.review_weight * rref.warmup(epoch, p.warmup_epochs) * rref.hcl(
        [_nested(o) for o in outputs], [_nested(t) for t in teacher])
    ce = p.ce_weight * ref.ce(rows(logits), targets.tolist())
    kd = p.kd_weight * ref.kd_term(rows(out.logits), rows(logits), p.temperature)
    return out, ce, review, kd


@pytest.mark.parametrize("params, epoch", [
    ({"review_weight": 5.0, "warmup_epochs": 20.0}, 10),  # the CIFAR setting, half-way through the warm-up
    ({"review_weight": 1.0, "warmup_epochs": 0.0, "ce_weight": 0.5, "kd_weight": 0.9}, 0),  # ImageNet + --use-kl
    ({"warmup_epochs": 0.0, "mid_channels": 8, "abf_bn": False}, 0),
])
def test_terms_against_reference(params, epoch):
    method, frozen = build_method("reviewkd", "resnet8", "resnet20", **params)
    method.set_epoch(epoch)
    images, targets = batch(size=3)
    out, ce, review, kd = _expected(method, frozen, images, targets, epoch)
    _, losses = method(images, targets, out)
    assert set(losses) == ({"ce", "review", "kd"} if params.get("kd_weight") else {"ce", "review"})
    assert losses["ce"].item() == approx(ce)
    assert losses["review"].item() == approx(review) and review > 0
    if "kd" in losses:
        assert losses["kd"].item() == approx(kd)


def test_resized_levels_against_reference():
    """Student levels at other sizes than the teacher's (16, 8, 1 against 32, 16, 8): each fused
    map is resized to the teacher's size, and that resized map is the next level's residual."""
    method, frozen = build_method("reviewkd", "resnet8", "resnet20", warmup_epochs=0.0,
                                  student_layers=["layer2", "layer3", "avgpool"],
                                  teacher_layers=["layer1", "layer2", "layer3"])
    images, targets = batch(size=2)
    out, _, review, _ = _expected(method, frozen, images, targets, 0)
    _, losses = method(images, targets, out)
    assert losses["review"].item() == approx(review)


def test_vector_features_are_1x1_maps():
    method, frozen = build_method("reviewkd", "resnet8", "resnet20", warmup_epochs=0.0,
                                  student_layers=["layer3", "fc"], teacher_layers=["layer3", "fc"])
    assert method.abfs[1].conv1[0].in_channels == 10 and method.abfs[0].conv2[0].out_channels == 64
    images, targets = batch(size=2)
    out, _, review, _ = _expected(method, frozen, images, targets, 0)
    assert method(images, targets, out)[1]["review"].item() == approx(review)


def test_warmup_follows_the_epoch():
    method, frozen = build_method("reviewkd", "resnet8", "resnet20")  # 20 epochs, as the authors
    images, targets = batch(size=2)
    out = frozen(images)
    values = {}
    for epoch in (0, 1, 10, 20, 35):
        method.set_epoch(epoch)
        _, losses = method(images, targets, out)
        values[epoch] = losses["review"]
        assert losses["review"].requires_grad  # at weight 0 the term stays in the graph (DDP, ZeRO)
    assert values[0].item() == 0.0 and values[35].item() == values[20].item() > 0
    assert values[1].item() == approx(values[20].item() / 20) and values[10].item() == approx(values[20].item() / 2)
    method.params.warmup_epochs = 0.0  # the ImageNet setting: full weight from the first step
    method.set_epoch(0)
    assert method(images, targets, out)[1]["review"].item() == approx(values[20].item())


# -- the ABF chain on the CIFAR and ImageNet pairs ---------------------------------------------------
# (student, teacher, student layers, teacher layers, ABF in / out channels shallow to deep, mid): the
# authors' build_review_kd lists (CIFAR-100/model/reviewkd.py; ImageNet/models/reviewkd.py for ResNet-18);
# the CIFAR teachers' layers are the code's pre-ReLU features (preact=True).
_RESNET, _WRN = ["layer1", "layer2", "layer3", "avgpool"], ["block1", "block2", "block3", "avgpool"]
_WRN_PREACT = ["block2.0.bn1", "block3.0.bn1", "bn1", "avgpool"]


def _preact(blocks):
    return [f"layer{i}.{blocks - 1}.preact" for i in (1, 2, 3)] + ["avgpool"]


PAIRS = [
    ("resnet8x4", "resnet32x4", _RESNET, _preact(5), [64, 128, 256, 256], [64, 128, 256, 256], 256),
    ("wrn_16_2", "wrn_40_2", _WRN, _WRN_PREACT, [32, 64, 128, 128], [32, 64, 128, 128], 128),
    ("wrn_40_1", "wrn_40_2", _WRN, _WRN_PREACT, [16, 32, 64, 64], [32, 64, 128, 128], 64),
    ("resnet20", "resnet56", _RESNET, _preact(9), [16, 32, 64, 64], [16, 32, 64, 64], 64),
    pytest.param("torchvision:resnet18", "torchvision:resnet34", ["layer1", "layer2", "layer3", "layer4", "avgpool"],
                 ["layer1", "layer2", "layer3", "layer4", "avgpool"], [64, 128, 256, 512, 512],
                 [64, 128, 256, 512, 512], 512, marks=pytest.mark.slow),  # ImageNet nets
]


@pytest.mark.parametrize("student, teacher, layers, teacher_layers, c_in, c_out, mid", PAIRS,
                         ids=["r32x4-r8x4", "wrn402-wrn162", "wrn402-wrn401", "r56-r20", "r34-r18"])
def test_abf_chain_shapes(student, teacher, layers, teacher_layers, c_in, c_out, mid):
    method, frozen = build_method("reviewkd", student, teacher, warmup_epochs=0.0)
    assert method.features.student_layers == layers and method.features.teacher_layers == teacher_layers
    assert [a.conv1[0].in_channels for a in method.abfs] == c_in
    assert [a.conv2[0].out_channels for a in method.abfs] == c_out
    assert {a.conv1[0].out_channels for a in method.abfs} == {mid}
    assert [a.att_conv is not None for a in method.abfs] == [True] * (len(layers) - 1) + [False]  # deepest: no fusion
    assert all(a.conv2[0].kernel_size == (3, 3) and isinstance(a.conv1[1], nn.BatchNorm2d) for a in method.abfs)
    images, _ = batch(size=2)
    out = frozen(images)
    probe = tap(method.student, layers)
    method.student(images)
    tapped = probe.pop()
    maps = [tapped[layer] for layer in layers]
    outputs = method.review(maps, [tuple(out.features[layer].shape[-2:]) for layer in teacher_layers])
    assert [o.shape for o in outputs] == [out.features[layer].shape for layer in teacher_layers]


def test_options_change_the_abfs():
    method, _ = build_method("reviewkd", "resnet8", "resnet20", mid_channels=24, abf_bn=False)
    assert {a.conv1[0].out_channels for a in method.abfs} == {24}
    assert all(isinstance(a.conv1[1], nn.Identity) and isinstance(a.conv2[1], nn.Identity) for a in method.abfs)
    assert method.trained_networks() == ["student", "abfs"]
    assert not method.teacher_needs().logits and build_method("reviewkd", "resnet8", "resnet20", kd_weight=1.0)[
        0].teacher_needs().logits


# -- layers that do not fit: one line each --------------------------------------------------
class Tokens(nn.Module):
    """A student whose middle layer gives tokens (B, N, C), not a map."""

    def __init__(self):
        super().__init__()
        self.layer1 = nn.Conv2d(3, 8, 3, padding=1)
        self.tokens = nn.Flatten(2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.tokens(self.layer1(x)).mean(dim=2))


def _build(student, teacher, **params):
    cls = get_method_class("reviewkd")
    context = MethodContext(num_classes=10, image_size=32, method_name="reviewkd", teacher_network=teacher,
                            teacher_role="frozen", teacher_pretrained=True)
    return cls(student, cls.Params(**params), context)


@pytest.mark.parametrize("student_layers, teacher_layers, message", [
    (["layer1", "layer2"], ["layer1", "layer2", "layer3"],
     (r"^method.student_layers \['layer1', 'layer2'\] and method.teacher_layers \['layer1', 'layer2', 'layer3'\] "
      r"pair up by position and must have the same length$")),
    (["layer1", "layer4"], ["layer1", "layer2"], r"^method.student_layers \(student\): CifarResNet has no layer 'layer4'"),
])
def test_layers_that_do_not_fit(student_layers, teacher_layers, message):
    with pytest.raises(KdscaleError, match=message) as err:
        _build(build_model("resnet8", 10), build_model("resnet20", 10), student_layers=student_layers,
               teacher_layers=teacher_layers)
    assert "\n" not in str(err.value)


def test_a_token_layer_is_refused():
    with pytest.raises(KdscaleError) as err:
        _build(Tokens(), build_model("resnet20", 10), student_layers=["layer1", "tokens"],
               teacher_layers=["layer2", "layer3"])
    assert str(err.value) == ("method.student_layers: ReviewKD fuses feature maps (C, H, W) or pooled vectors (C,); "
                              "layer 'tokens' gives shape (8, 1024); pick layers whose outputs are maps")


def test_default_layers_need_stages():
    with pytest.raises(KdscaleError, match=r"^method.student_layers: cannot tell the residual stages of Tokens"):
        _build(Tokens(), build_model("resnet20", 10))


# -- gradient routing -----------------------------------------------------------------------
def test_routing_per_term():
    method, frozen = build_method("reviewkd", "resnet8", "resnet20", warmup_epochs=0.0, kd_weight=1.0)
    images, targets = batch()
    _, losses = method(images, targets, frozen(images))
    review = losses["review"]
    assert has_grad_from(review, method.abfs) and has_grad_from(review, method.student.layer1)
    assert has_grad_from(review, method.student.layer3)
    assert no_grad_from(review, method.student.fc)  # the pooled features come before the head
    for a in method.abfs:  # every ABF trains, the fusion convolutions included
        assert has_grad_from(review, a)
    for term in ("ce", "kd"):
        assert no_grad_from(losses[term], method.abfs) and has_grad_from(losses[term], method.student.fc)


def test_no_gradient_reaches_the_teacher_after_warmup():
    """As tests/runs/test_step_semantics.py's FROZEN check, at full review weight (at epoch 0 the
    term is at weight 0 and that check cannot see a missing stop-gradient)."""
    method, frozen = build_method("reviewkd", "resnet8", "resnet20", kd_weight=1.0)
    method.set_epoch(20)
    live = copy.deepcopy(frozen.model).requires_grad_(True)
    taps = FeatureTaps(live, list(method.teacher_needs().features), where="test", copy=True)  # as FrozenTeacher's
    images, targets = batch()
    logits = live(images)
    output = TeacherOutput(logits, taps.pop())
    assert all(f.requires_grad for f in output.features.values())
    _, losses = method(images, targets, output)
    assert losses["review"].item() > 0
    sum(losses.values()).backward()
    assert all(p.grad is None or not p.grad.any() for p in live.parameters())
    assert any(p.grad is not None and p.grad.any() for p in method.abfs.parameters())


# -- real runs (slow tier) ----------------------------------------------------------------------
@pytest.mark.slow  # a real training run
def test_export_is_the_student_alone(synth_data, tmp_path):
    from helpers.common import short_distillation_run
    from safetensors.torch import load_file

    summary = short_distillation_run(synth_data, tmp_path, "reviewkd", "method.warmup_epochs=0")
    assert summary["completed"]
    assert set(load_file(summary["export"])) == set(build_model("resnet8", 10).state_dict())  # no abfs.* keys
    with open(f"{summary['run_dir']}/metrics.jsonl") as fh:
        logged = [json.loads(line) for line in fh]
    assert {k for line in logged for k in line if k.startswith("train/loss_")} == {"train/loss_ce",
                                                                                     "train/loss_review"}
    assert all(line["train/loss_review"] > 0 for line in logged if "train/loss_review" in line)


PROBE = ("student_layers=[layer1,layer2]", "teacher_layers=[layer1,layer2]", "warmup_epochs=0")


declare((1, 2), *(("train", strategy, "reviewkd", "abf_bn=false", *PROBE) for strategy in ("ddp", "zero2")))
declare(2, ("train", "zero2", "reviewkd", *PROBE))


@pytest.mark.slow  # real 2-process runs
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_two_ranks_match_one_rank(strategy, probes):
    """The student and the ABFs (BN-free here, like the probe's nets, so that a split batch
    changes nothing) train under DDP and ZeRO-2: 2 x 4 images give 1 x 8's losses."""
    from kdscale.methods.reviewkd import ABF
    from kdscale.probes.networks import PlainNet

    one, two = (probes(ranks, "train", strategy, "reviewkd", "abf_bn=false", *PROBE) for ranks in (1, 2))
    for a, b in zip(one[0]["losses"], two[0]["losses"], strict=True):
        assert b == pytest.approx(a, rel=1e-5)
    assert one[0]["losses"][-1] < one[0]["losses"][0]
    abfs = sum(p.numel() for fuse in (True, False) for p in ABF(16, 16, 24, fuse=fuse, bn=False).parameters())
    student = sum(p.numel() for p in PlainNet(16).parameters())
    assert one[0]["trainable_parameters"] == student + abfs  # the ABFs are trained with the student
    held = [rank["optimizer_parameters"] for rank in two]
    if strategy == "ddp":
        assert held == [one[0]["trainable_parameters"]] * 2
    else:  # ZeRO-2 partitions the student's and the ABFs' optimizer state
        assert sum(held) >= one[0]["trainable_parameters"] and max(held) < 0.6 * one[0]["trainable_parameters"]


@pytest.mark.slow  # real 2-process runs
def test_bn_abfs_train_under_zero2(probes):
    two = probes(2, "train", "zero2", "reviewkd", *PROBE)
    losses = two[0]["losses"]
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert two[0]["trainable_parameters"] == two[0]["per_network_parameters"]
