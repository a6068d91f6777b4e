"""End-to-end: examples/train_loop.py resumes from its checkpoints, including after a crash."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

import asyncckpt as ac

sys.path.insert(0, os.path.dirname(__file__))
from _examples import EXAMPLES, RESUMED  # noqa: E402
from _examples import run_example as run_script  # noqa: E402

EXAMPLE = EXAMPLES / "train_loop.py"
FINAL = re.compile(r"^final step (?P<step>\d+): loss (?P<loss>\S+), weights (?P<digest>[0-9a-f]+)$", re.MULTILINE)


def run_example(directory: Path, *args: str, expect_rc: int = 0) -> str:
    """Run the example in a fresh interpreter and return its stdout; fail with its output otherwise."""
    return run_script(EXAMPLE, directory, "--save-every", "10", *args, expect_rc=expect_rc).stdout


def final_line(output: str) -> re.Match:
    match = FINAL.search(output)
    assert match, f"no final line in:\n{output}"
    return match


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> re.Match:
    """The final state of a 60-step run that never stopped, the reference every resumed run must equal."""
    output = run_example(tmp_path_factory.mktemp("reference"), "--steps", "60")
    assert "starting from scratch" in output
    return final_line(output)


def test_second_run_resumes_from_the_saved_step(tmp_path, uninterrupted):
    first = run_example(tmp_path, "--steps", "40")
    assert "starting from scratch" in first
    assert final_line(first)["step"] == "40"
    assert ac.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-40")

    second = run_example(tmp_path, "--steps", "20")  # 20 more steps
    resumed = RESUMED.search(second)
    assert resumed, second
    assert (resumed["path"], resumed["step"]) == (str(tmp_path / "ckpt-40"), "40")
    assert "step 10:" not in second  # it did not start over
    end = final_line(second)
    assert end["step"] == "60"
    # Weights, momentum slots and step all came back: the result matches a run that never stopped.
    assert end["digest"] == uninterrupted["digest"]


@pytest.mark.parametrize(
    "kill_at, committed",
    [
        # Killed between saves: save(20) waited for ckpt-10 to commit; ckpt-20 may still be in flight.
        pytest.param(25, {10, 20}, marks=pytest.mark.slow),  # two interpreter launches: during-save suffices
        # Killed right after save(30) returned, while ckpt-30 may still be in flight. save(30) waited
        # for ckpt-20 to commit, so the latest committed checkpoint is 20 or 30, never a torn one.
        (30, {20, 30}),
    ],
    ids=["between-saves", "during-save"],
)
def test_resumes_from_last_committed_checkpoint_after_a_crash(tmp_path, uninterrupted, kill_at, committed):
    crashed = run_example(tmp_path, "--steps", "60", "--kill-at-step", str(kill_at), expect_rc=1)
    assert f"killed at step {kill_at}" in crashed
    assert "final step" not in crashed

    latest = ac.latest_checkpoint(str(tmp_path))
    assert latest is not None
    latest_step = int(latest.rsplit("-", 1)[1])
    assert latest_step in committed

    second = run_example(tmp_path, "--steps", str(60 - latest_step))
    resumed = RESUMED.search(second)
    assert resumed, second
    assert (resumed["path"], int(resumed["step"])) == (latest, latest_step)
    end = final_line(second)
    assert end["step"] == "60"
    assert end["digest"] == uninterrupted["digest"]


def test_rejects_bad_arguments(tmp_path, monkeypatch, capsys):
    import runpy  # argparse refuses before anything runs: the example needs no interpreter of its own here

    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--dir", str(tmp_path), "--save-every", "0"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert exited.value.code == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err
