"""Resuming after something went wrong: a lost or corrupt newest checkpoint, a run that starts over.

The newest checkpoint can be gone (its ``P.index`` deleted, a disk that lost it) or corrupt (a
flipped byte). A resumed run must pick the newest checkpoint that is committed and verifies, both
lookups must agree, and a run that starts from scratch must not destroy the good older ones.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt.naming import index_path


def train_and_save(directory, steps: int = 3, max_to_keep: int = 3):
    """A manager's checkpoints ckpt-1..ckpt-<steps>, where variable ``w`` holds the step number."""
    w = ac.Variable(np.zeros(64, np.float32))
    checkpoint = ac.Checkpoint(w=w)
    manager = ac.CheckpointManager(checkpoint, str(directory), max_to_keep=max_to_keep)
    paths = []
    for step in range(1, steps + 1):
        w.assign(np.full(64, step, np.float32))
        paths.append(manager.save())
    return paths


def flip_a_data_byte(prefix: str) -> None:
    data_dir = next(p for p in os.listdir(os.path.dirname(prefix))
                    if p.startswith(os.path.basename(prefix) + ".data-"))
    folder = os.path.join(os.path.dirname(prefix), data_dir)
    name = sorted(os.listdir(folder))[0]
    with open(os.path.join(folder, name), "r+b") as handle:
        handle.seek(8)
        byte = handle.read(1)
        handle.seek(8)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_a_missing_newest_checkpoint_falls_back_to_the_newest_committed_one_in_both_lookups(tmp_path, caplog):
    paths = train_and_save(tmp_path)
    os.remove(index_path(paths[-1]))
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        latest = ac.latest_checkpoint(str(tmp_path))
    assert latest == paths[1]
    assert any("falling back to" in r.getMessage() and paths[1] in r.getMessage() for r in caplog.records)
    manager = ac.CheckpointManager(ac.Checkpoint(w=ac.Variable(np.zeros(64, np.float32))), str(tmp_path), max_to_keep=3)
    assert manager.latest_checkpoint == latest
    w = ac.Variable(np.zeros(64, np.float32))
    checkpoint = ac.Checkpoint(w=w)
    checkpoint.restore(latest).assert_consumed()
    assert int(checkpoint.save_counter) == 2 and w.numpy()[0] == 2


def test_restore_or_initialize_falls_back_to_the_newest_checkpoint_that_verifies_and_says_which(tmp_path, caplog):
    paths = train_and_save(tmp_path)
    flip_a_data_byte(paths[-1])
    w = ac.Variable(np.full(64, -1, np.float32))
    checkpoint = ac.Checkpoint(w=w)
    initialized = []
    manager = ac.CheckpointManager(checkpoint, str(tmp_path), max_to_keep=3, init_fn=lambda: initialized.append(1))
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        restored = manager.restore_or_initialize()
    assert restored == paths[1] and not initialized
    assert np.all(w.numpy() == 2)  # every value from ckpt-2: nothing torn by the corrupt ckpt-3
    assert int(checkpoint.save_counter) == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any(paths[-1] in m and "failed verification" in m for m in messages)
    assert any(m.startswith(f"Restored {paths[1]}") for m in messages)
    assert manager.latest_checkpoint == paths[1]
    # Training goes on from step 2: the next save replaces the corrupt ckpt-3, the good ones stay.
    assert manager.save() == paths[2]
    assert all(ac.checkpoint_exists(p) for p in paths)


def test_restore_or_initialize_initializes_when_no_checkpoint_verifies(tmp_path, caplog):
    paths = train_and_save(tmp_path, steps=2)
    for path in paths:
        flip_a_data_byte(path)
    initialized = []
    manager = ac.CheckpointManager(ac.Checkpoint(w=ac.Variable(np.zeros(64, np.float32))), str(tmp_path),
                                   max_to_keep=3, init_fn=lambda: initialized.append(1))
    with caplog.at_level(logging.ERROR, logger="asyncckpt"):
        assert manager.restore_or_initialize() is None
    assert initialized == [1]
    assert any("passed verification" in r.getMessage() for r in caplog.records)


def test_a_run_that_starts_over_after_the_newest_was_lost_keeps_the_good_checkpoints(tmp_path, caplog):
    paths = train_and_save(tmp_path, steps=3, max_to_keep=3)
    os.remove(index_path(paths[-1]))
    w = ac.Variable(np.zeros(64, np.float32))
    manager = ac.CheckpointManager(ac.Checkpoint(w=w), str(tmp_path), max_to_keep=3)
    # Not restored, numbered automatically: its first save would replace a committed checkpoint.
    with pytest.raises(ac.CheckpointError, match="refusing to overwrite checkpoint .*ckpt-1"):
        manager.save()
    assert ac.checkpoint_exists(paths[0]) and ac.checkpoint_exists(paths[1])
    # Numbering its own checkpoints past the old ones, it may save, and still expires none of them.
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        for number in (10, 11, 12, 13):
            manager.save(checkpoint_number=number)
    assert ac.checkpoint_exists(paths[0]) and ac.checkpoint_exists(paths[1])


def test_a_failed_restore_names_exactly_the_variables_it_modified(tmp_path):
    values = {name: ac.Variable(np.full(4096, i, np.float32)) for i, name in enumerate("abc")}
    path = ac.Checkpoint(**values).save(str(tmp_path / "ckpt"))
    flip_a_data_byte(path)
    live = {name: ac.Variable(np.full(4096, -1, np.float32)) for name in "abc"}
    with pytest.raises(ac.CorruptCheckpointError, match="were modified") as caught:
        ac.Checkpoint(**live).restore(path)
    modified = caught.value.modified_keys
    assert modified and all(key.endswith("/.ATTRIBUTES/VARIABLE_VALUE") for key in modified)
    untouched = [name for name in "abc" if f"{name}/.ATTRIBUTES/VARIABLE_VALUE" not in modified]
    for name in untouched:  # every variable not named still holds its old value
        assert np.all(live[name].numpy() == -1)


def test_after_a_fallback_the_checkpoint_just_saved_is_never_the_one_expired(tmp_path):
    """Found entries kept from expiry (after the recorded latest was missing) never push out the
    new save, and only committed checkpoints are kept: an entry naming nothing is expired."""
    w = ac.Variable(np.ones(4, np.float32))
    checkpoint = ac.Checkpoint(w=w)
    checkpoint.write(str(tmp_path / "ckpt-1"))
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-1"\nall_model_checkpoint_paths: "gone"\n'
        "all_model_checkpoint_timestamps: 0.0\nall_model_checkpoint_timestamps: 1.0\nlast_preserved_timestamp: 0.0\n",
        encoding="utf-8",
    )
    manager = ac.CheckpointManager(checkpoint, str(tmp_path), max_to_keep=1)
    path = manager.save()
    assert ac.checkpoint_exists(path)
    assert ac.latest_checkpoint(str(tmp_path)) == path == manager.latest_checkpoint
    assert manager.checkpoints == [path]
