"""Shipped configs and defaults run what the authors ran (the 2026-12 defaults audit): each
setting below is checked against the value its source gives, and each new option against
an independent computation of the code's form."""

from __future__ import annotations

import copy
import glob
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import reference as ref
from helpers.common import ROOT
from helpers.methods import batch, build_method, rows
from torch import nn

from kdscale.config import load_config
from kdscale.errors import KdscaleError
from kdscale.models import build_model

REL = 1e-4

# (config, dotted key, the authors' value, where it is from)
AUTHORS_SETTINGS = [
    ("kd_ls_cifar100.yaml", "method.ce_weight", 0.1,
     "logit-standardization-KD cfg.py CFG.KD.LOSS.CE_WEIGHT (their CIFAR yaml sets none); issues #8, #25"),
    ("kd_ls_cifar100.yaml", "method.kd_weight", 9.0, "their README: --kd-weight 9"),
    ("kd_ls_cifar100.yaml", "method.temperature", 2.0, "their README: --base-temp 2"),
    ("kd_ls_imagenet.yaml", "method.ce_weight", 1.0, "their configs/imagenet/r34_r18/kd.yaml: CE_WEIGHT 1.0"),
    ("ffl_cifar100.yaml", "method.share_trunk", True, "FFL-pytorch our_network.py: FFL_ResNet shares conv1..layer2"),
    ("ffl_cifar100.yaml", "student.name", "resnet32", "FFL-pytorch train_FFL.py: --depth 32"),
    ("ffl_cifar100.yaml", "teacher.name", "resnet32", "FFL-pytorch: two branches of one ResNet-32"),
    ("ffcl_cifar100.yaml", "method.share_trunk", False, "FFCL: 'the teacher and the student networks'"),
    ("prokt_cifar100.yaml", "method.zero_student_classifier", True, "prokt_text run_glue_milestone.py"),
    ("prokt_cifar100.yaml", "train.clip_grad_norm", 1.0, "prokt_text: HF max_grad_norm per network"),
    ("prokt_imagenet.yaml", "method.zero_student_classifier", True, "prokt_text run_glue_milestone.py"),
    ("prokt_imagenet.yaml", "train.clip_grad_norm", 1.0, "prokt_text: HF max_grad_norm per network"),
]


def setting(cfg, dotted: str):
    section, key = dotted.split(".")
    holder = cfg.only_teacher("this check") if section == "teacher" else getattr(cfg, section)
    return getattr(holder.params, key) if section == "method" else getattr(holder, key)


@pytest.mark.parametrize("config, key, value, source", AUTHORS_SETTINGS)
def test_shipped_config_has_the_authors_setting(config, key, value, source):
    cfg = load_config(os.path.join(ROOT, "configs", config), [])
    assert setting(cfg, key) == value, f"configs/{config}: {key} should be {value!r} ({source})"


def test_cifar_configs_train_in_fp32_with_tf32():
    """The authors' CIFAR-100 numbers are fp32 runs: no shipped CIFAR config autocasts to bf16."""
    configs = sorted(glob.glob(os.path.join(ROOT, "configs", "*cifar100*.yaml")))
    assert len(configs) >= 19
    for path in configs:
        cfg = load_config(path, [])
        assert cfg.train.precision == "tf32", path
        assert "Precision:" in open(path).read(), f"{path}: say the precision choice in a comment"


def test_precision_sets_tf32_on_the_gpu():
    from kdscale.runtime.device import Runtime

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for precision, tf32, dtype in (("fp32", False, None), ("tf32", True, None), ("bf16", True, torch.bfloat16),
                                       ("fp32", False, None)):
            runtime = Runtime.from_config(load_config(None, [f"train.precision={precision}"]), torch.device("cuda"))
            assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
            assert runtime.autocast_dtype == dtype
        assert Runtime.from_config(load_config(None, ["train.precision=tf32"]), torch.device("cpu")).autocast_dtype \
            is None
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_dml_peer_kl_sum_is_the_code_form():
    """DML's code adds the K-1 peer KL terms; the paper (default) divides by K-1."""
    for peer_kl, scale in (("sum", 1.0), ("mean", 0.5)):
        method, _ = build_method("dml", "resnet8", peers=["resnet8", "resnet20"], temperature=2.0, kl_weight=0.5,
                                 peer_kl=peer_kl)
        images, targets = batch()
        _, losses = method(images, targets, None)
        z = [rows(net(images)) for net in (method.student, *method.peers)]
        for k, prefix in enumerate(["", "peer1_", "peer2_"]):
            mutual = sum(ref.kd_term(z[j], z[k], 2.0) for j in range(3) if j != k)
            assert losses[prefix + "kl"].item() == pytest.approx(0.5 * scale * mutual, rel=REL)


