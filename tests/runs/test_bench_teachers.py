"""``kdscale bench --sections teachers2`` at tiny sizes: KD from two online teachers against its
measured bound (a student-only step plus each teacher's forward, timed in the same round) and
KD from two replayed teachers against student-only, each ratio per round. No timing is
asserted."""

from __future__ import annotations

import json

import pytest
import torch

from kdscale.bench.compute import Setup, measured_bound
from kdscale.cli import main as cli

RATIOS = ("teachers2_online_kd_vs_student_only", "teachers2_online_kd_measured_bound",
          "teachers2_online_kd_fraction_of_bound", "teachers2_shard_kd_vs_student_only")


def test_section_ratios_are_taken_per_round(tmp_path):
    cli(["bench", "--quick", "--sections", "teachers2", "--student", "resnet8", "--teacher", "resnet8",
         "--image-size", "16", "--batch", "4", "--device", "cpu", "--out", str(tmp_path)])
    result = json.load(open(tmp_path / "bench.json"))
    report = (tmp_path / "bench.md").read_text()
    assert set(result["ratios"]) == set(RATIOS) and result["teachers2"]["teachers"] == 2
    speed = {k: v["rounds"] for k, v in result["teachers2"]["throughput"].items()}
    assert set(speed) == {"kdscale_student_only", "kdscale_kd_online_2_teachers", "teacher_forward_0",
                          "teacher_forward_1", "kdscale_kd_shards_2_teachers"}
    rounds = result["settings"]["rounds"]["compute"]
    student = speed["kdscale_student_only"]
    bound = [1 / (1 / s + 1 / a + 1 / b) for s, a, b in zip(student, speed["teacher_forward_0"],
                                                            speed["teacher_forward_1"])]
    ratios = {k: v["rounds"] for k, v in result["ratios"].items()}
    assert all(len(r) == rounds for r in ratios.values())
    assert ratios["teachers2_online_kd_measured_bound"] == pytest.approx([b / s for b, s in zip(bound, student)])
    assert ratios["teachers2_online_kd_fraction_of_bound"] == pytest.approx(
        [o / b for o, b in zip(speed["kdscale_kd_online_2_teachers"], bound)])
    assert ratios["teachers2_shard_kd_vs_student_only"] == pytest.approx(
        [r / s for r, s in zip(speed["kdscale_kd_shards_2_teachers"], student)])
    for name in RATIOS:
        assert f"| {name} | {result['ratios'][name]['median']:.3f} |" in report
    assert "| >= 0.95 |" in report and "teachers2 throughput (images/s" in report


def test_two_teacher_steps_use_both_teachers():
    """The two teachers differ (random weights of their own), both are members of the step's
    output with equal weights, and the replayed probabilities are the online teachers' softmax."""
    setup = Setup("resnet8", "resnet8", 16, 4, 10, "cpu", teachers=2)
    first, second = (setup.frozen_teacher(i)(setup.images).logits for i in range(2))
    assert not torch.equal(first, second)
    source, replayed = setup.teacher_source("shards", ("a", "b"))
    assert replayed.shape == (4, 2, 10)
    out = source(setup.images, replayed)
    assert set(out.members) == {"a", "b"} and out.weights == {"a": 0.5, "b": 0.5}
    online, _ = setup.teacher_source("online", ("a", "b"))
    assert torch.allclose(online(setup.images, None).members["b"].float().softmax(1), replayed[:, 1])
    assert measured_bound([2.0], [[2.0], [4.0]]) == [pytest.approx(0.8)]


@pytest.mark.parametrize("sections, bad, close", [("teachers2,compte", "compte", "compute"),
                                                  ("teacher2", "teacher2", "teachers2"),
                                                  ("zzz", "zzz", None)])
def test_unknown_section_is_one_line_error_before_any_work(tmp_path, capsys, sections, bad, close):
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as exit_info:
        cli(["bench", "--quick", "--sections", sections, "--device", "cpu", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kdscale: error: --sections: "), err
    assert f"unknown section {bad!r}" in err and "valid sections: all, compute, teachers2, compile" in err, err
    assert (f"did you mean '{close}'?" in err) if close else ("did you mean" not in err), err
    assert not out.exists()  # nothing was made or measured
