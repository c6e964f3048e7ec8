"""What one training step means, checked on the real engine and trainer: gradient
accumulation equals one big batch, clipping bounds the update, an online teacher sees
exactly the (mixed) images the student trains on, and no method lets a gradient reach
the teacher through its output."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from helpers.common import make_config
from helpers.methods import batch, build_method, run_forward
from torch import nn

from kdscale.config import load_config
from kdscale.engines import make_engine
from kdscale.methods import MethodContext, TeacherOutput, get_method_class
from kdscale.models import FeatureTaps
from kdscale.parallel.context import DistContext
from kdscale.train.loop import Trainer

CLASSES = 5


def single_process() -> DistContext:
    return DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def vanilla_on_mlp(seed: int = 0):
    """A BatchNorm-free student, so a batch split in two computes the same gradient."""
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    cls = get_method_class("vanilla")
    return cls(student, cls.Params(), MethodContext(CLASSES, 8)).train()


def data(size: int = 16):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(size, 3, 8, 8, generator=gen), torch.randint(0, CLASSES, (size,), generator=gen)


def train_steps(accum: int, overrides: list[str], step_each: bool = False) -> list[torch.Tensor]:
    cfg = load_config(None, [f"train.grad_accum_steps={accum}", "optim.name=sgd", "optim.momentum=0.9",
                             "optim.weight_decay=0.01", *overrides])
    distiller = vanilla_on_mlp()
    engine = make_engine("ddp", distiller, cfg, single_process())
    images, targets = data()
    for step in range(2):  # two optimizer steps: momentum carries the first into the second
        shift = step * 3
        for part in range(accum):
            chunk = slice(part * 16 // accum, (part + 1) * 16 // accum)
            engine.micro_step("all", images[chunk].roll(shift, 0), targets[chunk].roll(shift, 0), None,
                              sync=step_each or part == accum - 1, lr=0.1, autocast=contextlib.nullcontext)
    return [p.detach().clone() for p in distiller.parameters()]


@pytest.mark.parametrize("accum", [2, 4])
def test_gradient_accumulation_equals_one_batch(accum):
    whole, split = train_steps(1, []), train_steps(accum, [])
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The comparison can tell: stepping at every micro-batch instead lands elsewhere.
    eager = train_steps(accum, [], step_each=True)
    assert max((a - b).abs().max().item() for a, b in zip(whole, eager)) > 1e-3


def test_clipping_bounds_the_update():
    limit = 0.05
    cfg = load_config(None, [f"train.clip_grad_norm={limit}", "optim.name=sgd", "optim.momentum=0",
                             "optim.weight_decay=0"])
    distiller = vanilla_on_mlp()
    before = [p.detach().clone() for p in distiller.parameters()]
    images, targets = data()
    # The unclipped gradient is far above the limit.
    loss = nn.functional.cross_entropy(distiller.student(images), targets)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in
                                                 torch.autograd.grad(loss, list(distiller.parameters()))]))
    assert norm > 10 * limit
    engine = make_engine("ddp", distiller, cfg, single_process())
    engine.micro_step("all", images, targets, None, sync=True, lr=1.0, autocast=contextlib.nullcontext)
    step = torch.linalg.vector_norm(torch.cat([(b - p.detach()).flatten()
                                               for b, p in zip(before, distiller.parameters())]))
    assert step.item() == pytest.approx(limit, rel=1e-4)  # SGD, lr 1: the update is the clipped gradient


@pytest.mark.slow  # a real training run: the full tier
def test_online_teacher_sees_the_mixed_images(synth_data, tmp_path):
    cfg = make_config(synth_data, str(tmp_path), "method.name=kd", "student.name=resnet8", "teacher.name=resnet8",
                      "data.train_samples=160", "data.mixup_alpha=1.0", "data.cutmix_alpha=1.0",
                      "train.stop_after_steps=3", "train.checkpoint_every_steps=0")
    trainer = Trainer(cfg)
    seen: dict[str, list] = {"loader": [], "teacher": [], "student": []}
    next_batch, source, micro_step = trainer.inputs.next_batch, trainer.teacher, trainer.engine.micro_step

    def record_batch(*args):
        batch = next_batch(*args)
        seen["loader"].append(batch.images.clone())
        return batch

    def record_teacher(self, images, probs):
        seen["teacher"].append(images.clone())
        return type(self).__mro__[1].__call__(self, images, probs)

    def record_step(phase, images, *args, **kwargs):
        seen["student"].append(images.clone())
        return micro_step(phase, images, *args, **kwargs)

    source.__class__ = type("RecordingSource", (type(source),), {"__call__": record_teacher})  # the same source
    trainer.inputs.next_batch, trainer.engine.micro_step = record_batch, record_step
    try:
        trainer.train()
    finally:
        trainer.close()
    assert len(seen["teacher"]) == 3
    for loaded, taught, trained in zip(seen["loader"], seen["teacher"], seen["student"]):
        assert torch.equal(taught, trained)  # the teacher saw exactly the student's view
        assert not torch.equal(taught, loaded)  # and that view was mixed


FROZEN = [("kd", "resnet20"), ("at", "resnet20"), ("ctkd", "resnet20"), ("sokd", "wrn_16_2"), ("dkd", "resnet20"),
          ("dist", "resnet20")]
FROZEN += [("fitnet", "resnet20"), ("rkd", "resnet20"), ("pkt", "resnet20"), ("sp", "wrn_16_2")]
FROZEN += [("crd", "resnet20")]
FROZEN += [("reviewkd", "resnet20")]  # epoch 0: review at weight 0; tests/methods/test_reviewkd.py checks it at full weight


@pytest.mark.parametrize("name, teacher", FROZEN)
def test_method_lets_no_gradient_reach_the_teacher_through_its_output(name, teacher):
    """The frozen teacher's outputs arrive here from a live copy that *would* take gradients:
    only the method's own stop-gradients keep them away (FrozenTeacher's no-grad mode is not
    in the way, so a missing ``detach`` in a method fails this test)."""
    method, frozen = build_method(name, "resnet8", teacher)
    live = copy.deepcopy(frozen.model).requires_grad_(True)
    layers = list(method.teacher_needs().features)
    taps = FeatureTaps(live, layers, where="test", copy=True) if layers else None  # copying, as FrozenTeacher's
    images, targets = batch()
    logits = live(images)
    output = TeacherOutput(logits, taps.pop() if taps else {})
    assert logits.requires_grad and all(f.requires_grad for f in output.features.values())
    _, losses = run_forward(method, images, targets, output)
    sum(losses.values()).backward()
    assert all(p.grad is None or not p.grad.any() for p in live.parameters()), name
    assert any(p.grad is not None and p.grad.any() for p in method.student.parameters())
