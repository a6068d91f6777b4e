"""End-to-end: examples/torch_train.py and examples/jax_train.py resume bit for bit after a crash."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import sys

import pytest

import asyncckpt as ac

sys.path.insert(0, os.path.dirname(__file__))
from _examples import EXAMPLES, RESUMED, run_example  # noqa: E402

# Everything after the step: loss, learning rate, scale and the digest of the whole training state.
FINAL = re.compile(r"^final step (?P<step>\d+): (?P<state>.*\S)$", re.MULTILINE)
STEPS, SAVE_EVERY, KILL_AT = 12, 4, 8


@pytest.fixture(scope="module", params=[("torch_train.py", "torch"), ("jax_train.py", "jax")], ids=["torch", "jax"])
def example(request):
    script, framework = request.param
    pytest.importorskip(framework)
    return EXAMPLES / script


def run(example, directory, *args: str, expect_rc: int = 0) -> str:
    proc = run_example(example, directory, "--save-every", str(SAVE_EVERY), *args, expect_rc=expect_rc)
    assert proc.stderr == "", proc.stderr  # no warning (a partial restore, a framework's deprecation), no traceback
    return proc.stdout


def final_line(output: str) -> re.Match:
    match = FINAL.search(output)
    assert match, f"no final line in:\n{output}"
    return match


@pytest.fixture(scope="module")
def uninterrupted(example, tmp_path_factory) -> re.Match:
    """The final state of a run that never stopped, the reference a resumed run must equal.

    It runs in this process (the example's ``main``): the framework is imported here already, so
    the reference costs no interpreter start; the crash and the resume below run as a user's would.
    """
    spec = importlib.util.spec_from_file_location(f"_reference_{example.stem}", example)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert module.main(["--dir", str(tmp_path_factory.mktemp("reference")), "--save-every", str(SAVE_EVERY),
                            "--steps", str(STEPS)]) == 0
    assert "starting from scratch" in output.getvalue()
    return final_line(output.getvalue())


def test_a_run_killed_during_a_save_resumes_bit_exact(example, uninterrupted, tmp_path):
    crashed = run(example, tmp_path, "--steps", str(STEPS), "--kill-at-step", str(KILL_AT), expect_rc=1)
    assert f"killed at step {KILL_AT}" in crashed and "final step" not in crashed
    # Killed right after save(20) returned: ckpt-20 may still have been in flight, but save(20)
    # waited for ckpt-10 to commit, so the latest committed checkpoint is one of the two.
    latest = ac.latest_checkpoint(str(tmp_path))
    assert latest is not None
    latest_step = int(latest.rsplit("-", 1)[1])
    assert latest_step in {KILL_AT - SAVE_EVERY, KILL_AT}

    resumed = run(example, tmp_path, "--steps", str(STEPS - latest_step))  # a fresh process
    match = RESUMED.search(resumed)
    assert match, resumed
    assert (match["path"], int(match["step"])) == (latest, latest_step)
    end = final_line(resumed)
    assert end["step"] == str(STEPS)
    # Parameters, buffers, moments, schedule, scaler and generators all came back: every byte of
    # the state (and the loss, learning rate and scale printed with it) equals the reference's.
    assert end["state"] == uninterrupted["state"]
