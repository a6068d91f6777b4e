"""Behaviours I (the ``checkpoint`` state file, ``get_checkpoint_state``, ``latest_checkpoint``).

Ideas ported from TensorFlow's ``checkpoint_management_test.py`` (CheckpointStateTest,
LatestCheckpointWithRelativePaths, SaverUtilsTest.testCheckpointExists) and ``checkpoint_test.py``
(testCheckpointState, testCheckpointStateChangingVarList); numbers refer to ``behaviours.md``.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import threading
import time

import numpy as np
import pytest

import asyncckpt as ac


def f32(value):
    return ac.Variable(value, dtype=np.float32)


def write_state(directory, text, name="checkpoint"):
    path = os.path.join(str(directory), name)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def read_state_text(directory):
    with open(os.path.join(str(directory), "checkpoint"), encoding="utf-8") as handle:
        return handle.read()


def saved_checkpoint(path):
    """Write a real checkpoint at exactly ``path``."""
    return ac.Checkpoint(v=f32(1.0)).write(str(path))


# ---------------------------------------------------------------- I42 state file format


def test_i42_state_file_is_text_proto(tmp_path):
    ac.Checkpoint(v=f32(1.0)).save(str(tmp_path / "ckpt"))
    text = read_state_text(tmp_path)
    assert re.search(r'^model_checkpoint_path:\s*"ckpt-1"\s*$', text, re.M)
    assert re.search(r'^all_model_checkpoint_paths:\s*"ckpt-1"\s*$', text, re.M)


def test_i42_get_checkpoint_state_fields_after_save(tmp_path):
    path = ac.Checkpoint(v=f32(1.0)).save(str(tmp_path / "ckpt"))
    state = ac.get_checkpoint_state(str(tmp_path))
    assert state.model_checkpoint_path == path
    assert list(state.all_model_checkpoint_paths) == [path]


def test_i42_hand_written_state_parsed(tmp_path):
    write_state(
        tmp_path,
        'model_checkpoint_path: "ckpt-2"\n'
        'all_model_checkpoint_paths: "ckpt-1"\n'
        'all_model_checkpoint_paths: "ckpt-2"\n'
        "all_model_checkpoint_timestamps: 100.5\n"
        "all_model_checkpoint_timestamps: 200.25\n"
        "last_preserved_timestamp: 50.0\n",
    )
    state = ac.get_checkpoint_state(str(tmp_path))
    assert state.model_checkpoint_path == os.path.join(str(tmp_path), "ckpt-2")
    assert list(state.all_model_checkpoint_paths) == [
        os.path.join(str(tmp_path), "ckpt-1"),
        os.path.join(str(tmp_path), "ckpt-2"),
    ]
    assert list(state.all_model_checkpoint_timestamps) == [100.5, 200.25]
    assert state.last_preserved_timestamp == 50.0


def test_i42_latest_filename_override(tmp_path):
    saved_checkpoint(tmp_path / "model-3")
    write_state(tmp_path, 'model_checkpoint_path: "model-3"\n', name="other_state")
    expected = os.path.join(str(tmp_path), "model-3")
    assert ac.latest_checkpoint(str(tmp_path), latest_filename="other_state") == expected
    assert ac.get_checkpoint_state(str(tmp_path), latest_filename="other_state").model_checkpoint_path == expected
    assert ac.latest_checkpoint(str(tmp_path)) is None


# ---------------------------------------------------------------- I43 Checkpoint.save entries


def test_i43_save_records_only_newest_relative_path(tmp_path):
    prefix = str(tmp_path / "ckpt")
    ckpt = ac.Checkpoint(v=f32(1.0))
    for _ in range(3):
        ckpt.save(prefix)
    text = read_state_text(tmp_path)
    assert re.findall(r'all_model_checkpoint_paths:\s*"([^"]*)"', text) == ["ckpt-3"]
    assert str(tmp_path) not in text
    state = ac.get_checkpoint_state(str(tmp_path))
    assert list(state.all_model_checkpoint_paths) == [prefix + "-3"]


def test_i43_older_checkpoints_stay_on_disk(tmp_path):
    prefix = str(tmp_path / "ckpt")
    ckpt = ac.Checkpoint(v=f32(1.0))
    paths = [ckpt.save(prefix) for _ in range(10)]
    assert all(ac.checkpoint_exists(p) for p in paths)
    assert ac.latest_checkpoint(str(tmp_path)) == prefix + "-10"


# ---------------------------------------------------------------- I44 atomic update


def test_i44_prefix_named_like_state_file_does_not_collide(tmp_path):
    path = ac.Checkpoint(v=f32(1.0)).save(str(tmp_path / "checkpoint"))
    assert path == str(tmp_path / "checkpoint") + "-1"
    assert ac.latest_checkpoint(str(tmp_path)) == path


def test_i44_readers_never_see_a_partial_state_file(tmp_path):
    prefix = str(tmp_path / "ckpt")
    ckpt = ac.Checkpoint(v=f32(1.0))
    ckpt.save(prefix)
    seen, failures, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                state = ac.get_checkpoint_state(str(tmp_path))
            except ValueError as exc:  # an empty (half-written) file
                failures.append(exc)
                continue
            if state is None:
                failures.append("unparseable")
            else:
                seen.append(state.model_checkpoint_path)
            time.sleep(0.001)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(20):
            ckpt.save(prefix)
    finally:
        stop.set()
        thread.join()
    assert failures == []
    assert set(seen) <= {f"{prefix}-{n}" for n in range(1, 22)}


# ---------------------------------------------------------------- I45 get_checkpoint_state


def test_i45_missing_state_file_returns_none(tmp_path):
    assert ac.get_checkpoint_state(str(tmp_path)) is None
    assert ac.get_checkpoint_state(str(tmp_path / "no_such_dir")) is None


def test_i45_unparseable_state_returns_none_and_warns(tmp_path, ac_log):
    write_state(tmp_path, "this is { not a checkpoint state\n")
    assert ac.get_checkpoint_state(str(tmp_path)) is None
    assert any(r.levelno >= logging.WARNING and r.name.startswith("asyncckpt") for r in ac_log.records)


def test_i45_unreadable_state_returns_none(tmp_path, ac_log):
    os.mkdir(tmp_path / "checkpoint")  # exists, but cannot be read as a file
    assert ac.get_checkpoint_state(str(tmp_path)) is None
    assert any(r.levelno >= logging.WARNING and r.name.startswith("asyncckpt") for r in ac_log.records)


def test_i45_empty_state_file_raises(tmp_path):
    write_state(tmp_path, "")
    with pytest.raises(ValueError, match=re.escape(f"Invalid checkpoint state loaded from {tmp_path}")):
        ac.get_checkpoint_state(str(tmp_path))


def test_i45_relative_paths_joined_with_directory(tmp_path):
    write_state(
        tmp_path,
        'model_checkpoint_path: "./model.ckpt-687529"\n'
        'all_model_checkpoint_paths: "./model.ckpt-687500"\n'
        'all_model_checkpoint_paths: "./model.ckpt-687529"\n',
    )
    state = ac.get_checkpoint_state(str(tmp_path))
    assert state.model_checkpoint_path == os.path.join(str(tmp_path), "./model.ckpt-687529")
    assert list(state.all_model_checkpoint_paths) == [
        os.path.join(str(tmp_path), "./model.ckpt-687500"),
        os.path.join(str(tmp_path), "./model.ckpt-687529"),
    ]


def test_i45_absolute_paths_kept(tmp_path):
    elsewhere = str(tmp_path / "elsewhere" / "model-0")
    write_state(tmp_path, f'model_checkpoint_path: "{elsewhere}"\nall_model_checkpoint_paths: "{elsewhere}"\n')
    state = ac.get_checkpoint_state(str(tmp_path))
    assert state.model_checkpoint_path == elsewhere
    assert list(state.all_model_checkpoint_paths) == [elsewhere]


def test_i45_accepts_pathlike(tmp_path):
    write_state(tmp_path, 'model_checkpoint_path: "model-2"\n')
    state = ac.get_checkpoint_state(pathlib.Path(tmp_path))
    assert state.model_checkpoint_path == os.path.join(str(tmp_path), "model-2")


# ---------------------------------------------------------------- I46 latest_checkpoint


def test_i46_empty_or_missing_directory_returns_none(tmp_path):
    assert ac.latest_checkpoint(str(tmp_path)) is None
    assert ac.latest_checkpoint(str(tmp_path / "missing")) is None


def test_i46_returns_existing_checkpoint(tmp_path):
    saved_checkpoint(tmp_path / "model-7")
    write_state(tmp_path, 'model_checkpoint_path: "model-7"\n')
    latest = ac.latest_checkpoint(str(tmp_path))
    assert latest == os.path.join(str(tmp_path), "model-7")
    assert ac.checkpoint_exists(latest)


def test_i46_state_pointing_at_missing_checkpoint_returns_none_and_logs(tmp_path, ac_log):
    write_state(tmp_path, 'model_checkpoint_path: "ckpt-9"\n')
    assert ac.latest_checkpoint(str(tmp_path)) is None
    assert any(r.levelno >= logging.ERROR and r.name.startswith("asyncckpt") for r in ac_log.records)


def test_i46_accepts_pathlike_and_returns_str(tmp_path):
    path = ac.Checkpoint(v=f32(1.0)).save(str(tmp_path / "ckpt_name"))
    latest = ac.latest_checkpoint(pathlib.Path(tmp_path))
    assert latest == str(tmp_path / "ckpt_name-1") == path
    assert type(latest) is str


def test_i46_checkpoint_exists_before_and_after_save(tmp_path):
    prefix = str(tmp_path / "ckpt")
    assert not ac.checkpoint_exists(prefix + "-1")
    path = ac.Checkpoint(v=f32(1.0)).save(prefix)
    assert ac.checkpoint_exists(path)
    assert ac.checkpoint_exists(ac.latest_checkpoint(str(tmp_path)))
