"""Several frozen teachers (issue 26): the ensemble targets of :mod:`kdscale.methods.ensemble`
and the kd, dkd, dist and deit terms on them, against an independent float64 reference
(``tests/helpers/reference_ensemble.py``) for 2 and 3 teachers with unequal weights; one
teacher gives today's values bit for bit in every form; gradients reach the student only;
logit standardization with the probability mean of several teachers is refused at build
time; ``per_teacher`` names its terms ``kd_<id>``."""

from __future__ import annotations

import pytest
import torch
from helpers import reference_ensemble as ref
from helpers.methods import has_grad_from, tiny_distilled_vit
from torch import nn

from kdscale.errors import KdscaleError
from kdscale.methods import MethodContext, TeacherOutput, get_method_class
from kdscale.methods.deit import deit_hard_distillation, deit_soft_distillation
from kdscale.methods.dist import dist_relations
from kdscale.methods.dkd import decoupled_kd
from kdscale.methods.ensemble import ensemble_target_logits, mean_of_logits
from kdscale.methods.losses import cross_entropy, soft_kl

K = 10  # classes (the tiny distilled ViT's too)
B = 6
IDS = ("a", "b", "c")
WEIGHTS = {1: (1.0,), 2: (0.7, 0.3), 3: (0.5, 0.3, 0.2)}


def approx(value, rel: float = 1e-5):
    return pytest.approx(value, rel=rel, abs=1e-7)


def member_logits(n: int, seed: int = 5, scale: float = 3.0, requires_grad: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, K, generator=gen) * scale + i).requires_grad_(requires_grad) for i in range(n)]


def teacher_output(zs: list[torch.Tensor], weights=None) -> TeacherOutput:
    """What the trainer hands over: the members, their normalised weights, the mean of logits."""
    weights = weights or WEIGHTS[len(zs)]
    ids = IDS[:len(zs)]
    mean = zs[0] if len(zs) == 1 else sum(w * z for w, z in zip(weights, zs))
    return TeacherOutput(logits=mean, members=dict(zip(ids, zs)), weights=dict(zip(ids, weights)))


def pairs(zs):
    return list(zip(zs, WEIGHTS[len(zs)]))


def data(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 32, 32, generator=gen), torch.randint(0, K, (B,), generator=gen)


def build(name: str, teachers: int = 2, **params):
    """The method on a linear student over flattened images (deit: a tiny distilled ViT)."""
    torch.manual_seed(0)
    cls = get_method_class(name)
    context = MethodContext(num_classes=K, image_size=32, method_name=name, teacher_role="frozen",
                            teacher_ids=IDS[:teachers])
    student = tiny_distilled_vit(K) if name == "deit" else nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, K))
    return cls(student, cls.Params(**params), context).train()


def deit_heads(student, images):
    student.set_distilled_training(True)
    try:
        class_logits, dist_logits = student(images)
    finally:
        student.set_distilled_training(False)
    return class_logits.detach(), dist_logits.detach()


# -- the targets -----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("t", [1.0, 4.0])
def test_targets_against_reference(n, t):
    zs = member_logits(n)
    out = teacher_output(zs)
    probs = torch.softmax(ensemble_target_logits(out, t, "probs").double() / t, dim=1)
    torch.testing.assert_close(probs, ref.ensemble_probs(pairs(zs), t), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ensemble_target_logits(out, t, "logits").double(), ref.mean_logits(pairs(zs)),
                               rtol=1e-5, atol=1e-5)
    # The mean of logits comes from the members, not from the output's own logits.
    hand_built = TeacherOutput(logits=torch.zeros(B, K), members=out.members, weights=out.weights)
    torch.testing.assert_close(mean_of_logits(hand_built), ensemble_target_logits(out, t, "logits"))


def test_probability_target_is_stable_for_saturated_teachers():
    zs = member_logits(3, scale=1e4)
    target = ensemble_target_logits(teacher_output(zs), 1.0, "probs")
    assert torch.isfinite(target).all()
    torch.testing.assert_close(torch.softmax(target.double(), 1), ref.ensemble_probs(pairs(zs), 1.0),
                               rtol=1e-5, atol=1e-6)


def test_one_teacher_is_returned_itself():
    z = member_logits(1)[0]
    for out in (TeacherOutput(z), teacher_output([z])):
        for mode in ("probs", "logits"):
            assert ensemble_target_logits(out, 4.0, mode) is z
        assert mean_of_logits(out) is z


def test_identical_teachers_equal_one_teacher_in_every_form():
    """Weights normalised to sum 1: an ensemble of copies of one teacher is that teacher."""
    z = member_logits(1)[0]
    images, targets = data()
    for mode in ("probs", "logits", "per_teacher"):
        method = build("kd", 2, ensemble=mode)
        _, single = method(images, targets, TeacherOutput(z))
        _, copies = method(images, targets, teacher_output([z, z.clone()], (0.5, 0.5)))
        kd = sum(v for k, v in copies.items() if k.startswith("kd"))
        assert kd.item() == approx(single["kd"].item())


