"""Behaviours K (CheckpointOptions) and L (asynchronous saving).

Ideas ported from TensorFlow's ``checkpoint_with_v1_optimizers_test.py::testSkipSlotVarRestore`` and
the async-parameterised tests of ``checkpoint_test.py`` (testCustomNumbering,
testMoreComplexSaveableReturned, test_inititialize_with_data_structures); the ``sync()`` error rule
is the [asyncckpt decision] of behaviour 58. Numbers refer to ``behaviours.md``.
"""

from __future__ import annotations

import numpy as np
import pytest

import asyncckpt as ac

ASYNC = dict(enable_async=True)


def f32(value):
    return ac.Variable(value, dtype=np.float32)


def keys(path):
    return [key for key, _ in ac.list_variables(path)]


class OneSlotOptimizer(ac.Trackable):
    """Smallest slot-protocol implementation: one zero-initialised slot ``m`` per variable."""

    def __init__(self):
        super().__init__()
        self._slots = {}  # (id(variable), name) -> (variable, slot); not a dependency
        self.restore_calls = 0

    def get_slot_names(self):
        return ["m"]

    def get_slot(self, var, name):
        return self._slots.get((id(var), name), (None, None))[1]

    def create_slots(self, var_list):
        for var in var_list:
            if self.get_slot(var, "m") is None:
                slot = ac.Variable(np.zeros(var.shape, dtype=var.dtype), dtype=var.dtype, trainable=False)
                self._slots[(id(var), "m")] = (var, slot)

    def _create_or_restore_slot_variable(self, slot_variable_position, slot_name, variable):
        self.restore_calls += 1
        self.create_slots([variable])
        slot_variable_position.restore(self.get_slot(variable, slot_name))


def model_with_slots():
    root = ac.Checkpoint()
    root.var = ac.add_variable(root, name="var", initializer=0.0)
    root.optimizer = OneSlotOptimizer()
    root.optimizer.create_slots([root.var])
    return root


# ---------------------------------------------------------------- K52 skip slot variables


def test_k52_skip_slot_variables_on_restore(prefix):
    root = model_with_slots()
    root.var.assign(12.0)
    root.optimizer.get_slot(root.var, "m").assign(14.0)
    path = root.save(prefix)
    new_root = model_with_slots()
    skip = ac.CheckpointOptions(experimental_skip_slot_variables=True)
    new_root.restore(path, options=skip).assert_consumed()
    assert new_root.var.numpy() == 12.0
    assert new_root.optimizer.get_slot(new_root.var, "m").numpy() == 0.0
    new_root.restore(path, options=ac.CheckpointOptions(experimental_skip_slot_variables=False)).assert_consumed()
    assert new_root.optimizer.get_slot(new_root.var, "m").numpy() == 14.0


def test_k52_skipped_slots_not_created_for_late_optimizer(prefix):
    root = model_with_slots()
    path = root.save(prefix)
    new_root = ac.Checkpoint()
    new_root.var = ac.add_variable(new_root, name="var", initializer=0.0)
    status = new_root.restore(path, options=ac.CheckpointOptions(experimental_skip_slot_variables=True))
    new_root.optimizer = OneSlotOptimizer()
    assert new_root.optimizer.restore_calls == 0
    assert new_root.optimizer.get_slot(new_root.var, "m") is None
    status.assert_consumed()


# ---------------------------------------------------------------- K53 options


def test_k53_option_defaults():
    options = ac.CheckpointOptions()
    assert options.enable_async is False
    assert not options.experimental_write_callbacks  # None or empty: no callbacks
    assert options.experimental_skip_slot_variables is False


def test_k53_enable_async_option():
    assert ac.CheckpointOptions(enable_async=True).enable_async is True


def test_k53_restore_accepts_options(prefix, save_options):
    v = f32(1.0)
    ckpt = ac.Checkpoint(v=v)
    path = ckpt.save(prefix, options=save_options)
    v.assign(0.0)
    ckpt.restore(path, options=save_options).assert_consumed()
    assert v.numpy() == 1.0


# ---------------------------------------------------------------- L54 snapshot at call time


def test_l54_async_save_returns_final_numbered_path(prefix):
    ckpt = ac.Checkpoint(v=f32(1.0))
    path = ckpt.save(prefix, options=ac.CheckpointOptions(**ASYNC))
    assert path == prefix + "-1"
    ckpt.sync()
    assert ac.checkpoint_exists(path)


def test_l54_async_save_snapshot_isolated_from_later_assign(prefix):
    v = f32(np.arange(100_000, dtype=np.float32))
    ckpt = ac.Checkpoint(v=v)
    path = ckpt.save(prefix, options=ac.CheckpointOptions(**ASYNC))
    v.assign(np.full(100_000, -1.0, dtype=np.float32))
    ckpt.sync()
    np.testing.assert_array_equal(ac.load_variable(path, "v/.ATTRIBUTES/VARIABLE_VALUE"), np.arange(100_000))


