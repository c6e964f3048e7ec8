"""Golden values: every loss term of every method against an independent plain-Python
computation of the formulas in the method notes, on small real networks."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import reference as ref
from helpers.methods import batch, build_method, rows, tap

from kdscale.methods.losses import attention_transfer

REL = 1e-4  # float32 losses vs float64 references; formula errors are orders larger


def approx(value):
    return pytest.approx(value, rel=REL, abs=1e-7)


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_attention_transfer_against_reference(mode):
    gen = torch.Generator().manual_seed(5)
    fs = [torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 5, 2, 2, generator=gen)]
    ft = [torch.randn(2, 6, 4, 4, generator=gen), torch.randn(2, 2, 2, 2, generator=gen)]
    got = attention_transfer(fs, ft, beta=1000.0, mode=mode).item()
    assert got == approx(ref.at_term([f.tolist() for f in fs], [f.tolist() for f in ft], 1000.0, mode))
    # A student map twice the teacher's size is resized (bilinear 2x down = 2x2 block mean).
    big = torch.randn(2, 3, 8, 8, generator=gen)
    got = attention_transfer([big], [ft[0]], beta=2.0, mode=mode).item()
    assert got == approx(ref.at_term([big.tolist()], [ft[0].tolist()], 2.0, mode, pool=2))


def test_at_method():
    method, teacher = build_method("at", "resnet8", "resnet20", beta=1000.0, ce_weight=0.7)
    images, targets = batch()
    out = teacher(images)
    probe = tap(method.student, ["layer1", "layer2", "layer3"])
    logits, losses = method(images, targets, out)
    fs = probe.pop()
    assert set(losses) == {"ce", "at"}
    assert losses["ce"].item() == approx(0.7 * ref.ce(rows(logits), targets.tolist()))
    expected = ref.at_term([fs[n].tolist() for n in ("layer1", "layer2", "layer3")],
                           [out.features[n].tolist() for n in ("layer1", "layer2", "layer3")], 1000.0)
    assert losses["at"].item() == approx(expected)


def test_dml_method():
    method, _ = build_method("dml", "resnet8", peers=["resnet8", "resnet20"], temperature=2.0, kl_weight=0.5)
    images, targets = batch()
    logits, losses = method(images, targets, None)
    z = [rows(net(images)) for net in (method.student, *method.peers)]
    assert torch.allclose(logits, method.student(images))
    assert set(losses) == {"ce", "kl", "peer1_ce", "peer1_kl", "peer2_ce", "peer2_kl"}
    for k, prefix in enumerate(["", "peer1_", "peer2_"]):
        assert losses[prefix + "ce"].item() == approx(ref.ce(z[k], targets.tolist()))
        mutual = sum(ref.kd_term(z[j], z[k], 2.0) for j in range(3) if j != k)
        assert losses[prefix + "kl"].item() == approx(0.5 / 2 * mutual)


@pytest.mark.parametrize("hint", ["mse_sum", "kl"])
@pytest.mark.parametrize("at_target", ["scratch", "student", "both"])
def test_ctkd_method(hint, at_target):
    method, teacher = build_method("ctkd", "resnet8", "resnet20", hint=hint, gamma=0.5, temperature=4.0,
                                   at_target=at_target, beta=10.0)
    assert type(method.scratch_teacher).__name__ == "CifarResNet" and len(method.scratch_teacher.layer1) == 3
    images, targets = batch()
    out = teacher(images)
    layers = ("layer1", "layer2", "layer3")
    s_probe, r_probe = tap(method.student, layers), tap(method.scratch_teacher, layers)
    logits, losses = method(images, targets, out)
    fs, fr = s_probe.pop(), r_probe.pop()
    z_s, z_r = rows(logits), rows(method.scratch_teacher(images))
    y = targets.tolist()
    expected = {"scratch_ce": ref.ce(z_r, y), "ce": ref.ce(z_s, y),
                "hint": 0.5 * (ref.squared_error_sum(z_r, z_s) if hint == "mse_sum" else ref.kd_term(z_r, z_s, 4.0))}
    teacher_maps = [out.features[n].tolist() for n in layers]
    if at_target in ("scratch", "both"):
        expected["at_scratch"] = ref.at_term([fr[n].tolist() for n in layers], teacher_maps, 10.0)
    if at_target in ("student", "both"):
        expected["at_student"] = ref.at_term([fs[n].tolist() for n in layers], teacher_maps, 10.0)
    assert set(losses) == set(expected)
    for name, value in expected.items():
        assert losses[name].item() == approx(value), name


def test_ctkd_branches_share_one_stem():
    method, _ = build_method("ctkd", "resnet8", "resnet20")
    assert method.shared_stem == ["conv1.weight", "bn1.weight", "bn1.bias"]
    for name in method.shared_stem:
        assert method.student.get_parameter(name) is method.scratch_teacher.get_parameter(name)
    assert method.student.bn1.running_mean is not method.scratch_teacher.bn1.running_mean  # statistics per branch
    unique = {id(p) for p in method.parameters()}
    assert len(unique) == len(list(method.student.parameters())) + len(list(method.scratch_teacher.parameters())) - 3
    separate, _ = build_method("ctkd", "resnet8", "resnet20", share_stem=False)
    assert separate.student.conv1.weight is not separate.scratch_teacher.conv1.weight


def test_ctkd_stems_of_other_shapes_fail_clearly():
    from kdscale.errors import KdscaleError

    with pytest.raises(KdscaleError, match=r"the student's stem \(conv1.weight \(32, 3, 3, 3\).*scratch teacher's stem "
                                           r"\(conv1.weight \(16, 3, 3, 3\)"):
        build_method("ctkd", "resnet8x4", "resnet20")


def _eval_rows(network, images):
    network.eval()
    with torch.no_grad():
        out = rows(network(images))
    network.train()
    return out


def _batch_stat_rows(network, images):
    """Independent reference for ``target_bn: batch``: a copy of the network in train mode
    normalises with the batch's statistics (its own running statistics may change)."""
    clone = copy.deepcopy(network).train()
    with torch.no_grad():
        return rows(clone(images))


