"""The GPU check's figures: which ``kdscale bench`` sections its one command runs, on the GPU
and in the ``--dry-run`` CPU mode (the dry run itself: tests/gpu/test_gpu_check.py, slow)."""

from __future__ import annotations

import pytest

from kdscale.bench.gpu_check import BUDGET_S, bench_command
from kdscale.bench.runner import parse_sections


@pytest.mark.parametrize("dry_run", [False, True])
def test_figures_include_two_teachers_and_only_known_sections(dry_run):
    command = bench_command("out", dry_run)
    sections = parse_sections(command[command.index("--sections") + 1])  # an unknown name raises
    assert "compute" in sections and "teachers2" in sections and "decode" in sections
    assert ("--quick" in command) == dry_run and command[command.index("--device") + 1] == ("cpu" if dry_run else "cuda")


def test_parts_fit_one_device_command():
    assert sum(BUDGET_S.values()) <= 8 * 60  # with start-up, inside a 10-minute device command
