"""Coverage that cannot drift: every registered method (``METHODS``) has its row in every
per-method table of the suite and the docs. A method added without one fails here, naming
the table."""

from __future__ import annotations

import ast
import json
import os
import re

import pytest
import test_method_runs
import test_method_steps
from helpers import loss_curves
from helpers.common import ROOT

from kdscale.analysis.references import REFERENCES
from kdscale.methods import METHODS

TESTS = os.path.join(ROOT, "tests", "methods")

# The golden-value test of each method's loss terms against an independent reference.
GOLDEN = {
    "vanilla": "test_kd_loss.py::test_vanilla_is_plain_cross_entropy_with_label_smoothing",
    "kd": "test_kd_loss.py::test_kd_method_terms_match_reference",
    "at": "test_method_losses.py::test_at_method",
    "dml": "test_method_losses.py::test_dml_method",
    "ctkd": "test_method_losses.py::test_ctkd_method",
    "prokt": "test_method_losses.py::test_prokt_phases",
    "ffcl": "test_method_losses.py::test_ffcl_method",
    "sokd": "test_method_losses.py::test_sokd_method",
    "dkd": "test_logit_methods.py::test_dkd_method",
    "dist": "test_logit_methods.py::test_dist_method",
    "fitnet": "test_feature_methods.py::test_fitnet_method",
    "rkd": "test_feature_methods.py::test_rkd_method",
    "pkt": "test_feature_methods.py::test_pkt_method",
    "sp": "test_feature_methods.py::test_sp_method",
    "crd": "test_crd.py::test_loss_and_banks_match_the_reference_over_two_steps",
    "reviewkd": "test_reviewkd.py::test_terms_against_reference",
    "deit": "test_deit.py::test_deit_terms_match_reference",
    "features": "test_features_method.py::test_features_terms_match_reference",
}

# Published CIFAR-100 top-1 in kdscale.analysis.references: the pair to find, or why there is none.
PUBLISHED_CIFAR100 = {
    "kd": ("resnet32x4", "resnet8x4"), "at": ("wrn_40_2", "wrn_16_2"), "dkd": ("resnet32x4", "resnet8x4"),
    "dist": ("resnet32x4", "resnet8x4"), "fitnet": ("resnet32x4", "resnet8x4"), "rkd": ("resnet32x4", "resnet8x4"),
    "pkt": ("resnet32x4", "resnet8x4"), "sp": ("resnet32x4", "resnet8x4"), "crd": ("resnet32x4", "resnet8x4"),
    "reviewkd": ("resnet32x4", "resnet8x4"),
    "vanilla": "no distillation: the teachers' and students' own figures are in the configs' comments",
    "prokt": "published on text classification (GLUE) only",
    "ctkd": "the paper's full text, where its CIFAR figures are, was not found (design notes)",
    "ffcl": "the paper's full text was not found (design notes)",
    "sokd": "not read back from a README or a shipped config yet",
    "dml": "the paper's CIFAR-100 pairs are not the RepDistiller pairs; not read back yet",
    "deit": "a distilled ViT student; published on ImageNet (and transfer), not on the CIFAR-100 pairs",
    "features": "AM-RADIO distils foundation models' features at ImageNet scale and reports k-NN, zero-shot and "
                "dense-task figures, none on the CIFAR-100 pairs",
}


def test_the_tables_name_only_registered_methods():
    for table in (GOLDEN, PUBLISHED_CIFAR100):
        assert set(table) == set(METHODS), set(table) ^ set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_has_a_golden_value_test(method):
    assert method in GOLDEN, f"{method}: no golden-value test in GOLDEN"
    file, name = GOLDEN[method].split("::")
    tree = ast.parse(open(os.path.join(TESTS, file)).read())
    assert name in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, GOLDEN[method]
    assert method in open(os.path.join(TESTS, file)).read()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_has_routing_and_one_step_cases(method):
    assert method in {case[0] for case in test_method_steps.CASES}, f"{method}: not in test_method_steps.CASES"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_has_a_pinned_loss_curve(method):
    cases = [case for case, spec in loss_curves.CASES.items() if spec[0] == method]
    assert cases, f"{method}: not in tests/helpers/loss_curves.py CASES"
    pinned = json.load(open(loss_curves.GOLDEN))
    assert all(case in pinned for case in cases), f"{method}: regenerate tests/golden/loss_curves.json"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_has_an_entry_point_run(method):
    assert method in test_method_runs.EXPECTED, f"{method}: not in test_method_runs.EXPECTED"
    if METHODS[method].teacher_role != "none":
        assert method in test_method_runs.TEACHERS, f"{method}: no teacher in test_method_runs.TEACHERS"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_with_published_cifar_figures_is_in_the_references(method):
    pair = PUBLISHED_CIFAR100[method]
    if isinstance(pair, str):
        assert not any(ref.method == method and ref.dataset == "cifar100" for ref in REFERENCES), \
            f"{method} has published figures in references.py: name its pair in PUBLISHED_CIFAR100"
        return
    found = [ref for ref in REFERENCES if (ref.method, ref.dataset, ref.teacher, ref.student)
             == (method, "cifar100", *pair)]
    assert found, f"{method} {pair[0]} -> {pair[1]}: no published CIFAR-100 figure in analysis/references.py"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_is_in_the_readme_methods_table(method):
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = readme.split("### Methods", 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    named = {name for cell in first_cells for name in re.findall(r"`([a-z_]+)`", cell)}
    assert method in named, f"{method}: not in README.md's methods table"