@pytest.mark.parametrize("target_bn", ["batch", "running"])
def test_prokt_phases(target_bn):
    method, _ = build_method("prokt", "resnet8", "resnet20", lam=0.3, ce_weight=0.2, target_bn=target_bn,
                             teacher_init="converged")
    reference_rows = _batch_stat_rows if target_bn == "batch" else _eval_rows
    images, targets = batch()
    student_target = reference_rows(method.student, images)
    stats_before = [b.clone() for b in method.student.buffers()]
    teacher_logits, losses = method(images, targets, None, phase="teacher")
    assert all(torch.equal(a, b) for a, b in zip(stats_before, method.student.buffers()))  # running stats untouched
    z_t = rows(teacher_logits)
    assert set(losses) == {"teacher_ce", "teacher_kl"}
    assert losses["teacher_ce"].item() == approx(0.7 * ref.ce(z_t, targets.tolist()))
    assert losses["teacher_kl"].item() == approx(0.3 * ref.kd_term(student_target, z_t, 1.0))
    teacher_target = reference_rows(method.teacher, images)
    logits, losses = method(images, targets, None, phase="student")
    assert set(losses) == {"kd", "ce"}
    assert losses["kd"].item() == approx(ref.kd_term(teacher_target, rows(logits), 1.0))
    assert losses["ce"].item() == approx(0.2 * ref.ce(rows(logits), targets.tolist()))
    assert method.student.training and method.teacher.training


def test_prokt_teacher_initialisation():
    generic, _ = build_method("prokt", "resnet8", "resnet20", teacher_init="generic", zero_classifier=True)
    assert not generic.teacher.fc.weight.any() and not generic.teacher.fc.bias.any()
    assert generic.teacher.conv1.weight.any()
    converged, _ = build_method("prokt", "resnet8", "resnet20", teacher_init="converged")
    assert converged.teacher.fc.weight.any()
    from kdscale.errors import KdscaleError

    with pytest.raises(KdscaleError, match="method.teacher_init=scratch trains the teacher from random weights, but "
                                           "teacher.weights is set"):
        build_method("prokt", "resnet8", "resnet20", teacher_init="scratch")  # the helper loads teacher weights


def test_prokt_dual_variant_updates_beta():
    method, _ = build_method("prokt", "resnet8", "resnet20", dual=True, dual_eps=0.01, dual_lr=0.5, dual_beta0=2.0,
                             teacher_init="converged")
    images, targets = batch()
    student_eval = _batch_stat_rows(method.student, images)
    teacher_logits, losses = method(images, targets, None, phase="teacher")
    kl = ref.kd_term(student_eval, rows(teacher_logits), 1.0)
    assert losses["teacher_ce"].item() == approx(ref.ce(rows(teacher_logits), targets.tolist()))
    assert losses["teacher_dual"].item() == approx(2.0 * (kl - 0.01))
    assert method.dual_beta.item() == approx(max(0.0, 2.0 + 0.5 * (kl - 0.01)))