# -- golden values per method ----------------------------------------------------------------
KD_CASES = [("probs", False), ("logits", False), ("per_teacher", False), ("logits", True), ("per_teacher", True)]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize(("mode", "standardize"), KD_CASES)
def test_kd_against_reference(n, mode, standardize):
    zs = member_logits(n)
    t = 2.0 if standardize else 4.0
    method = build("kd", n, ensemble=mode, temperature=t, ce_weight=0.3, kd_weight=0.9,
                   logit_standardization=standardize)
    images, targets = data()
    logits, losses = method(images, targets, teacher_output(zs))
    expected = ref.kd_terms(logits, pairs(zs), IDS[:n], t, mode, 0.9, standardize)
    assert set(losses) == {"ce", *expected}
    for name, value in expected.items():
        assert losses[name].item() == approx(value), name
    assert losses["ce"].item() == approx(0.3 * cross_entropy(logits, targets).item())


def test_per_teacher_terms_are_named_by_id_and_sum_to_the_weighted_mean():
    zs = member_logits(3)
    method = build("kd", 3, ensemble="per_teacher", kd_weight=0.9)
    images, targets = data()
    logits, losses = method(images, targets, teacher_output(zs))
    assert set(losses) == {"ce", "kd_a", "kd_b", "kd_c"}
    single = [soft_kl(z, logits.detach(), 4.0).item() for z in zs]
    total = sum(losses[f"kd_{i}"].item() for i in IDS)
    assert total == approx(0.9 * sum(w * v for w, v in zip(WEIGHTS[3], single)))


DKD_CASES = [("probs", False), ("logits", False), ("logits", True)]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize(("mode", "standardize"), DKD_CASES)
def test_dkd_against_reference(n, mode, standardize):
    zs = member_logits(n)
    t = 4.0
    method = build("dkd", n, ensemble=mode, temperature=t, alpha=1.5, beta=3.0, warmup=0,
                   logit_standardization=standardize)
    images, targets = data()
    logits, losses = method(images, targets, teacher_output(zs))
    if mode == "probs":
        target = ref.ensemble_probs(pairs(zs), t)
    else:
        mean = ref.mean_logits(pairs(zs))
        target = ref.softmax(ref.standardize(mean) if standardize else mean, t)
    student = ref.standardize(logits) if standardize else logits
    tckd, nckd = ref.dkd_terms(student, target, targets, t)
    # DKD's binary KL in float32 sums near-equal logs: about 1e-5 relative, as test_logit_methods allows.
    assert losses["tckd"].item() == approx(1.5 * tckd, rel=1e-4)
    assert losses["nckd"].item() == approx(3.0 * nckd, rel=1e-4)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("mode", ["probs", "logits"])
def test_dist_against_reference(n, mode):
    zs = member_logits(n)
    tau = 2.0
    method = build("dist", n, ensemble=mode, tau=tau, kd_weight=2.0, beta=1.0, gamma=0.5)
    images, targets = data()
    logits, losses = method(images, targets, teacher_output(zs))
    target = ref.ensemble_probs(pairs(zs), tau) if mode == "probs" else ref.softmax(ref.mean_logits(pairs(zs)), tau)
    inter, intra = ref.dist_terms(logits, target, tau)
    assert losses["inter"].item() == approx(2.0 * inter)
    assert losses["intra"].item() == approx(2.0 * 0.5 * intra)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("mode", ["probs", "logits"])
@pytest.mark.parametrize("distillation", ["soft", "hard"])
def test_deit_against_reference(n, mode, distillation):
    zs = member_logits(n)
    tau = 2.0
    method = build("deit", n, ensemble=mode, distillation=distillation, tau=tau, alpha=0.6)
    images, targets = data()
    _, losses = method(images, targets, teacher_output(zs))
    _, dist_logits = deit_heads(method.student, images)
    target = ref.ensemble_probs(pairs(zs), tau) if mode == "probs" else ref.softmax(ref.mean_logits(pairs(zs)), tau)
    if distillation == "soft":
        expected = ref.deit_soft(dist_logits, target, tau)
    else:
        expected = ref.deit_hard(dist_logits, target)
    assert losses["dist"].item() == approx(0.6 * expected)


