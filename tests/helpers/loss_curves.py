"""Pinned short loss curves: every method's loss terms over its first steps on fixed tiny
data, so that a refactor cannot change the math silently.

``python tests/helpers/loss_curves.py --write [CASE ...]`` regenerates ``tests/golden/loss_curves.json``
(the named cases only, or every case); do that only for a change of the math that is meant
(and say so in the commit)."""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from helpers.methods import batch, build_method, run_forward  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden", "loss_curves.json")
STEPS = 3
# name -> (method, teacher, params, epoch)
CASES = {
    "vanilla": ("vanilla", None, {}, 0),
    "kd": ("kd", "resnet20", {}, 0),
    "at": ("at", "resnet20", {}, 0),
    "dml": ("dml", None, {}, 0),
    "ctkd": ("ctkd", "resnet20", {}, 0),
    "prokt": ("prokt", "resnet20", {}, 0),
    "prokt-converged-dual": ("prokt", "resnet20", {"teacher_init": "converged", "dual": True}, 0),
    "ffcl-epoch40": ("ffcl", "resnet20", {}, 40),
    "sokd": ("sokd", "wrn_16_2", {}, 0),
    "kd-ls": ("kd", "resnet20", {"logit_standardization": True, "temperature": 2.0, "ce_weight": 0.1,
                                 "kd_weight": 9.0}, 0),
    "dkd-epoch5": ("dkd", "resnet20", {}, 5),
    "dkd-ls": ("dkd", "resnet20", {"logit_standardization": True, "warmup": 1}, 0),
    "dist-tau4": ("dist", "resnet20", {"tau": 4.0}, 0),
    "fitnet": ("fitnet", "resnet20", {}, 0),
    "rkd": ("rkd", "resnet20", {}, 0),
    "pkt": ("pkt", "resnet20", {}, 0),
    "sp": ("sp", "wrn_16_2", {}, 0),
    "reviewkd-epoch10": ("reviewkd", "resnet20", {}, 10),
    "crd": ("crd", "resnet20", {"feat_dim": 16, "nce_k": 32}, 0),
    "deit-soft": ("deit", "resnet20", {"distillation": "soft", "tau": 3.0}, 0),  # a tiny distilled ViT student
    # The teacher gives targets: [summary, spatial] (helpers.methods.FEATURE_TARGETS).
    "features": ("features", "resnet20", {}, 0),
    "features-inner-ce-kd": ("features", "wrn_16_2", {"inner": 1, "ce_weight": 0.5, "kd_weight": 1.0}, 0),
}


def loss_curve(case: str) -> list[dict[str, float]]:
    """Per step, every loss term's value (summed over the step's phases)."""
    name, teacher, params, epoch = CASES[case]
    method, frozen = build_method(name, "resnet8", teacher, **params)
    method.set_epoch(epoch)
    optimizers = {phase: torch.optim.SGD([{k: v for k, v in g.items() if k != "lr_scale"}
                                          for g in spec.param_groups()], lr=0.05, momentum=0.9,
                                         weight_decay=5e-4)
                  for phase, spec in method.phases().items()}
    curve = []
    for step in range(STEPS):
        images, targets = batch(size=8, seed=100 + step)
        terms = {}
        for phase, optimizer in optimizers.items():
            optimizer.zero_grad(set_to_none=True)
            _, losses = run_forward(method, images, targets, frozen(images) if frozen else None, phase=phase,
                                    seed=step)
            sum(losses.values()).backward()
            optimizer.step()
            terms.update({k: v.item() for k, v in losses.items()})
        curve.append(terms)
    return curve


if __name__ == "__main__":
    if not sys.argv[1:] or sys.argv[1] != "--write" or any(case not in CASES for case in sys.argv[2:]):
        sys.exit("usage: python tests/helpers/loss_curves.py --write [CASE ...]  (no case: every case)")
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    pinned = json.load(open(GOLDEN)) if os.path.exists(GOLDEN) else {}
    pinned.update({case: loss_curve(case) for case in (sys.argv[2:] or CASES)})
    with open(GOLDEN, "w") as fh:
        json.dump(pinned, fh, indent=1, sort_keys=True)
    print(f"wrote {GOLDEN}: {', '.join(sys.argv[2:]) or 'every case'}")