@pytest.mark.parametrize("epoch", [0, 40, 80])
def test_ffcl_method(epoch):
    method, _ = build_method("ffcl", "resnet8", "resnet20", temperature=3.0, at_beta=100.0, pk_weight=0.5,
                             pk_correct_prob=0.8, mutual_weight=0.9, fused_weight=0.8, ensemble_weight=0.7)
    method.set_epoch(epoch)
    w = ref.rampup(epoch, 80)
    assert epoch < 80 or w == 1.0
    images, targets = batch()
    s_probe, t_probe = tap(method.student, ["layer1", "layer2", "layer3"]), tap(method.teacher, ["layer1", "layer2", "layer3"])
    logits, losses = method(images, targets, None)
    fs, ft = s_probe.pop(), t_probe.pop()
    z_s, z_t = rows(logits), rows(method.teacher(images))
    z_f = rows(method.fusion(ft["layer3"], fs["layer3"]))
    y = targets.tolist()
    virtual = [[0.8 if c == label else 0.2 / 9 for c in range(10)] for label in y]
    mid = ("layer1", "layer2")
    expected = {
        "ce": ref.ce(z_s, y), "teacher_ce": ref.ce(z_t, y), "fused_ce": ref.ce(z_f, y),
        "fused_to_student": w * 0.8 * ref.kd_term(z_f, z_s, 3.0), "fused_to_teacher": w * 0.8 * ref.kd_term(z_f, z_t, 3.0),
        "ensemble_to_fused": w * 0.7 * ref.kd_term(ref.mean_rows(z_s, z_t), z_f, 3.0),
        "mutual_to_student": w * 0.9 * ref.kd_term(z_t, z_s, 3.0),
        "mutual_to_teacher": w * 0.9 * ref.kd_term(z_s, z_t, 3.0),
        "at_to_student": ref.at_term([fs[n].tolist() for n in mid], [ft[n].tolist() for n in mid], 100.0),
        "at_to_teacher": ref.at_term([ft[n].tolist() for n in mid], [fs[n].tolist() for n in mid], 100.0),
        "pk_student": 0.5 * ref.kl_to_probs(virtual, z_s, 1.0), "pk_teacher": 0.5 * ref.kl_to_probs(virtual, z_t, 1.0),
    }
    assert set(losses) == set(expected)
    for name, value in expected.items():
        assert losses[name].item() == approx(value), name


def test_ffl_fusion_module_and_optimizer_groups():
    method, _ = build_method("ffcl", "resnet8", "resnet20")  # both last stages have 64 channels
    assert method.fusion.depthwise[0].weight.shape == (128, 1, 3, 3)
    assert method.fusion.pointwise[0].weight.shape == (64, 128, 1, 1)  # 2C -> C
    assert method.fusion.fc.in_features == 64
    networks, fusion = method.phases()["all"].param_groups()
    assert fusion["weight_decay"] == 1e-5 and "weight_decay" not in networks
    assert {id(p) for p in fusion["params"]} == {id(p) for p in method.fusion.parameters()}
    assert {id(p) for g in (networks, fusion) for p in g["params"]} == {id(p) for p in method.parameters()}


def test_sokd_method():
    method, teacher = build_method("sokd", "resnet8", "wrn_16_2", temperature=4.0)
    assert method.bridge_input == "block2"
    conv = method.kbm[0][0][0].conv1  # the KBM's first conv: WRN init normal(0, sqrt(2 / (3 * 3 * 128)))
    assert conv.weight.std().item() == pytest.approx((2 / (9 * conv.out_channels)) ** 0.5, rel=0.05)
    assert not method.kbm[-1].bias.any()
    assert [type(m).__name__ for m in method.kbm[0]] == ["Sequential", "BatchNorm2d", "ReLU"]  # block3, bn1, relu
    images, targets = batch()
    out = teacher(images)
    logits, losses = method(images, targets, out)
    z_s, z_t = rows(logits), rows(out.logits)
    z_a = rows(method.kbm(out.features["block2"]))
    y = targets.tolist()
    expected = {"kbm_ce": ref.ce(z_a, y), "kbm_kd_teacher": ref.kd_term(z_t, z_a, 4.0),
                "kbm_kd_student": ref.kd_term(z_s, z_a, 4.0), "ce": ref.ce(z_s, y),
                "kd": ref.kd_term(z_a, z_s, 4.0)}
    assert set(losses) == set(expected)
    for name, value in expected.items():
        assert losses[name].item() == approx(value), name
