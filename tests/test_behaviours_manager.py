"""Behaviours J (``CheckpointManager``: construction, save, retention, restore_or_initialize).

Ideas ported from TensorFlow's ``checkpoint_management_test.py`` (CheckpointManagerTest). The clock
is replaced through ``time.time`` only in the tests whose TF originals patch the clock
(testSaveRestoreState, testClockReset); numbers refer to ``behaviours.md``.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import time

import numpy as np
import pytest

import asyncckpt as ac


def f32(value):
    return ac.Variable(value, dtype=np.float32)


class FakeClock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock(3.0)
    monkeypatch.setattr(time, "time", fake)
    return fake


# ---------------------------------------------------------------- J47 construction


@pytest.mark.parametrize("bad", [0, -1])
def test_j47_max_to_keep_must_be_positive(tmp_path, bad):
    fragment = f"Expected a positive integer or `None` for `max_to_keep`, got {bad}."
    with pytest.raises(ValueError, match=re.escape(fragment)):
        ac.CheckpointManager(ac.Checkpoint(), str(tmp_path), max_to_keep=bad)


def test_j47_checkpoint_interval_requires_step_counter(tmp_path):
    fragment = "`step_counter` should be passed if `checkpoint_interval` is not None."
    with pytest.raises(ValueError, match=re.escape(fragment)):
        ac.CheckpointManager(ac.Checkpoint(), str(tmp_path), max_to_keep=1, checkpoint_interval=2)


def test_j47_empty_directory_has_no_checkpoints(tmp_path):
    manager = ac.CheckpointManager(ac.Checkpoint(), str(tmp_path / "new"), max_to_keep=2)
    assert manager.latest_checkpoint is None
    assert manager.checkpoints == []


def test_j47_pathlike_directory(tmp_path):
    directory = pathlib.Path(tmp_path)
    checkpoint = ac.Checkpoint(v=f32(0.0))
    manager = ac.CheckpointManager(checkpoint, directory, max_to_keep=2, checkpoint_name="ckpt_name")
    save_path = manager.save()
    assert save_path == str(directory / "ckpt_name-1")
    assert manager.restore_or_initialize() == str(directory / "ckpt_name-1")
    assert ac.latest_checkpoint(directory) == str(directory / "ckpt_name-1")


def test_j47_prefix_joins_directory_and_checkpoint_name(tmp_path):
    checkpoint = ac.Checkpoint()
    named = ac.CheckpointManager(checkpoint, str(tmp_path), max_to_keep=2, checkpoint_name="ckpt_name")
    assert named.save(checkpoint_number=5) == os.path.join(str(tmp_path), "ckpt_name-5")
    default = ac.CheckpointManager(checkpoint, str(tmp_path), max_to_keep=2)
    assert default.save(checkpoint_number=5) == os.path.join(str(tmp_path), "ckpt-5")


def test_j47_latest_checkpoint_recovered_without_existence_check(tmp_path):
    with open(tmp_path / "checkpoint", "w", encoding="utf-8") as handle:
        handle.write('model_checkpoint_path: "ckpt-4"\n')
    manager = ac.CheckpointManager(ac.Checkpoint(), str(tmp_path), max_to_keep=2)
    assert manager.latest_checkpoint == os.path.join(str(tmp_path), "ckpt-4")


def test_j47_continue_from_unmanaged_checkpoints(tmp_path):
    prefix = os.path.join(str(tmp_path), "unusual_prefix")
    checkpoint = ac.Checkpoint()
    first_path = checkpoint.save(prefix)
    second_path = checkpoint.save(prefix)
    del checkpoint
    checkpoint = ac.Checkpoint()
    manager = ac.CheckpointManager(checkpoint, str(tmp_path), max_to_keep=2)
    assert manager.latest_checkpoint == second_path
    checkpoint.restore(manager.latest_checkpoint)
    assert checkpoint.save_counter.numpy() == 2
    third_path = manager.save()
    assert manager.checkpoints == [third_path]
    fourth_path = manager.save()
    assert manager.checkpoints == [third_path, fourth_path]
    fifth_path = manager.save()
    assert manager.checkpoints == [fourth_path, fifth_path]
    assert [ac.checkpoint_exists(p) for p in (first_path, second_path, third_path, fourth_path, fifth_path)] == [
        True, True, False, True, True,
    ]


def test_j47_clock_reset_keeps_existing_checkpoints(tmp_path, clock, ac_log):
    directory = str(tmp_path)
    clock.now = 10000.0
    checkpoint = ac.Checkpoint()
    first_manager = ac.CheckpointManager(checkpoint, directory, max_to_keep=1, keep_checkpoint_every_n_hours=1.0)
    first_path = first_manager.save()
    clock.now += 3600.0
    second_path = first_manager.save()
    clock.now += 3600.0
    third_path = first_manager.save()
    assert not ac.checkpoint_exists(first_path)
    assert ac.checkpoint_exists(second_path) and ac.checkpoint_exists(third_path)
    assert first_manager.checkpoints == [third_path]
    assert ac.get_checkpoint_state(directory).last_preserved_timestamp == 13600.0
    del first_manager

    clock.now = 5000.0
    second_manager = ac.CheckpointManager(checkpoint, directory, max_to_keep=1)
    assert any(
        r.levelno == logging.WARNING and "behind the last preserved checkpoint timestamp" in r.getMessage()
        for r in ac_log.records
    )
    assert ac.checkpoint_exists(second_path)
    assert second_manager.latest_checkpoint == third_path
    assert second_manager.checkpoints == []
    clock.now += 10.0
    fourth_path = second_manager.save()
    assert ac.checkpoint_exists(second_path) and ac.checkpoint_exists(third_path)
    assert second_manager.latest_checkpoint == fourth_path
    assert second_manager.checkpoints == [fourth_path]
    clock.now += 10.0
    fifth_path = second_manager.save()
    assert ac.checkpoint_exists(second_path) and ac.checkpoint_exists(third_path)
    assert second_manager.checkpoints == [fifth_path]
    state = ac.get_checkpoint_state(directory)
    assert state.last_preserved_timestamp == 5000.0
    assert list(state.all_model_checkpoint_timestamps) == [5020.0]


# ---------------------------------------------------------------- J48 save


def test_j48_save_returns_path_and_updates_latest(tmp_path):
    manager = ac.CheckpointManager(ac.Checkpoint(v=f32(1.0)), str(tmp_path), max_to_keep=3)
    path = manager.save()
    assert path == os.path.join(str(tmp_path), "ckpt-1")
    assert manager.latest_checkpoint == path == ac.latest_checkpoint(str(tmp_path))
    assert ac.checkpoint_exists(path)


def test_j48_custom_numbering(tmp_path):
    directory = str(tmp_path)
    step = ac.Variable(0, dtype=np.int64)
    checkpoint = ac.Checkpoint(step=step)
    manager = ac.CheckpointManager(checkpoint, directory, max_to_keep=2)
    for i in range(5):
        path = manager.save(checkpoint_number=step)
        assert path.endswith(f"-{2 * i}")
        step.assign(step.numpy() + 2)
    assert checkpoint.save_counter.numpy() == 5
    last_path = manager.save(checkpoint_number=32)
    assert last_path.endswith("-32")
    assert last_path == manager.latest_checkpoint == ac.latest_checkpoint(directory)
    state = ac.get_checkpoint_state(directory)
    assert list(state.all_model_checkpoint_paths) == [path, last_path]


def test_j48_checkpoint_interval(tmp_path):
    step_counter = ac.Variable(0, dtype=np.int64)
    manager = ac.CheckpointManager(
        ac.Checkpoint(v=f32(1.0)), str(tmp_path), max_to_keep=None, step_counter=step_counter, checkpoint_interval=2
    )
    path = manager.save(check_interval=True)  # step 0: the first checkpoint is saved
    assert ac.checkpoint_exists(path)
    step_counter.assign(1)
    assert manager.save(check_interval=True) is None
    step_counter.assign(2)
    path = manager.save(check_interval=True)
    assert ac.checkpoint_exists(path)
    assert manager.save(check_interval=True) is None  # same step again
    step_counter.assign(3)
    assert manager.save(check_interval=True) is None
    path = manager.save(check_interval=False)
    assert ac.checkpoint_exists(path)


def test_j48_skipped_interval_save_leaves_counter(tmp_path):
    step_counter = ac.Variable(0, dtype=np.int64)
    checkpoint = ac.Checkpoint()
    manager = ac.CheckpointManager(
        checkpoint, str(tmp_path), max_to_keep=None, step_counter=step_counter, checkpoint_interval=5
    )
    manager.save()
    step_counter.assign(1)
    assert manager.save() is None
    assert checkpoint.save_counter.numpy() == 1


def test_j48_state_file_lists_active_set_with_timestamps(tmp_path):
    manager = ac.CheckpointManager(ac.Checkpoint(), str(tmp_path), max_to_keep=None)
    paths = [manager.save() for _ in range(3)]
    state = ac.get_checkpoint_state(str(tmp_path))
    assert list(state.all_model_checkpoint_paths) == paths == manager.checkpoints
    timestamps = list(state.all_model_checkpoint_timestamps)
    assert len(timestamps) == 3 and timestamps == sorted(timestamps)
    with open(tmp_path / "checkpoint", encoding="utf-8") as handle:
        assert str(tmp_path) not in handle.read()  # relative paths on disk


def test_j48_save_passes_options_to_write(tmp_path):
    seen = []
    options = ac.CheckpointOptions(experimental_write_callbacks=[seen.append])
    manager = ac.CheckpointManager(ac.Checkpoint(), str(tmp_path), max_to_keep=1)
    path = manager.save(options=options)
    assert seen == [path]


# ---------------------------------------------------------------- J49 retention


def test_j49_deletes_beyond_max_to_keep(tmp_path):
    manager = ac.CheckpointManager(ac.Checkpoint(), str(tmp_path), max_to_keep=3)
    first, second, third, fourth = (manager.save() for _ in range(4))
    assert not ac.checkpoint_exists(first)
    assert all(ac.checkpoint_exists(p) for p in (second, third, fourth))
    assert manager.checkpoints == [second, third, fourth]


def test_j49_keep_all_and_new_manager_deletes_only_on_save(tmp_path):
    checkpoint = ac.Checkpoint()
    directory = str(tmp_path)
    manager = ac.CheckpointManager(checkpoint, directory, max_to_keep=None)
    first, second, third = manager.save(), manager.save(), manager.save()
    assert third == manager.latest_checkpoint
    assert manager.checkpoints == [first, second, third]
    manager = ac.CheckpointManager(checkpoint, directory, max_to_keep=None)
    fourth = manager.save()
    assert manager.checkpoints == [first, second, third, fourth]
    manager = ac.CheckpointManager(checkpoint, directory, max_to_keep=3)
    assert manager.checkpoints == [first, second, third, fourth]
    assert all(ac.checkpoint_exists(p) for p in (first, second, third, fourth))
    fifth = manager.save()
    assert manager.checkpoints == [third, fourth, fifth]
    assert [ac.checkpoint_exists(p) for p in (first, second, third, fourth, fifth)] == [False, False, True, True, True]


def test_j49_preservation_by_hours_across_managers(tmp_path, clock):
    directory = str(tmp_path)
    name = lambda n: os.path.join(directory, f"ckpt-{n}")  # noqa: E731
    checkpoint = ac.Checkpoint()
    first_manager = ac.CheckpointManager(checkpoint, directory, max_to_keep=2)
    first_time = 10000.0
    clock.now = first_time
    first_manager.save()
    second_time = first_time + 3610.0
    clock.now = second_time
    first_manager.save()
    state = ac.get_checkpoint_state(directory)
    assert list(state.all_model_checkpoint_timestamps) == [first_time, second_time]
    assert first_manager.checkpoints == [name(1), name(2)]
    assert first_manager.latest_checkpoint == name(2)
    del first_manager

    second_manager = ac.CheckpointManager(checkpoint, directory, max_to_keep=2, keep_checkpoint_every_n_hours=1.5)
    assert second_manager.checkpoints == [name(1), name(2)]
    assert second_manager.latest_checkpoint == name(2)
    third_time = second_time + 3600.0 * 0.2
    clock.now = third_time
    second_manager.save()
    assert ac.checkpoint_exists(name(1)) and ac.checkpoint_exists(name(2))
    assert second_manager.checkpoints == [name(2), name(3)]
    assert ac.get_checkpoint_state(directory).last_preserved_timestamp == first_time
    fourth_time = third_time + 3600.0 * 0.5
    clock.now = fourth_time
    second_manager.save()
    assert ac.checkpoint_exists(name(1)) and not ac.checkpoint_exists(name(2))
    assert second_manager.checkpoints == [name(3), name(4)]
    clock.now = fourth_time + 3600.0 * 0.5
    second_manager.save()
    assert second_manager.checkpoints == [name(4), name(5)]
    assert ac.get_checkpoint_state(directory).last_preserved_timestamp == first_time
    del second_manager

    third_manager = ac.CheckpointManager(checkpoint, directory, max_to_keep=2, keep_checkpoint_every_n_hours=1.5)
    assert third_manager.latest_checkpoint == name(5)
    clock.now += 10.0
    third_manager.save()
    assert ac.get_checkpoint_state(directory).last_preserved_timestamp == fourth_time
    assert [ac.checkpoint_exists(name(n)) for n in range(1, 7)] == [True, False, False, True, True, True]
    assert third_manager.checkpoints == [name(5), name(6)]


# ---------------------------------------------------------------- J50 restore_or_initialize


def test_j50_restore_or_initialize_calls_init_fn_then_restores(tmp_path):
    init_v = f32(2.0)
    init_path = ac.Checkpoint(v=init_v).save(str(tmp_path / "init"))
    v = f32(1.0)
    checkpoint = ac.Checkpoint(v=v)
    manager = ac.CheckpointManager(
        checkpoint, str(tmp_path / "ckpt"), max_to_keep=None, init_fn=lambda: checkpoint.restore(init_path)
    )
    assert manager.restore_or_initialize() is None
    assert v.numpy() == 2.0
    saved = manager.save()
    v.assign(7.0)
    assert manager.restore_or_initialize() == saved
    assert v.numpy() == 2.0


def test_j50_restore_or_initialize_without_init_fn(tmp_path):
    manager = ac.CheckpointManager(ac.Checkpoint(v=f32(1.0)), str(tmp_path), max_to_keep=1)
    assert manager.restore_or_initialize() is None


def test_j50_restore_or_initialize_in_fresh_process_state(tmp_path):
    saver = ac.Checkpoint(v=f32(3.0))
    path = ac.CheckpointManager(saver, str(tmp_path), max_to_keep=1).save()
    v = f32(0.0)
    manager = ac.CheckpointManager(ac.Checkpoint(v=v), str(tmp_path), max_to_keep=1)
    assert manager.restore_or_initialize() == path
    assert v.numpy() == 3.0


def test_j50_checkpoint_interval_with_restore(tmp_path):
    directory = str(tmp_path)
    step_counter = ac.Variable(0, dtype=np.int64)
    checkpoint = ac.Checkpoint(v=f32(1.0))
    checkpoint.save(os.path.join(directory, "ckpt"))
    manager = ac.CheckpointManager(
        checkpoint, directory, max_to_keep=None, step_counter=step_counter, checkpoint_interval=2
    )
    assert manager.restore_or_initialize() is not None
    # step 0 was just restored, so no checkpoint is written for it again
    assert manager.save() is None


# ---------------------------------------------------------------- J51 properties


def test_j51_properties(tmp_path):
    checkpoint = ac.Checkpoint()
    step_counter = ac.Variable(0, dtype=np.int64)
    manager = ac.CheckpointManager(
        checkpoint, str(tmp_path), max_to_keep=2, step_counter=step_counter, checkpoint_interval=4
    )
    assert manager.directory == str(tmp_path)
    assert manager.checkpoint is checkpoint
    assert manager.checkpoint_interval == 4
    assert manager.latest_checkpoint is None
    assert manager.checkpoints == []
    path = manager.save()
    assert manager.latest_checkpoint == path
    assert manager.checkpoints == [path]


def test_j51_checkpoints_exclude_preserved(tmp_path, clock):
    clock.now = 1000.0
    manager = ac.CheckpointManager(ac.Checkpoint(), str(tmp_path), max_to_keep=1, keep_checkpoint_every_n_hours=1.0)
    clock.now = 5000.0  # an hour after the construction-time preservation mark
    first = manager.save()
    clock.now += 10.0
    second = manager.save()
    assert manager.checkpoints == [second]
    assert ac.checkpoint_exists(first)
    assert list(ac.get_checkpoint_state(str(tmp_path)).all_model_checkpoint_paths) == [second]
