"""The ``features`` method (AM-RADIO's recipe, kdscale/methods/features.py): every loss term
against the float64 reference of tests/helpers/reference_features.py with two teachers of
different widths, grids and weights, the gradient routing, the refusal without feature
targets, ``labels_needed`` and what validation scores (``evaluation_features``)."""

from __future__ import annotations

import pytest
import torch
from helpers import reference_features as ref

from kdscale.errors import KdscaleError
from kdscale.methods import MethodContext, TeacherOutput, get_method_class
from kdscale.models import build_model

NUM_CLASSES = 10
# Two teachers that give features, of different widths: "a" on a coarser grid than the
# student's (ResNet-8: 64 channels on 8x8; an antialiased shrink), "b" on a finer one.
TARGETS = {"a": {"summary": (12,), "spatial": (6, 5, 5)}, "b": {"summary": (20,), "spatial": (10, 12, 12)}}
# Entry weights normalised over all three teachers (as the run gives them); "c" gives logits
# only, so the feature terms weigh a and b by 1/4 and 3/4.
WEIGHTS = {"a": 1 / 6, "b": 3 / 6, "c": 2 / 6}


def _build(targets=None, weights=None, smoothing: float = 0.0, **params):
    torch.manual_seed(0)
    cls = get_method_class("features")
    context = MethodContext(num_classes=NUM_CLASSES, image_size=32, method_name="features", student_name="resnet8",
                            teacher_role="frozen", label_smoothing=smoothing,
                            teacher_targets=TARGETS if targets is None else targets,
                            teacher_weights=WEIGHTS if weights is None else weights)
    method = cls(build_model("resnet8", NUM_CLASSES), cls.Params(**params), context).train()
    for p in method.adaptors.parameters():  # LayerNorm's ones and zeros would hide a swapped gamma/beta
        p.data.normal_(0, 0.5)
    return method


def _teacher_output(seed: int = 3, batch: int = 4, requires_grad: bool = False) -> TeacherOutput:
    gen = torch.Generator().manual_seed(seed)
    features = {tid: {kind: (torch.randn(batch, *shape, generator=gen) * (3.0 if kind == "spatial" else 1.0))
                      .requires_grad_(requires_grad) for kind, shape in kinds.items()}
                for tid, kinds in TARGETS.items()}
    logits = torch.randn(batch, NUM_CLASSES, generator=gen) * 2
    return TeacherOutput(logits, member_features=features)


def _inputs(batch: int = 4):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, NUM_CLASSES, (batch,), generator=gen)


def _student_features(student, run):
    """``run()``'s output and the student's classifier input and pool input, taken by hooks here."""
    seen = {}
    handles = [student.fc.register_forward_pre_hook(lambda _m, inputs: seen.__setitem__("summary", inputs[0])),
               student.avgpool.register_forward_pre_hook(lambda _m, inputs: seen.__setitem__("spatial", inputs[0]))]
    try:
        out = run()
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


def _layers(mlp):
    def linear(layer):
        return layer.weight.double().tolist(), layer.bias.double().tolist()

    def norm(layer):
        return layer.weight.double().tolist(), layer.bias.double().tolist()

    return (linear(mlp.fc1), [(norm(b[0]), linear(b[2])) for b in mlp.blocks],
            (norm(mlp.final[0]), linear(mlp.final[2])))


def _adaptor_layers(method, tid, kind):
    module = method.adaptors[f"{tid}_{kind}"]
    return _layers(module if kind == "summary" else module.mlp)


PARAMS = [
    {},  # the defaults: summary and spatial terms only, 0.9 cosine + 0.1 smooth-L1
    {"summary_weight": 0.7, "spatial_weight": 1.3, "cosine_weight": 0.6, "smooth_l1_weight": 0.4, "hidden": 7,
     "inner": 1, "ce_weight": 0.5, "kd_weight": 2.0, "temperature": 3.0},
]


@pytest.mark.parametrize("params", PARAMS, ids=["defaults", "every-term"])
def test_features_terms_match_reference(params):
    method = _build(smoothing=0.1, **params)
    images, labels = _inputs()
    teacher = _teacher_output()
    (logits, terms), seen = _student_features(method.student, lambda: method(images, labels, teacher))
    expected_names = {f"{kind}_{tid}" for tid in TARGETS for kind in ("summary", "spatial")}
    expected_names |= {name for name in ("ce", "kd") if params.get(f"{name}_weight", 0) > 0}
    assert set(terms) == expected_names
    for tid, kinds in TARGETS.items():  # RADIO's MLP2: hidden width default the teacher's, `inner` blocks
        for kind, shape in kinds.items():
            mlp = method.adaptors[f"{tid}_{kind}"]
            mlp = mlp if kind == "summary" else mlp.mlp
            assert (mlp.fc1.in_features, mlp.fc1.out_features, mlp.final[2].out_features, len(mlp.blocks)) == \
                (64, params.get("hidden", shape[0]), shape[0], params.get("inner", 0))
    full = {**method.Params().__dict__, **params, "teacher_logits": teacher.logits.double().tolist()}
    teachers = {tid: {kind: (_adaptor_layers(method, tid, kind), teacher.member_features[tid][kind].double().tolist())
                      for kind in kinds} for tid, kinds in TARGETS.items()}
    expected = ref.features_terms(seen["summary"].double().tolist(), seen["spatial"].double().tolist(),
                                  logits.double().tolist(), labels.tolist(), teachers, WEIGHTS, full, smoothing=0.1)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5, abs=1e-7), name
    torch.testing.assert_close(logits, method.student(images))  # the student's own classifier is the output


