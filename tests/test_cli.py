"""The ``asyncckpt`` command (``asyncckpt.cli``) through its entry point: every command, text and ``--json``."""

from __future__ import annotations

import json
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
    assert (code, out) == (0, f"latest checkpoint of {tmp_path}: {latest}\nOK: 4 tensors, {EXPECTED_BYTES + 8} bytes verified\n")
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


# ---------------------------------------------------------------- show, diff, latest, du, --json


def test_show_summarises_one_value_by_object_path_or_key(capsys, written):
    code, out, _ = run(capsys, "show", written, "c")
    assert code == 0
    assert "dtype float64  shape [5000]" in out and "min 0.0  max 4999.0  mean 2499.5" in out
    assert "first [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]" in out
    code, out, _ = run(capsys, "show", written, "b/.ATTRIBUTES/VARIABLE_VALUE", "--json", "--first", "2")
    shown = json.loads(out)
    assert (code, shown["dtype"], shown["shape"], shown["first"], shown["max"]) == (0, "int64", [], [7], 7.0)
    code, out, err = run(capsys, "show", written, "nothing/here", "--json")
    assert code == 1 and "no key or object path 'nothing/here'" in err and json.loads(out)["kind"] == "error"


def test_diff_names_added_removed_and_changed_keys_with_the_largest_difference(capsys, tmp_path):
    first = make_checkpoint().write(str(tmp_path / "first"))
    changed = make_checkpoint()
    changed.c.assign(np.arange(5000, dtype=np.float64) + np.eye(1, 5000, 17).ravel() * 2.5)
    changed.d = ac.Variable(np.ones(2))
    del changed.a
    second = changed.write(str(tmp_path / "second"))
    assert run(capsys, "diff", first, first)[:2] == (0, "equal\n")
    code, out, _ = run(capsys, "diff", first, second)
    assert code == 3
    assert f"+ d/.ATTRIBUTES/VARIABLE_VALUE" in out and f"- {A_KEY}" in out
    assert "~ c/.ATTRIBUTES/VARIABLE_VALUE: max |a - b| = 2.5" in out
    code, out, _ = run(capsys, "diff", first, second, "--json")
    result = json.loads(out)
    assert (code, result["equal"], result["removed"], result["changed"][0]["max_abs_difference"]) == (
        3, False, [A_KEY], 2.5)


def test_latest_and_du_of_a_directory(capsys, tmp_path):
    checkpoint = make_checkpoint()
    checkpoint.save(str(tmp_path / "ckpt"))
    latest = checkpoint.save(str(tmp_path / "ckpt"))
    assert run(capsys, "latest", str(tmp_path))[:2] == (0, f"{latest}\n")
    assert json.loads(run(capsys, "latest", str(tmp_path), "--json")[1]) == {"directory": str(tmp_path),
                                                                           "latest": latest}
    code, out, _ = run(capsys, "du", str(tmp_path), "--json")
    usage = json.loads(out)
    assert (code, usage["checkpoint"], usage["bytes"]) == (0, latest, {"c": 40000, "a": 48, "b": 8, "save_counter": 8})
    code, out, _ = run(capsys, "du", latest)
    assert out.splitlines()[0] == "40000  c"
    assert run(capsys, "latest", str(tmp_path / "nowhere"))[0] == 1


def test_every_command_speaks_json(capsys, written):
    code, out, _ = run(capsys, "ls", written, "--json")
    listing = json.loads(out)
    assert code == 0 and {row["name"] for row in listing["values"]} >= {"a", "b", "c"}
    assert json.loads(run(capsys, "verify", written, "--json")[1])["ok"] is True
    corrupt_value(written, B_KEY)
    code, out, _ = run(capsys, "verify", written, "--json")
    assert code == 1 and json.loads(out)["kind"] == "corrupt checkpoint"


def test_verify_draws_a_progress_line_only_on_a_terminal(capsys, tmp_path):
    import io

    from asyncckpt.progress import Progress, for_terminal

    path = ac.Checkpoint(v=ac.Variable(np.zeros(3 << 20, np.uint8))).write(str(tmp_path / "big"))
    reader = ac.load_checkpoint(path)
    stream = io.StringIO()
    reader.on_progress = Progress(stream, "verify", interval=0)
    reader.verify()
    reader.on_progress.close()
    drawn = stream.getvalue()
    assert drawn.startswith("\rverify  ") and drawn.endswith("3/3 MiB (100%)\n")
    assert for_terminal(io.StringIO(), "verify") is None  # a pipe or a log: no progress at all
    code, out, err = run(capsys, "verify", path)
    assert code == 0 and "\r" not in out + err
