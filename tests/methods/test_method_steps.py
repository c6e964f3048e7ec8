"""One real optimizer step per method and per option that changes the graph: exactly the
intended networks get gradients and move, and the frozen teacher does not change. Plus
per-term stop-gradients of CTKD's two branches and their shared stem."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.methods import batch, build_method, grads, run_forward

# (method, teacher, params, networks that must train, networks that must not)
CASES = [
    ("vanilla", None, {}, {"student"}, set()),
    ("kd", "resnet20", {}, {"student"}, set()),
    ("at", "resnet20", {}, {"student"}, set()),
    ("at", "resnet20", {"mode": "paper"}, {"student"}, set()),
    ("dml", None, {"peers": ["resnet8"]}, {"student", "peers"}, set()),
    ("ctkd", "resnet20", {"at_target": "scratch"}, {"student", "scratch_teacher"}, set()),
    ("ctkd", "resnet20", {"at_target": "student"}, {"student", "scratch_teacher"}, set()),
    ("ctkd", "resnet20", {"at_target": "both", "hint": "kl"}, {"student", "scratch_teacher"}, set()),
    ("ctkd", "resnet20", {"share_stem": False}, {"student", "scratch_teacher"}, set()),
    ("prokt", "resnet20", {"teacher_init": "converged"}, {"student", "teacher"}, set()),
    ("prokt", "resnet20", {"teacher_init": "converged", "dual": True}, {"student", "teacher"}, set()),
    ("prokt", "resnet20", {"teacher_init": "converged", "target_bn": "running"}, {"student", "teacher"}, set()),
    ("ffcl", "resnet20", {}, {"student", "teacher", "fusion"}, set()),
    ("ffcl", "resnet20", {"mutual_weight": 0.0, "at_beta": 0.0, "pk_weight": 0.0}, {"student", "teacher", "fusion"},
     set()),
    ("ffcl", "resnet20", {"detach_fusion_inputs": True, "fusion_weight_decay": None},
     {"student", "teacher", "fusion"}, set()),
    ("sokd", "wrn_16_2", {}, {"student", "kbm"}, set()),
    ("kd", "resnet20", {"logit_standardization": True}, {"student"}, set()),
    ("dkd", "resnet20", {}, {"student"}, set()),
    ("dkd", "resnet20", {"logit_standardization": True, "warmup": 0}, {"student"}, set()),
    ("dist", "resnet20", {}, {"student"}, set()),
    ("dist", "resnet20", {"intra_batch": "global", "tau": 4.0}, {"student"}, set()),
    ("fitnet", "resnet20", {}, {"student", "regressor"}, set()),
    ("fitnet", "wrn_16_2", {"regressor_bn": False, "kd_weight": 0.9}, {"student", "regressor"}, set()),
    ("fitnet", "resnet20", {"student_layer": "layer3", "teacher_layer": "layer2", "hint_epochs": 1},
     {"student", "regressor"}, set()),
    ("rkd", "resnet20", {}, {"student"}, set()),
    ("rkd", "wrn_16_2", {"normalize": True, "kd_weight": 1.0}, {"student"}, set()),
    ("pkt", "resnet20", {}, {"student"}, set()),
    ("sp", "wrn_16_2", {}, {"student"}, set()),
    ("sp", "resnet20", {"student_layers": ["layer2", "layer3"], "teacher_layers": ["layer2", "layer3"]},
     {"student"}, set()),
    ("reviewkd", "resnet20", {"warmup_epochs": 0.0}, {"student", "abfs"}, set()),
    ("reviewkd", "wrn_16_2", {"warmup_epochs": 0.0, "abf_bn": False, "mid_channels": 16, "kd_weight": 0.9},
     {"student", "abfs"}, set()),
    ("reviewkd", "resnet20", {}, {"student"}, {"abfs"}),  # epoch 0 of the warm-up: the review term at weight 0
    ("crd", "resnet20", {"feat_dim": 16, "nce_k": 32}, {"student", "embed_student", "embed_teacher"}, set()),
    ("crd", "wrn_16_2", {"feat_dim": 16, "nce_k": 32, "negatives": "uniform", "kd_weight": 1.0},
     {"student", "embed_student", "embed_teacher"}, set()),
    ("deit", "resnet20", {}, {"student"}, set()),  # student: helpers.methods.STUDENTS (a tiny distilled ViT)
    ("deit", "resnet20", {"distillation": "soft", "tau": 3.0, "soft_normalization": "batch"}, {"student"}, set()),
    # The teacher's entry has targets: [summary, spatial] (helpers.methods.FEATURE_TARGETS).
    ("features", "resnet20", {}, {"student", "adaptors"}, set()),
    ("features", "wrn_16_2", {"hidden": 16, "inner": 1, "ce_weight": 0.5, "kd_weight": 1.0},
     {"student", "adaptors"}, set()),
]


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name, teacher, params, trained, untouched", CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[2].items()) or 'default'}" for c in CASES])
def test_one_step_trains_exactly_the_intended_networks(name, teacher, params, trained, untouched):
    method, frozen = build_method(name, "resnet8", teacher, **params)
    assert {n for n, _ in method.named_children()} == trained | untouched
    images, targets = batch(size=8)
    frozen_before = _snapshot(frozen.model) if frozen else None
    before = {n: copy.deepcopy(list(m.parameters())) for n, m in method.named_children()}
    for phase, spec in method.phases().items():
        optimizer = torch.optim.SGD([{k: v for k, v in g.items() if k != "lr_scale"}
                                     for g in spec.param_groups()], lr=0.1, momentum=0.9)
        method.zero_grad(set_to_none=True)
        _, losses = run_forward(method, images, targets, frozen(images) if frozen else None, phase=phase)
        total = sum(losses.values())
        assert torch.isfinite(total), losses
        phase_params = {id(p) for p in spec.module.parameters()}
        total.backward()
        for p in method.parameters():  # a phase's loss reaches only its own networks
            if id(p) not in phase_params:
                assert p.grad is None or not p.grad.any()
        optimizer.step()
    for network, module in method.named_children():
        moved = any(not torch.equal(a, b) for a, b in zip(before[network], module.parameters()))
        assert moved == (network in trained), network
    if frozen:
        after = frozen.model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in frozen_before.items())
        assert all(p.grad is None for p in frozen.model.parameters())


def _has_grad(gradients):
    return any(g is not None and g.abs().sum() > 0 for g in gradients)


def _split(method):
    """(shared stem, the student's own, the scratch teacher's own) parameter lists."""
    shared = {id(p) for p in method.student.parameters()} & {id(p) for p in method.scratch_teacher.parameters()}
    stem = [p for p in method.student.parameters() if id(p) in shared]
    own_student = [p for p in method.student.parameters() if id(p) not in shared]
    own_scratch = [p for p in method.scratch_teacher.parameters() if id(p) not in shared]
    return stem, own_student, own_scratch


def _grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


@pytest.mark.parametrize("at_target", ["scratch", "student"])
def test_ctkd_term_routing_with_shared_stem(at_target):
    method, frozen = build_method("ctkd", "resnet8", "resnet20", at_target=at_target)
    images, targets = batch()
    _, losses = method(images, targets, frozen(images))
    stem, own_student, own_scratch = _split(method)
    assert len(stem) == 3
    # The hint trains the student (and the stem it runs through), never the scratch branch's own layers.
    assert _has_grad(_grads(losses["hint"], own_student)) and _has_grad(_grads(losses["hint"], stem))
    assert not _has_grad(_grads(losses["hint"], own_scratch))
    assert not _has_grad(_grads(losses["scratch_ce"], own_student))
    assert not _has_grad(_grads(losses["ce"], own_scratch))
    at = losses[f"at_{at_target}"]
    target, other = (own_scratch, own_student) if at_target == "scratch" else (own_student, own_scratch)
    # The expert's attention trains its target branch; through the shared stem it reaches the student too.
    assert _has_grad(_grads(at, target)) and _has_grad(_grads(at, stem)) and not _has_grad(_grads(at, other))


def test_ctkd_without_shared_stem_keeps_branches_apart():
    method, frozen = build_method("ctkd", "resnet8", "resnet20", share_stem=False)
    images, targets = batch()
    _, losses = method(images, targets, frozen(images))
    assert not _has_grad(grads(losses["at_scratch"], method.student))
    assert not _has_grad(grads(losses["hint"], method.scratch_teacher))