def test_l54_async_write_snapshot_isolated_from_later_assign(prefix):
    v = f32(np.ones(50_000, dtype=np.float32))
    ckpt = ac.Checkpoint(v=v)
    path = ckpt.write(prefix, options=ac.CheckpointOptions(**ASYNC))
    assert path == prefix
    v.assign(np.zeros(50_000, dtype=np.float32))
    ckpt.sync()
    assert ac.load_variable(path, "v/.ATTRIBUTES/VARIABLE_VALUE").sum() == 50_000


def test_l54_objects_added_after_first_async_save_are_snapshotted(prefix):
    # [asyncckpt decision]: the object map is rebuilt on every save, so late objects get snapshots too.
    options = ac.CheckpointOptions(**ASYNC)
    ckpt = ac.Checkpoint(v=f32(1.0))
    ckpt.save(prefix, options=options)
    late = f32(np.full(50_000, 2.0, dtype=np.float32))
    ckpt.late = late
    path = ckpt.save(prefix, options=options)
    late.assign(np.zeros(50_000, dtype=np.float32))
    ckpt.sync()
    assert ac.load_variable(path, "late/.ATTRIBUTES/VARIABLE_VALUE").min() == 2.0


def test_l54_slots_created_after_first_async_save_are_saved(prefix):
    options = ac.CheckpointOptions(**ASYNC)
    root = ac.Checkpoint(var=f32(1.0), optimizer=OneSlotOptimizer())
    root.save(prefix, options=options)
    root.optimizer.create_slots([root.var])
    root.optimizer.get_slot(root.var, "m").assign(5.0)
    path = root.save(prefix, options=options)
    root.optimizer.get_slot(root.var, "m").assign(6.0)
    root.sync()
    assert ac.load_variable(path, "var/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE") == 5.0


# ---------------------------------------------------------------- L55 ordered writes


def test_l55_consecutive_async_saves_each_keep_their_values(tmp_path):
    options = ac.CheckpointOptions(**ASYNC)
    v = f32(np.zeros(20_000, dtype=np.float32))
    ckpt = ac.Checkpoint(v=v)
    paths = []
    for i in range(1, 5):
        v.assign(np.full(20_000, float(i), dtype=np.float32))
        paths.append(ckpt.save(str(tmp_path / "ckpt"), options=options))
    ckpt.sync()
    assert paths == [str(tmp_path / f"ckpt-{i}") for i in range(1, 5)]
    for i, path in enumerate(paths, start=1):
        assert set(np.unique(ac.load_variable(path, "v/.ATTRIBUTES/VARIABLE_VALUE"))) == {float(i)}
    assert ac.latest_checkpoint(str(tmp_path)) == paths[-1]


# ---------------------------------------------------------------- L56 waiting for pending writes


def test_l56_restore_on_same_checkpoint_waits(prefix):
    v = f32(np.full(50_000, 3.0, dtype=np.float32))
    ckpt = ac.Checkpoint(v=v)
    path = ckpt.save(prefix, options=ac.CheckpointOptions(**ASYNC))
    v.assign(np.zeros(50_000, dtype=np.float32))
    ckpt.restore(path).assert_consumed()
    assert v.numpy().min() == 3.0


def test_l56_read_on_same_checkpoint_waits(prefix):
    v = f32(4.0)
    ckpt = ac.Checkpoint(v=v)
    ckpt.write(prefix, options=ac.CheckpointOptions(**ASYNC))
    v.assign(0.0)
    ckpt.read(prefix).assert_consumed()
    assert v.numpy() == 4.0


def test_l56_restore_from_another_instance_waits(prefix):
    # [asyncckpt decision]: any Checkpoint in the process waits for pending writes to that prefix.
    ckpt = ac.Checkpoint(v=f32(np.full(50_000, 5.0, dtype=np.float32)))
    path = ckpt.save(prefix, options=ac.CheckpointOptions(**ASYNC))
    other = f32(np.zeros(50_000, dtype=np.float32))
    ac.Checkpoint(v=other).restore(path).assert_consumed()
    assert other.numpy().min() == 5.0
    ckpt.sync()


def test_l56_sync_waits_for_all_pending_writes(tmp_path):
    options = ac.CheckpointOptions(**ASYNC)
    ckpt = ac.Checkpoint(v=f32(np.ones(20_000, dtype=np.float32)))
    paths = [ckpt.save(str(tmp_path / "ckpt"), options=options) for _ in range(3)]
    ckpt.sync()
    assert all(ac.checkpoint_exists(p) for p in paths)


