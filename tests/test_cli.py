"""The ``asyncckpt`` command (``asyncckpt.cli``): ``ls`` and ``verify``."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import cli

from test_readers import A_KEY, B_KEY, corrupt_value


def make_checkpoint():
    return ac.Checkpoint(
        a=ac.Variable(np.zeros((3, 4), np.float32)),
        b=ac.Variable(np.int64(7)),
        c=ac.Variable(np.arange(5000, dtype=np.float64)),
    )


@pytest.fixture
def written(tmp_path):
    return make_checkpoint().write(str(tmp_path / "model"))


EXPECTED_BYTES = 3 * 4 * 4 + 8 + 5000 * 8


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- verify


def test_verify_reports_every_value_and_byte(capsys, written):
    code, out, err = run(capsys, "verify", written)
    assert (code, out, err) == (0, f"OK: 3 tensors, {EXPECTED_BYTES} bytes verified\n", "")


def test_verify_of_a_directory_checks_its_latest_checkpoint(capsys, tmp_path):
    checkpoint = make_checkpoint()
    checkpoint.save(str(tmp_path / "ckpt"))
    latest = checkpoint.save(str(tmp_path / "ckpt"))
    code, out, _ = run(capsys, "verify", str(tmp_path))
    # save() adds the save counter (one int64) to the three variables.
    assert (code, out) == (0, f"OK: 4 tensors, {EXPECTED_BYTES + 8} bytes verified\n")
    corrupt_value(latest, B_KEY)
    assert run(capsys, "verify", str(tmp_path))[0] == 1
    assert run(capsys, "verify", str(tmp_path / "ckpt-1"))[0] == 0


def test_verify_names_the_corrupt_key_and_file(capsys, written):
    data_file = corrupt_value(written, A_KEY)
    code, out, err = run(capsys, "verify", written)
    assert code == 1 and out == ""
    assert A_KEY in err and os.path.basename(data_file) in err
    assert err.startswith("asyncckpt verify: corrupt checkpoint: ")


def test_verify_of_a_missing_checkpoint_fails_with_a_message(capsys, tmp_path):
    code, out, err = run(capsys, "verify", str(tmp_path / "missing-1"))
    assert code == 1 and out == ""
    assert "missing-1" in err and err.startswith("asyncckpt verify: error: ")
    code, _, err = run(capsys, "verify", str(tmp_path))
    assert code == 1 and "Couldn't find" in err


# ---------------------------------------------------------------- ls


def test_ls_lists_object_paths_dtypes_and_shapes(capsys, written):
    code, out, err = run(capsys, "ls", written)
    assert code == 0 and err == ""
    rows = [line.split(None, 2) for line in out.splitlines()]
    assert rows == [
        ["_CHECKPOINTABLE_OBJECT_GRAPH", "bytes", "[]"],
        ["a", "float32", "[3, 4]"],
        ["b", "int64", "[]"],
        ["c", "float64", "[5000]"],
    ]
    # Columns are aligned: every dtype starts at the same offset.
    assert len({line.index(row[1], len(row[0])) for line, row in zip(out.splitlines(), rows)}) == 1


def test_ls_keys_lists_the_checkpoint_keys_themselves(capsys, written):
    code, out, _ = run(capsys, "ls", "--keys", written)
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == [
        "_CHECKPOINTABLE_OBJECT_GRAPH", A_KEY, B_KEY, "c/.ATTRIBUTES/VARIABLE_VALUE"
    ]


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("model/.ATTRIBUTES/layer1..weight", "model/layer1.weight"),
        ("model/layer/kernel/.ATTRIBUTES/VARIABLE_VALUE", "model/layer/kernel"),
        ("optimizer/.ATTRIBUTES/state..0..exp_avg", "optimizer/state.0.exp_avg"),
        ("a.Sb/.ATTRIBUTES/py_state", "a/b/py_state"),
        ("_CHECKPOINTABLE_OBJECT_GRAPH", "_CHECKPOINTABLE_OBJECT_GRAPH"),
    ],
)
def test_readable_names_undo_the_key_escapes(key, name):
    assert cli.readable_name(key) == name


def test_ls_of_a_missing_directory_fails(capsys, tmp_path):
    code, out, err = run(capsys, "ls", str(tmp_path / "nowhere"))
    assert code == 1 and out == "" and "nowhere" in err


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("argv", [[], ["frobnicate", "x"], ["verify"], ["ls", "a", "b"]])
def test_usage_errors_exit_2(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and "usage: asyncckpt" in err


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "verify" in out and "ls" in out


def test_module_runs_as_a_program(written):
    result = subprocess.run(
        [sys.executable, "-m", "asyncckpt.cli", "verify", written],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"OK: 3 tensors, {EXPECTED_BYTES} bytes verified\n"
