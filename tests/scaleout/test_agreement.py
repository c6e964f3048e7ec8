"""The per-micro-step agreement (finite loss, stop) read one micro-step late under
``train.nonfinite=stop`` (:mod:`kdscale.train.agreement`): the run is the same as with the
answer read at once, and a non-finite step still fails the run naming its own step, before
any checkpoint holds weights it touched."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from helpers.common import make_config

from kdscale import checkpoints as ckpt
from kdscale.errors import KdscaleError
from kdscale.train.loop import Trainer


def run(synth_data, out_dir, name, *extra):
    cfg = make_config(synth_data, str(out_dir), "method.name=kd", "student.name=resnet8", "teacher.name=resnet8",
                      "data.train_samples=192", "data.batch_size=16", "train.log_every_steps=1", *extra, name=name)
    trainer = Trainer(cfg)
    try:
        trainer.train()
        return cfg, trainer, None
    except KdscaleError as err:
        return cfg, trainer, err
    finally:
        trainer.close()


def logged_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line)["train/loss"] for line in fh if "train/loss" in line]


def test_deferred_agreement_changes_nothing(synth_data, tmp_path):
    """Without a non-finite loss, reading the answer one micro-step late (stop) and at once
    (skip) give bit-identical losses and weights."""
    _, deferred, _ = run(synth_data, tmp_path, "deferred", "train.nonfinite=stop", "train.stop_after_steps=6")
    _, immediate, _ = run(synth_data, tmp_path, "immediate", "train.nonfinite=skip", "train.stop_after_steps=6")
    assert deferred.agreement.deferred and not immediate.agreement.deferred
    assert logged_losses(tmp_path / "deferred") == logged_losses(tmp_path / "immediate")
    a, b = deferred.distiller.state_dict(), immediate.distiller.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_step_is_named_and_never_checkpointed(synth_data, tmp_path, capsys):
    """lr=1e6 diverges. Read at once (skip), the first non-finite loss is at step N; read a
    micro-step late (stop), the failure still names step N, and the checkpoints written at
    every step end at N-1, each equal to the one the run that read at once wrote: nothing
    from the step that was taken before the answer came is written."""
    diverge = ["optim.lr=1e6", "optim.schedule=constant", "train.checkpoint_every_steps=1", "train.keep_checkpoints=50",
               "train.log_every_steps=1000"]  # no log line reads the answer first: the checkpoint must
    skip_cfg, _, err = run(synth_data, tmp_path, "skip", *diverge, "train.nonfinite=skip",
                           "train.max_nonfinite_skips=1")
    first = re.search(r"non-finite loss at step (\d+)", capsys.readouterr().err)
    assert err is not None and first, "the run did not diverge"
    step = int(first.group(1))
    cfg, _, err = run(synth_data, tmp_path, "stop", *diverge, "train.nonfinite=stop")
    assert err is not None and f"the loss is not finite at step {step} " in str(err), str(err)
    saved = ckpt.list_checkpoints(cfg.run_dir)
    assert [os.path.basename(p) for p in saved] == [f"step-{s:08d}.pt" for s in range(1, step)]
    for path in saved:
        mine = torch.load(path, map_location="cpu", weights_only=True)["model"]
        theirs = torch.load(os.path.join(skip_cfg.run_dir, "checkpoints", os.path.basename(path)),
                            map_location="cpu", weights_only=True)["model"]
        assert all(torch.equal(mine[k].nan_to_num(), theirs[k].nan_to_num()) for k in theirs), path
    assert not (tmp_path / "stop" / "export").exists()


@pytest.mark.parametrize("deferred", [True, False])
def test_verdict_names_the_asking_step(deferred):
    from kdscale.parallel.context import DistContext
    from kdscale.train.agreement import StepAgreement

    agreement = StepAgreement(DistContext.from_env(), deferred)
    first = agreement.exchange(torch.tensor(float("nan")), 0, "one")
    second = agreement.exchange(torch.tensor(1.0), 2, "two")
    if deferred:
        assert first is None and (second.nonfinite, second.stop, second.where) == (True, 0, "one")
        last = agreement.settle()
        assert (last.nonfinite, last.stop, last.where) == (False, 2, "two") and agreement.settle() is None
    else:
        assert (first.nonfinite, first.where) == (True, "one") and (second.stop, second.where) == (2, "two")