def test_a_teachers_weight_scales_only_its_own_terms():
    teacher = _teacher_output()
    images, labels = _inputs()
    equal = _build(weights={"a": 0.5, "b": 0.5})(images, labels, teacher)[1]
    skewed = _build()(images, labels, teacher)[1]  # a: 1/4, b: 3/4 of the teachers that give features
    for kind in ("summary", "spatial"):
        assert skewed[f"{kind}_a"].item() == pytest.approx(equal[f"{kind}_a"].item() / 2, rel=1e-5)
        assert skewed[f"{kind}_b"].item() == pytest.approx(equal[f"{kind}_b"].item() * 3 / 2, rel=1e-5)


def test_gradients_reach_the_student_and_each_teachers_own_heads_never_the_targets():
    method = _build(ce_weight=0.5, kd_weight=1.0)
    images, labels = _inputs()
    teacher = _teacher_output(requires_grad=True)
    teacher.logits.requires_grad_(True)
    _, terms = method(images, labels, teacher)
    student = [p for p in method.student.parameters()]
    for name, term in terms.items():
        grads = torch.autograd.grad(term, student, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
        for head_name, head in method.adaptors.items():
            head_grads = torch.autograd.grad(term, list(head.parameters()), retain_graph=True, allow_unused=True)
            tid, kind = head_name.rsplit("_", 1)
            own = name == f"{kind}_{tid}"  # a head is trained by its own teacher's term of its own kind only
            assert all((g is not None and g.abs().sum() > 0) == own for g in head_grads), (name, head_name)
    sum(terms.values()).backward()
    assert all(t.grad is None for kinds in teacher.member_features.values() for t in kinds.values())
    assert teacher.logits.grad is None


@pytest.mark.parametrize("targets", [{}, None])
def test_refuses_without_a_teacher_that_gives_feature_targets(targets):
    if targets is None:
        method = _build()
        with pytest.raises(KdscaleError) as err:  # a batch without one teacher's spatial map
            method(*_inputs(), TeacherOutput(None, member_features={"a": {"summary": torch.randn(4, 12)}}))
        assert str(err.value) == "method 'features': teacher 'a' gave no spatial features for this batch"
        return
    with pytest.raises(KdscaleError) as err:
        _build(targets=targets)
    message = str(err.value)
    assert "\n" not in message and "targets: [summary, spatial]" in message and "'features'" in message


def test_kd_without_teacher_logits_is_refused():
    method = _build(kd_weight=1.0)
    teacher = _teacher_output()
    teacher.logits = None
    with pytest.raises(KdscaleError, match="kd_weight > 0 needs a teacher that gives logits"):
        method(*_inputs(), teacher)


def test_labels_needed_only_with_a_cross_entropy_term():
    cls = get_method_class("features")
    assert cls.needs_labels is False and cls.distils_features is True
    assert cls.labels_needed(cls.Params()) is False
    assert cls.labels_needed(cls.Params(kd_weight=1.0)) is False
    assert cls.labels_needed(cls.Params(ce_weight=0.1)) is True


def test_evaluation_features_are_the_students_summary_and_each_teachers_cosines():
    method = _build().eval()
    images, _ = _inputs()
    teacher = _teacher_output()
    with torch.no_grad():
        features, seen = _student_features(method.student, lambda: method.evaluation_features(images, teacher))
    summaries, cosines = features
    assert set(summaries) == {"student"}
    torch.testing.assert_close(summaries["student"], seen["summary"])  # the classifier's input
    assert set(cosines) == {"a", "a_spatial", "b", "b_spatial"}
    student_summary, student_map = seen["summary"].double().tolist(), seen["spatial"].double().tolist()
    for tid, kinds in TARGETS.items():
        target = teacher.member_features[tid]
        layers = _adaptor_layers(method, tid, "summary")
        expected = [1 - ref.summary_loss([ref.mlp2(s, *layers)], [t])
                    for s, t in zip(student_summary, target["summary"].double().tolist())]
        torch.testing.assert_close(cosines[tid].double(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
        layers, grid = _adaptor_layers(method, tid, "spatial"), kinds["spatial"][1:]
        expected = [1 - ref.spatial_loss([ref.spatial_adaptor(m, layers, grid)], [t], 1.0, 0.0)  # mean cosine
                    for m, t in zip(student_map, target["spatial"].double().tolist())]
        torch.testing.assert_close(cosines[f"{tid}_spatial"].double(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
    # Without teachers' outputs (a replayed teacher has none in validation): the summary only.
    with torch.no_grad():
        summaries, cosines = method.evaluation_features(images, None)
        assert set(summaries) == {"student"} and cosines == {}
        partial = TeacherOutput(None, member_features={"b": teacher.member_features["b"]})
        assert set(method.evaluation_features(images, partial).cosines) == {"b", "b_spatial"}


def test_cosines_compare_each_teacher_with_its_own_heads():
    method = _build().eval()
    images, _ = _inputs()
    teacher = _teacher_output()
    with torch.no_grad():
        adapted = method.adaptors["a_summary"](method.student_targets(images)[1]["summary"])
        teacher.member_features["a"]["summary"] = adapted * 5  # the same direction: cosine 1
        cosines = method.evaluation_features(images, teacher).cosines
    torch.testing.assert_close(cosines["a"], torch.ones(4))
    assert (cosines["b"] < 0.99).all()