def test_l56_sync_without_async_is_noop(prefix):
    ckpt = ac.Checkpoint(v=f32(1.0))
    assert ckpt.sync() is None
    ckpt.save(prefix)
    assert ckpt.sync() is None


# ---------------------------------------------------------------- L57 callbacks after the write


def test_l57_async_callbacks_run_after_data_is_written(prefix):
    seen = []
    options = ac.CheckpointOptions(enable_async=True, experimental_write_callbacks=[
        lambda path: seen.append((path, ac.checkpoint_exists(path)))
    ])
    ckpt = ac.Checkpoint(v=f32(1.0))
    path = ckpt.save(prefix, options=options)
    ckpt.sync()
    assert seen == [(path, True)]


def test_l57_state_file_never_points_at_incomplete_checkpoint(tmp_path):
    options = ac.CheckpointOptions(**ASYNC)
    ckpt = ac.Checkpoint(v=f32(np.ones(50_000, dtype=np.float32)))
    for _ in range(3):
        ckpt.save(str(tmp_path / "ckpt"), options=options)
        state = ac.get_checkpoint_state(str(tmp_path))
        assert state is None or ac.checkpoint_exists(state.model_checkpoint_path)
    ckpt.sync()
    assert ac.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-3")


def test_l57_manager_bookkeeping_after_async_writes(tmp_path):
    checkpoint = ac.Checkpoint(v=f32(1.0))
    manager = ac.CheckpointManager(checkpoint, str(tmp_path), max_to_keep=2)
    options = ac.CheckpointOptions(**ASYNC)
    paths = [manager.save(options=options) for _ in range(4)]
    checkpoint.sync()
    assert manager.checkpoints == paths[2:]
    assert manager.latest_checkpoint == paths[-1] == ac.latest_checkpoint(str(tmp_path))
    assert [ac.checkpoint_exists(p) for p in paths] == [False, False, True, True]


# ---------------------------------------------------------------- L58 background errors


def _failing_options():
    def fail():
        raise RuntimeError("background callback failed")

    return ac.CheckpointOptions(enable_async=True, experimental_write_callbacks=[fail])


def test_l58_sync_reraises_background_error(prefix):
    ckpt = ac.Checkpoint(v=f32(1.0))
    ckpt.save(prefix, options=_failing_options())
    with pytest.raises(RuntimeError, match="background callback failed"):
        ckpt.sync()


@pytest.mark.parametrize("method", ["save", "write"])
def test_l58_next_save_reraises_background_error(prefix, method):
    ckpt = ac.Checkpoint(v=f32(1.0))
    ckpt.save(prefix, options=_failing_options())
    with pytest.raises(RuntimeError, match="background callback failed"):
        getattr(ckpt, method)(prefix + "-next", options=ac.CheckpointOptions(**ASYNC))


# ---------------------------------------------------------------- L59 same result as sync


def _graph_shape(meta):
    """The object graph without ``full_name`` (a per-object display name that may differ between builds)."""
    return [
        {**node, "attributes": [{k: v for k, v in a.items() if k != "full_name"} for a in node["attributes"]]}
        for node in meta["nodes"]
    ]


def test_l59_async_result_identical_to_sync(tmp_path):
    def build():
        model = ac.AutoTrackable()
        model.layers = [f32(np.ones((2, 3))), {"bias": f32(np.zeros(3))}]
        model.opt = OneSlotOptimizer()
        model.opt.create_slots([model.layers[0]])
        return ac.Checkpoint(model=model, step=ac.Variable(7, dtype=np.int64))

    sync_path = build().save(str(tmp_path / "sync" / "ckpt"))
    async_ckpt = build()
    async_path = async_ckpt.save(str(tmp_path / "async" / "ckpt"), options=ac.CheckpointOptions(**ASYNC))
    async_ckpt.sync()
    assert ac.list_variables(async_path) == ac.list_variables(sync_path)
    assert _graph_shape(ac.object_metadata(async_path)) == _graph_shape(ac.object_metadata(sync_path))
    for key in keys(sync_path):
        if key != "_CHECKPOINTABLE_OBJECT_GRAPH":
            np.testing.assert_array_equal(ac.load_variable(async_path, key), ac.load_variable(sync_path, key))


def test_l59_one_save_counter_for_sync_and_async(prefix):
    ckpt = ac.Checkpoint(v=f32(1.0))
    async_options = ac.CheckpointOptions(**ASYNC)
    paths = [ckpt.save(prefix), ckpt.save(prefix, options=async_options), ckpt.save(prefix)]
    paths.append(ckpt.save(prefix, options=async_options))
    ckpt.sync()
    assert paths == [f"{prefix}-{n}" for n in range(1, 5)]
    assert ckpt.save_counter.numpy() == 4
    assert ac.load_variable(paths[-1], "save_counter/.ATTRIBUTES/VARIABLE_VALUE") == 4
