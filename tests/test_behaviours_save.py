"""Behaviours C (save / write / save_counter / write callbacks).

Ideas ported from TensorFlow's ``checkpoint_test.py`` (testCustomNumbering, testFreezing,
testCheckpointStateChangingVarList, test_save_restore_fspath, test_read_write_fspath,
test_write_checkpoint_path_str_from_function); numbers refer to ``behaviours.md``.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

import asyncckpt as ac

COUNTER_KEY = "save_counter/.ATTRIBUTES/VARIABLE_VALUE"


def f32(value):
    return ac.Variable(value, dtype=np.float32)


def keys(path):
    return [key for key, _ in ac.list_variables(path)]


# ---------------------------------------------------------------- C17 save_counter


def test_c17_save_counter_not_created_by_write(prefix):
    path = ac.Checkpoint(v=f32(1.0)).write(prefix)
    assert COUNTER_KEY not in keys(path)


def test_c17_save_counter_created_on_property_access(prefix):
    ckpt = ac.Checkpoint(v=f32(1.0))
    counter = ckpt.save_counter
    assert counter.numpy() == 0
    assert np.dtype(counter.dtype) == np.int64
    assert counter.trainable is False
    assert COUNTER_KEY in keys(ckpt.write(prefix))


def test_c17_save_counter_is_same_object_on_each_access():
    ckpt = ac.Checkpoint()
    assert ckpt.save_counter is ckpt.save_counter


def test_c17_save_counter_saved_as_dependency(prefix):
    ckpt = ac.Checkpoint(v=f32(1.0))
    ckpt.save(prefix)
    path = ckpt.save(prefix)
    assert COUNTER_KEY in keys(path)
    assert ac.load_variable(path, COUNTER_KEY) == 2
    assert ckpt.save_counter.numpy() == 2


def test_c17_save_counter_top_level_key_with_root(prefix):
    model = ac.AutoTrackable()
    model.v = f32(1.0)
    path = ac.Checkpoint(root=model).save(prefix)
    assert keys(path) == ["_CHECKPOINTABLE_OBJECT_GRAPH", COUNTER_KEY, "v/.ATTRIBUTES/VARIABLE_VALUE"]


def test_c17_save_counter_created_and_restored_by_restore(prefix):
    saver = ac.Checkpoint()
    saver.save_counter.assign(12)
    path = saver.write(prefix)
    loader = ac.Checkpoint()
    loader.restore(path).assert_consumed()
    assert loader.save_counter.numpy() == 12


# ---------------------------------------------------------------- C18 save


def test_c18_save_numbers_paths_from_one(prefix):
    ckpt = ac.Checkpoint(v=f32(1.0))
    assert ckpt.save(prefix) == prefix + "-1"
    assert ckpt.save(prefix) == prefix + "-2"
    assert ac.checkpoint_exists(prefix + "-1") and ac.checkpoint_exists(prefix + "-2")


def test_c18_save_increments_counter_before_writing(prefix):
    ckpt = ac.Checkpoint()
    path = ckpt.save(prefix)
    assert ac.load_variable(path, COUNTER_KEY) == 1


def test_c18_save_returns_str(prefix):
    path = ac.Checkpoint(v=f32(1.0)).save(prefix)
    assert type(path) is str


def test_c18_save_accepts_pathlike(tmp_path):
    v, w = f32(1.0), f32(0.0)
    path = ac.Checkpoint(v=v).save(pathlib.Path(tmp_path) / "ckpt")
    assert path == str(tmp_path / "ckpt") + "-1"
    ac.Checkpoint(v=w).restore(pathlib.Path(path))
    assert w.numpy() == 1.0


def test_c18_save_updates_state_file(tmp_path):
    ckpt = ac.Checkpoint(v=f32(1.0))
    first = ckpt.save(str(tmp_path / "ckpt"))
    assert ac.latest_checkpoint(str(tmp_path)) == first
    second = ckpt.save(str(tmp_path / "ckpt"))
    assert ac.latest_checkpoint(str(tmp_path)) == second


def test_c18_save_does_not_mutate_caller_options(prefix):
    callback = lambda: None  # noqa: E731
    options = ac.CheckpointOptions(experimental_write_callbacks=[callback])
    ac.Checkpoint(v=f32(1.0)).save(prefix, options=options)
    assert list(options.experimental_write_callbacks) == [callback]
    plain = ac.CheckpointOptions()
    ac.Checkpoint(v=f32(1.0)).save(prefix + "b", options=plain)
    assert not plain.experimental_write_callbacks  # the state-file updater was not appended to it


# ---------------------------------------------------------------- C19 write


def test_c19_write_uses_exact_path(prefix):
    path = ac.Checkpoint(v=f32(1.0)).write(prefix)
    assert path == prefix and type(path) is str
    assert ac.checkpoint_exists(prefix)


def test_c19_write_does_not_touch_save_counter(prefix):
    ckpt = ac.Checkpoint(v=f32(1.0))
    ckpt.save_counter  # noqa: B018 - create it
    ckpt.write(prefix)
    ckpt.write(prefix + "b")
    assert ckpt.save_counter.numpy() == 0


def test_c19_existing_save_counter_written_like_a_variable(prefix):
    ckpt = ac.Checkpoint(v=f32(1.0))
    ckpt.save_counter.assign(5)
    assert ac.load_variable(ckpt.write(prefix), COUNTER_KEY) == 5


def test_c19_write_does_not_update_state_file(tmp_path):
    ac.Checkpoint(v=f32(1.0)).write(str(tmp_path / "ckpt"))
    assert ac.latest_checkpoint(str(tmp_path)) is None
    assert ac.get_checkpoint_state(str(tmp_path)) is None


def test_c19_write_keeps_latest_pointing_at_last_save(tmp_path):
    ckpt = ac.Checkpoint(v=f32(1.0))
    saved = ckpt.save(str(tmp_path / "ckpt"))
    ckpt.write(str(tmp_path / "other"))
    assert ac.latest_checkpoint(str(tmp_path)) == saved


def test_c19_write_custom_numbering(prefix, save_options):
    step = ac.Variable(0, dtype=np.int64)
    ckpt = ac.Checkpoint(step=step)
    for i in range(5):
        path = ckpt.write(f"{prefix}-{int(step.numpy())}", options=save_options)
        assert path.endswith(f"-{2 * i}")
        step.assign(step.numpy() + 2)
    ckpt.sync()
    assert all(ac.checkpoint_exists(f"{prefix}-{n}") for n in (0, 2, 4, 6, 8))


def test_c19_write_accepts_pathlike(tmp_path):
    v, w = f32(1.0), f32(0.0)
    path = ac.Checkpoint(v=v).write(pathlib.Path(tmp_path) / "ckpt")
    assert path == str(tmp_path / "ckpt")
    ac.Checkpoint(v=w).read(pathlib.Path(path)).assert_consumed()
    assert w.numpy() == 1.0


def test_c19_write_overwrites_same_prefix(prefix):
    v = f32(1.0)
    ckpt = ac.Checkpoint(v=v)
    ckpt.write(prefix)
    v.assign(3.0)
    ckpt.write(prefix)
    v.assign(0.0)
    ckpt.read(prefix).assert_consumed()
    assert v.numpy() == 3.0


# ---------------------------------------------------------------- C20 parent directories


@pytest.mark.parametrize("method", ["save", "write"])
def test_c20_parent_directory_created(tmp_path, method):
    target = tmp_path / "a" / "b" / "ckpt"
    path = getattr(ac.Checkpoint(v=f32(1.0)), method)(str(target))
    assert os.path.isdir(tmp_path / "a" / "b")
    assert ac.checkpoint_exists(path)


# ---------------------------------------------------------------- C21 graph at save time


def test_c21_each_save_serialises_current_graph(tmp_path):
    prefix = str(tmp_path / "ckpt")
    ckpt = ac.Checkpoint(obj=f32(0.0))
    added = []
    for i in range(10):
        var = ac.Variable(i, dtype=np.int64)
        setattr(ckpt, f"var_{i}", var)
        ckpt.save(prefix)
        added.append(var)
    assert ac.latest_checkpoint(str(tmp_path)) == prefix + "-10"
    assert all(ac.checkpoint_exists(f"{prefix}-{n}") for n in range(1, 11))
    assert "var_5/.ATTRIBUTES/VARIABLE_VALUE" in keys(prefix + "-6")
    assert "var_6/.ATTRIBUTES/VARIABLE_VALUE" not in keys(prefix + "-6")
    for var in added:
        var.assign(314)
    ckpt.restore(prefix + "-6")
    assert [int(v.numpy()) for v in added] == [0, 1, 2, 3, 4, 5, 314, 314, 314, 314]
    ckpt.restore(prefix + "-10")
    assert [int(v.numpy()) for v in added] == list(range(10))


# ---------------------------------------------------------------- C22 restore vs read


def test_c22_write_checkpoint_restored_leaves_save_counter_unmatched(prefix):
    path = ac.Checkpoint(v=f32(1.0)).write(prefix)
    status = ac.Checkpoint(v=f32(0.0)).restore(path)
    with pytest.raises(AssertionError):
        status.assert_existing_objects_matched()
    with pytest.raises(AssertionError):
        status.assert_consumed()


def test_c22_write_checkpoint_read_matches(prefix):
    save = ac.Checkpoint(v=f32(1.0))
    save.write(prefix)
    load = ac.Checkpoint(v=f32(0.0))
    load.read(prefix).assert_existing_objects_matched().assert_consumed()
    assert load.v.numpy() == 1.0
    save.v.assign(3.0)
    save.write(prefix)
    load.read(prefix).assert_consumed()
    assert load.v.numpy() == 3.0


def test_c22_read_does_not_create_save_counter(tmp_path):
    path = ac.Checkpoint(v=f32(1.0)).save(str(tmp_path / "ckpt"))
    load = ac.Checkpoint(v=f32(0.0))
    load.read(path)
    assert "save_counter/.ATTRIBUTES/VARIABLE_VALUE" not in keys(load.write(str(tmp_path / "check")))


def test_c22_restore_sets_counter_so_numbering_continues(tmp_path):
    prefix = str(tmp_path / "ckpt")
    ckpt = ac.Checkpoint(v=f32(1.0))
    for _ in range(3):
        ckpt.save(prefix)
    resumed = ac.Checkpoint(v=f32(0.0))
    resumed.restore(prefix + "-3").assert_consumed()
    assert resumed.save_counter.numpy() == 3
    assert resumed.save(prefix) == prefix + "-4"


def test_c22_restore_of_save_checkpoint_before_variables_exist(prefix):
    saver = ac.Checkpoint(v=ac.Variable(3, dtype=np.int64))
    saver.save_counter.assign(12)
    path = saver.write(prefix)
    loader = ac.Checkpoint()
    status = loader.restore(path)
    assert loader.save_counter.numpy() == 12
    v = ac.Variable(0, dtype=np.int64)
    assert v.numpy() == 0
    loader.v = v
    status.assert_consumed()
    assert v.numpy() == 3


# ---------------------------------------------------------------- C23 write callbacks


@pytest.mark.parametrize("method", ["save", "write"])
def test_c23_callbacks_run_in_order_with_path(prefix, method):
    calls = []
    options = ac.CheckpointOptions(
        experimental_write_callbacks=[lambda: calls.append("zero"), lambda path: calls.append(("one", path))]
    )
    path = getattr(ac.Checkpoint(v=f32(1.0)), method)(prefix, options=options)
    assert calls == ["zero", ("one", path)]


def test_c23_callbacks_run_after_every_save(prefix):
    seen = []
    options = ac.CheckpointOptions(experimental_write_callbacks=[seen.append])
    ckpt = ac.Checkpoint(v=f32(1.0))
    first = ckpt.save(prefix, options=options)
    second = ckpt.save(prefix, options=options)
    assert seen == [first, second]


def test_c23_callbacks_see_committed_checkpoint(prefix):
    seen = []
    options = ac.CheckpointOptions(experimental_write_callbacks=[lambda p: seen.append(ac.checkpoint_exists(p))])
    ac.Checkpoint(v=f32(1.0)).save(prefix, options=options)
    assert seen == [True]


def test_c23_state_file_updated_after_user_callbacks(tmp_path):
    seen = []
    options = ac.CheckpointOptions(
        experimental_write_callbacks=[lambda: seen.append(ac.latest_checkpoint(str(tmp_path)))]
    )
    ckpt = ac.Checkpoint(v=f32(1.0))
    first = ckpt.save(str(tmp_path / "ckpt"), options=options)
    second = ckpt.save(str(tmp_path / "ckpt"), options=options)
    assert seen == [None, first]
    assert ac.latest_checkpoint(str(tmp_path)) == second


def test_c23_callback_with_two_parameters_rejected():
    with pytest.raises(AssertionError):
        ac.CheckpointOptions(experimental_write_callbacks=[lambda a, b: None])