@pytest.mark.parametrize(("mode", "label"), [("logits", 0), ("probs", 1)])
def test_hard_deit_takes_the_argmax_of_its_ensemble_form(mode, label):
    """The two forms are different targets: one very confident teacher outvotes two others
    under the mean of logits ([10, 2, 0]: class 0), not under the mean of probabilities
    (about [0.36, 0.61, 0.03]: class 1)."""
    confident, mild = torch.zeros(B, K), torch.zeros(B, K)
    confident[:, 0], mild[:, 1] = 30.0, 3.0
    zs = [confident, mild, mild.clone()]
    out = teacher_output(zs, (1 / 3, 1 / 3, 1 / 3))
    assert ref.ensemble_probs([(z, 1 / 3) for z in zs], 1.0).argmax(1).tolist() == [1] * B
    method = build("deit", 3, ensemble=mode, distillation="hard", alpha=0.6)
    images, targets = data()
    _, losses = method(images, targets, out)
    _, dist_logits = deit_heads(method.student, images)
    labels = torch.zeros(B, K)
    labels[:, label] = 1.0
    assert losses["dist"].item() == approx(0.6 * ref.deit_hard(dist_logits, labels))


# -- one teacher: today's values, bit for bit -------------------------------------------------
def today(name, method, logits, z, images, targets):
    """The term as the method computed it before ensembles, from the existing functions."""
    p = method.params
    if name == "kd":
        return {"kd": p.kd_weight * soft_kl(z, logits, p.temperature, p.t_squared, p.logit_standardization)}
    if name == "dkd":
        tckd, nckd = decoupled_kd(z, logits, targets, p.temperature, p.logit_standardization)
        return {"tckd": method.warmup_factor() * p.alpha * tckd, "nckd": method.warmup_factor() * p.beta * nckd}
    if name == "dist":
        inter, intra = dist_relations(z, logits, p.tau, p.intra_batch)
        return {"inter": p.kd_weight * p.beta * inter, "intra": p.kd_weight * p.gamma * intra}
    _, dist_logits = deit_heads(method.student, images)
    if p.distillation == "soft":
        return {"dist": p.alpha * deit_soft_distillation(dist_logits, z, p.tau, p.soft_normalization)}
    return {"dist": p.alpha * deit_hard_distillation(dist_logits, z)}


SINGLE = [("kd", {"ensemble": m, "logit_standardization": ls}) for m in ("probs", "logits", "per_teacher")
          for ls in (False, True)] + [
    ("dkd", {"ensemble": m, "logit_standardization": ls}) for m in ("probs", "logits") for ls in (False, True)] + [
    ("dist", {"ensemble": m}) for m in ("probs", "logits")] + [
    ("deit", {"ensemble": m, "distillation": d, "tau": 2.0}) for m in ("probs", "logits") for d in ("soft", "hard")]


@pytest.mark.parametrize(("name", "params"), SINGLE, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={x}" for k, x in v.items()))
def test_one_teacher_gives_todays_terms_exactly(name, params):
    z = member_logits(1)[0]
    images, targets = data()
    for out in (TeacherOutput(z), teacher_output([z])):
        method = build(name, 1, **params)
        method.set_epoch(3)
        logits, losses = method(images, targets, out)
        expected = today(name, method, logits, z, images, targets)
        assert set(losses) == {"ce", *expected}
        for term, value in expected.items():
            assert torch.equal(losses[term], value), term


# -- routing and refusals --------------------------------------------------------------------
ROUTES = [("kd", {"ensemble": m}) for m in ("probs", "logits", "per_teacher")] + [
    ("kd", {"ensemble": "per_teacher", "logit_standardization": True}),
    ("dkd", {"ensemble": "probs", "warmup": 0}), ("dkd", {"ensemble": "logits", "logit_standardization": True}),
    ("dist", {"ensemble": "probs"}), ("dist", {"ensemble": "logits"}),
    ("deit", {"ensemble": "probs", "distillation": "soft"}), ("deit", {"ensemble": "logits", "distillation": "hard"})]


@pytest.mark.parametrize(("name", "params"), ROUTES, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={x}" for k, x in v.items()))
def test_gradients_reach_the_student_never_a_teacher(name, params):
    zs = member_logits(3, requires_grad=True)  # as if the teachers could learn: the method must detach
    out = teacher_output(zs)
    method = build(name, 3, **params)
    images, targets = data()
    _, losses = method(images, targets, out)
    distill = sum(v for k, v in losses.items() if k != "ce")
    assert has_grad_from(distill, method.student)
    distill.backward()
    assert all(z.grad is None for z in zs)


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_standardization_with_probability_mean_of_several_teachers_is_refused(name):
    with pytest.raises(KdscaleError) as err:
        build(name, 2, ensemble="probs", logit_standardization=True)
    message = str(err.value)
    assert "\n" not in message
    assert "method.logit_standardization=true" in message and "method.ensemble=logits" in message
    assert ("per_teacher" in message) == (name == "kd")
    build(name, 1, ensemble="probs", logit_standardization=True)  # one teacher: the z-score has its logits
    build(name, 0, ensemble="probs", logit_standardization=True)  # hand-built contexts name no teacher
    build(name, 2, ensemble="logits", logit_standardization=True)
    if name == "kd":
        build(name, 3, ensemble="per_teacher", logit_standardization=True)
