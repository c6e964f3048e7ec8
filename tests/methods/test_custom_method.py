"""The "write your own method" example of docs/methods.md, run as written: it registers,
computes its documented loss, routes gradients to the student only, and trains for real
through the trainer with a frozen teacher that stays bit-identical."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from helpers.common import ROOT, make_config
from helpers.methods import batch, build_method, has_grad_from

from kdscale.methods import METHODS
from kdscale.models import build_model
from kdscale.train.loop import Trainer

DOC = os.path.join(ROOT, "docs", "methods.md")


def example_source() -> str:
    text = open(DOC).read()
    section = text[text.index("## Write your own method"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture()
def logit_mse():
    namespace: dict = {}
    exec(compile(example_source(), f"{DOC} (example)", "exec"), namespace)
    try:
        yield METHODS["logit_mse"]
    finally:
        METHODS.pop("logit_mse", None)


def test_example_computes_its_formula_and_routes_gradients(logit_mse):
    method, frozen = build_method("logit_mse", "resnet8", "resnet20", ce_weight=0.5, mse_weight=2.0)
    images, targets = batch(size=6)
    teacher_output = frozen(images)
    logits, terms = method(images, targets, teacher_output)
    z_s, z_t = logits.detach().double().tolist(), teacher_output.logits.double().tolist()
    squared = [(a - b) ** 2 for row_s, row_t in zip(z_s, z_t) for a, b in zip(row_s, row_t)]
    ce = 0.0
    for row, y in zip(z_s, targets.tolist()):
        top = max(row)
        ce += top + math.log(sum(math.exp(v - top) for v in row)) - row[y]
    assert terms["mse"].item() == pytest.approx(2.0 * sum(squared) / len(squared), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.5 * ce / len(z_s), rel=1e-5)
    assert has_grad_from(terms["mse"], method.student)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in frozen.model.parameters())


@pytest.mark.slow  # a real training run: the full tier
def test_example_trains_through_the_trainer(logit_mse, synth_data, tmp_path):
    torch.manual_seed(7)
    weights = str(tmp_path / "teacher.pt")
    torch.save(build_model("resnet20", 10).state_dict(), weights)
    cfg = make_config(synth_data, str(tmp_path), "method.name=logit_mse", "student.name=resnet8",
                      "teacher.name=resnet20", f"teacher.weights={weights}", "data.train_samples=160",
                      "train.epochs=1", "train.log_every_steps=1", "method.mse_weight=0.5")
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.teacher.frozen.model.state_dict().items()}
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary["completed"] and summary["metrics"]["val/samples"] > 0
    lines = [json.loads(line) for line in open(os.path.join(cfg.run_dir, "metrics.jsonl"))]
    mse = [line["train/loss_mse"] for line in lines if "train/loss_mse" in line]
    assert len(mse) == summary["step"] and all(math.isfinite(v) for v in mse)
    after = trainer.teacher.frozen.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