def test_ffl_shared_trunk_is_one_network_with_two_branches():
    """FFL's code: one trunk (conv1, layer1, layer2) feeding two last stages. kdscale's shared
    parameters give the same losses, the same trunk gradient and the same BN statistics."""
    method, _ = build_method("ffcl", "resnet8", "resnet8", share_trunk=True, mutual_weight=0.0, at_beta=0.0,
                             pk_weight=0.0)
    method.set_epoch(80)  # past the ramp-up: w = 1
    s, t = method.student, method.teacher
    assert s.layer2[0].conv1.weight is t.layer2[0].conv1.weight and s.conv1.weight is t.conv1.weight
    assert s.layer3[0].conv1.weight is not t.layer3[0].conv1.weight and s.fc.weight is not t.fc.weight
    assert s.bn1.running_mean is not t.bn1.running_mean
    trunk = copy.deepcopy(nn.Sequential(s.conv1, s.bn1, s.relu, s.layer1, s.layer2))
    stage_s, head_s, stage_t, head_t = (copy.deepcopy(m) for m in (s.layer3, s.fc, t.layer3, t.fc))
    fusion = copy.deepcopy(method.fusion)
    images, targets = batch(size=8, seed=3)

    shared = trunk(images)  # computed once, as in FFL_ResNet.forward
    map_s, map_t = stage_s(shared), stage_t(shared)
    z_s, z_t = head_s(map_s.mean(dim=(2, 3))), head_t(map_t.mean(dim=(2, 3)))
    z_f = fusion(map_t, map_s)

    def kl(target, student, temp=3.0):  # FFL's KLLoss without its 1e-7
        return F.kl_div(F.log_softmax(student / temp, 1), F.softmax(target.detach() / temp, 1),
                        reduction="batchmean") * temp * temp
    expected = (F.cross_entropy(z_s, targets) + F.cross_entropy(z_t, targets) + F.cross_entropy(z_f, targets)
                + kl(z_f, z_s) + kl(z_f, z_t) + kl((z_s + z_t) / 2, z_f))
    expected.backward()

    _, losses = method(images, targets, None)
    total = sum(losses.values())
    total.backward()
    assert total.item() == pytest.approx(expected.item(), rel=REL)
    for mine, theirs in ((s.conv1.weight, trunk[0].weight), (s.layer2[0].conv2.weight, trunk[4][0].conv2.weight),
                         (s.layer3[0].conv1.weight, stage_s[0].conv1.weight),
                         (t.layer3[0].conv1.weight, stage_t[0].conv1.weight)):
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6)
    for network in (s, t):
        assert torch.allclose(network.bn1.running_mean, trunk[1].running_mean, atol=1e-6)
        assert torch.allclose(network.layer2[0].bn2.running_var, trunk[4][0].bn2.running_var, atol=1e-6)


def test_ffl_shared_trunk_needs_the_same_trunk():
    with pytest.raises(KdscaleError, match=r"method.share_trunk: the student's trunk \(conv1.weight .* differ; "
                                           r"first difference: layer1.1.conv1.weight; .* set method.share_trunk=false"):
        build_method("ffcl", "resnet8", "resnet20", share_trunk=True)


def test_prokt_zeroes_the_student_classifier_as_the_code_does():
    method, _ = build_method("prokt", "resnet8", "resnet20", teacher_init="converged")
    assert not method.student.fc.weight.any() and not method.student.fc.bias.any()
    assert method.student.conv1.weight.any() and method.teacher.fc.weight.any()
    kept, _ = build_method("prokt", "resnet8", "resnet20", teacher_init="converged", zero_student_classifier=False)
    assert kept.student.fc.weight.any()
    images, targets = batch()
    _, losses = method(images, targets, None, phase="student")
    sum(losses.values()).backward()
    assert method.student.fc.weight.grad.abs().sum() > 0  # a zeroed classifier still learns


def _pre_relu_sum(block, x):
    """The residual sum of a CIFAR ResNet block before its last ReLU, computed by hand."""
    y = F.relu(block.bn1(block.conv1(x)))
    return block.bn2(block.conv2(y)) + block.downsample(x)


def test_reviewkd_teacher_takes_the_code_pre_relu_features():
    method, frozen = build_method("reviewkd", "resnet8", "resnet20")
    assert method.features.teacher_layers == ["layer1.2.preact", "layer2.2.preact", "layer3.2.preact", "avgpool"]
    assert method.features.student_layers == ["layer1", "layer2", "layer3", "avgpool"]
    images, _ = batch()
    teacher = frozen.model
    inputs = {}
    handle = teacher.layer3[2].register_forward_pre_hook(lambda _m, args: inputs.setdefault("x", args[0].clone()))
    out = frozen(images)
    handle.remove()
    tapped = out.features["layer3.2.preact"]
    with torch.no_grad():
        assert torch.allclose(tapped, _pre_relu_sum(teacher.layer3[2], inputs["x"]), atol=1e-5)
        assert (tapped < 0).any()  # the student regresses negative values too, as in the code
        assert torch.allclose(F.relu(tapped), teacher.layer3(teacher.layer2(teacher.layer1(
            teacher.relu(teacher.bn1(teacher.conv1(images)))))), atol=1e-5)
    wrn, _ = build_method("reviewkd", "wrn_16_2", "wrn_40_2")
    assert wrn.features.teacher_layers == ["block2.0.bn1", "block3.0.bn1", "bn1", "avgpool"]


def test_reviewkd_other_teachers_keep_stage_outputs():
    from kdscale.methods.reviewkd import code_teacher_layers

    torchvision_resnet = build_model("torchvision:resnet18", 10)
    assert code_teacher_layers(torchvision_resnet, 32, "method.teacher_layers") == \
        ["layer1", "layer2", "layer3", "layer4", "avgpool"]


def test_preact_tap_changes_no_weights():
    network = build_model("resnet20", 10)
    assert not any("preact" in key for key in network.state_dict())
