"""Behaviours D (restore/read matching) and E (deferred restoration, restore-on-create).

Ideas ported from TensorFlow's ``checkpoint_test.py`` (testObjectsCombined, testAmbiguousLoad,
testAttributeException, test_restore_incompatible_shape, testRestoreOnAssign, testDepAfterVar,
testLateDependencyTracking, testOverlappingRestores, testDependencyLoop,
test_deferred_dependency_avoids_reference_cycles, test_checkpoint_saved_model_compatibility) and
``checkpoint_with_v1_optimizers_test.py::testDeferredSlotRestoration``; numbers refer to
``behaviours.md``.
"""

from __future__ import annotations

import contextlib
import gc
import re
import weakref

import numpy as np
import pytest

import asyncckpt as ac

NO_CHECKPOINT = "No checkpoint specified (save_path=None); nothing is being restored."


def f32(value):
    return ac.Variable(value, dtype=np.float32)


@contextlib.contextmanager
def no_cycle_collector():
    """Disable the cycle collector so only reference counting can free objects."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Dependency(ac.AutoTrackable):
    def build(self):
        self.var = ac.add_variable(self, "var", initializer=0.0)


# ---------------------------------------------------------------- D24 restore(None)


@pytest.mark.parametrize("method", ["assert_consumed", "assert_existing_objects_matched", "assert_nontrivial_match"])
def test_d24_restore_none_assertions_raise(method):
    status = ac.Checkpoint(v=f32(1.0)).restore(None)
    with pytest.raises(AssertionError, match=re.escape(NO_CHECKPOINT)):
        getattr(status, method)()


def test_d24_restore_none_run_restore_ops_raises():
    with pytest.raises(AssertionError):
        ac.Checkpoint(v=f32(1.0)).restore(None).run_restore_ops()


def test_d24_restore_none_initialize_or_restore_is_noop():
    v = f32(1.5)
    ac.Checkpoint(v=v).restore(None).initialize_or_restore()
    assert v.numpy() == 1.5


def test_d24_restore_none_expect_partial_returns_status():
    status = ac.Checkpoint().restore(None)
    assert status.expect_partial() is status


def test_d24_restore_none_creates_zero_save_counter():
    ckpt = ac.Checkpoint()
    ckpt.restore(None)
    assert ckpt.save_counter.numpy() == 0


# ---------------------------------------------------------------- D25 missing checkpoint


def test_d25_restore_missing_checkpoint_raises_not_found(tmp_path):
    missing = str(tmp_path / "nothing-1")
    with pytest.raises(ac.NotFoundError) as excinfo:
        ac.Checkpoint(v=f32(1.0)).restore(missing)
    message = str(excinfo.value)
    assert f"Error when restoring from checkpoint or SavedModel at {missing}" in message
    assert "You may be missing the checkpoint suffix (e.g. the '-1' in 'path/to/ckpt-1')." in message


def test_d25_not_found_is_a_file_not_found_error(tmp_path):
    assert issubclass(ac.NotFoundError, FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        ac.Checkpoint().restore(str(tmp_path / "nothing"))


def test_d25_restore_without_suffix_raises(prefix):
    ac.Checkpoint(v=f32(1.0)).save(prefix)
    with pytest.raises(ac.NotFoundError, match=re.escape("You may be missing the checkpoint suffix")):
        ac.Checkpoint(v=f32(0.0)).restore(prefix)


def test_d25_read_missing_checkpoint_raises_not_found(tmp_path):
    with pytest.raises(ac.NotFoundError):
        ac.Checkpoint(v=f32(1.0)).read(str(tmp_path / "nothing"))


# ---------------------------------------------------------------- D26 matching by edge name


def test_d26_existing_objects_restored_immediately(prefix):
    v = f32(1.0)
    ckpt = ac.Checkpoint(v=v)
    path = ckpt.save(prefix)
    v.assign(5.0)
    ckpt.restore(path)
    assert v.numpy() == 1.0


def test_d26_matching_by_name_not_by_order(prefix):
    path = ac.Checkpoint(a=f32(1.0), b=f32(2.0)).save(prefix)
    load = ac.Checkpoint()
    load.b = f32(0.0)
    load.a = f32(0.0)
    load.restore(path).assert_consumed()
    assert (load.a.numpy(), load.b.numpy()) == (1.0, 2.0)


def test_d26_two_checkpoint_objects_combined_into_one(prefix):
    save_root = ac.Checkpoint()
    save_root.dep_one = ac.AutoTrackable()
    save_root.dep_two = ac.AutoTrackable()
    ac.add_variable(save_root.dep_one, name="var1", initializer=32.0, dtype=np.float64)
    ac.add_variable(save_root.dep_two, name="var2", initializer=64.0, dtype=np.float64)
    path = save_root.save(prefix)
    load_root = ac.Checkpoint()
    load_root.dep_one = ac.AutoTrackable()
    load_root.dep_two = load_root.dep_one
    v1 = ac.add_variable(load_root.dep_one, name="var1", shape=[], dtype=np.float64)
    v2 = ac.add_variable(load_root.dep_one, name="var2", shape=[], dtype=np.float64)
    load_root.restore(path).assert_consumed().assert_existing_objects_matched()
    assert (v1.numpy(), v2.numpy()) == (32.0, 64.0)


def test_d26_one_checkpoint_object_not_split_into_two(prefix):
    save_root = ac.Checkpoint()
    save_root.dep_one = ac.AutoTrackable()
    save_root.dep_two = ac.AutoTrackable()
    shared = ac.AutoTrackable()
    save_root.dep_one.dep_three = shared
    save_root.dep_two.dep_three = shared
    ac.add_variable(shared, name="var", initializer=5.0)
    path = save_root.save(prefix)
    load_root = ac.Checkpoint()
    status = load_root.restore(path)
    load_root.dep_one = ac.AutoTrackable()
    load_root.dep_two = ac.AutoTrackable()
    load_root.dep_one.dep_three = ac.AutoTrackable()
    load_root.dep_two.dep_three = ac.AutoTrackable()
    first = ac.add_variable(load_root.dep_one.dep_three, name="var", initializer=0.0)
    second = ac.add_variable(load_root.dep_two.dep_three, name="var", initializer=0.0)
    with pytest.raises(AssertionError):
        status.assert_consumed()
    with pytest.raises(AssertionError):
        status.assert_existing_objects_matched()
    assert (first.numpy(), second.numpy()) == (5.0, 0.0)


# ---------------------------------------------------------------- D27 extra objects in checkpoint


def test_d27_extra_checkpoint_objects_do_not_raise(prefix):
    path = ac.Checkpoint(v1=f32(2.0), v2=f32(3.0)).save(prefix)
    load = ac.Checkpoint(v1=f32(0.0))
    status = load.restore(path)
    assert load.v1.numpy() == 2.0
    status.assert_existing_objects_matched()
    with pytest.raises(AssertionError, match=re.escape("Unresolved object in checkpoint (root).v2")):
        status.assert_consumed()


def test_d27_extra_checkpoint_subtree_waits_for_attach(prefix):
    root = ac.AutoTrackable()
    root.branch = ac.AutoTrackable()
    root.branch.v = f32(5.0)
    path = ac.Checkpoint(model=root).save(prefix)
    new_root = ac.AutoTrackable()
    status = ac.Checkpoint(model=new_root).restore(path)
    with pytest.raises(AssertionError):
        status.assert_consumed()
    new_root.branch = ac.AutoTrackable()
    new_root.branch.v = f32(0.0)
    status.assert_consumed()
    assert new_root.branch.v.numpy() == 5.0


def test_d27_valueless_checkpoint_nodes_not_required(prefix):
    root = ac.AutoTrackable()
    root.branch_no_value = ac.AutoTrackable()
    root.branch_no_value.child = ac.AutoTrackable()
    root.v = f32(1.0)
    path = ac.Checkpoint(model=root).save(prefix)
    new_root = ac.AutoTrackable()
    new_root.v = f32(0.0)
    ac.Checkpoint(model=new_root).restore(path).assert_consumed()
    assert new_root.v.numpy() == 1.0


# ---------------------------------------------------------------- D28 extra objects in Python


def test_d28_extra_python_variable_keeps_value_and_fails_match(prefix):
    path = ac.Checkpoint(v=f32(1.0)).save(prefix)
    load = ac.Checkpoint(v=f32(0.0), extra=f32(7.0))
    status = load.restore(path)
    assert load.extra.numpy() == 7.0
    assert load.v.numpy() == 1.0
    fragment = "Found 1 Python objects that were not bound to checkpointed values"
    with pytest.raises(AssertionError, match=re.escape(fragment)):
        status.assert_existing_objects_matched()
    with pytest.raises(AssertionError):
        status.assert_consumed()


def test_d28_extra_python_object_without_attributes_is_fine(prefix):
    path = ac.Checkpoint(v=f32(1.0)).save(prefix)
    load = ac.Checkpoint(v=f32(0.0), extra=ac.AutoTrackable())
    load.restore(path).assert_existing_objects_matched().assert_consumed()


# ---------------------------------------------------------------- D29 attribute mismatch


def test_d29_unused_attributes_reported_by_assert_consumed(prefix):
    path = ac.Checkpoint(v1=f32(2.0), v2=f32(3.0)).save(prefix)
    partial = ac.Checkpoint(v1=ac.Trackable(), v2=f32(0.0))
    status = partial.restore(path)  # no error at restore time
    assert partial.v2.numpy() == 3.0
    fragment = "Unused attributes in these objects (the attributes exist in the checkpoint but were not restored):"
    with pytest.raises(AssertionError, match=re.escape(fragment) + r"(?s:.*)\(root\)\.v1"):
        status.assert_consumed()


# ---------------------------------------------------------------- D30 shape / dtype mismatch


def test_d30_shape_mismatch_on_existing_variable(prefix):
    path = ac.Checkpoint(v=f32([1.0, 1.0])).save(prefix)
    fragment = (
        "Received incompatible tensor with shape (2,) when attempting to restore variable with shape (1,) and name"
    )
    with pytest.raises(ValueError, match=re.escape(fragment)):
        ac.Checkpoint(v=f32([1.0])).restore(path)


def test_d30_shape_mismatch_on_deferred_attach(prefix):
    path = ac.Checkpoint(v=f32([1.0, 1.0])).save(prefix)
    load = ac.Checkpoint()
    load.restore(path)
    with pytest.raises(ValueError, match=re.escape("Received incompatible tensor with shape (2,)")):
        load.v = f32([1.0])


def test_d30_dtype_mismatch_raises_instead_of_casting(prefix):
    path = ac.Checkpoint(v=f32(1.0)).save(prefix)
    target = ac.Variable(0.0, dtype=np.float64)
    with pytest.raises(ValueError, match="dtype"):
        ac.Checkpoint(v=target).restore(path)
    assert np.dtype(target.dtype) == np.float64


def test_d30_dtype_mismatch_on_deferred_attach(prefix):
    path = ac.Checkpoint(v=f32(1.0)).save(prefix)
    load = ac.Checkpoint()
    load.restore(path)
    with pytest.raises(ValueError, match="dtype"):
        load.v = ac.Variable(0, dtype=np.int32)


def test_d30_restore_on_create_with_conflicting_declared_shape(prefix):
    # [asyncckpt decision]: a declared shape that conflicts with the checkpoint always raises.
    path = ac.Checkpoint(v=f32([1.0, 2.0])).save(prefix)
    load = ac.Checkpoint()
    load.restore(path)
    with pytest.raises(ValueError, match="shape"):
        ac.add_variable(load, "v", shape=[3])


# ---------------------------------------------------------------- E31/E32 deferred restoration


def test_e31_missing_dependency_restored_when_assigned(prefix):
    first = ac.Checkpoint()
    first.var1 = f32(4.0)
    first.var2 = f32(8.0)
    path = first.save(prefix)
    second = ac.Checkpoint()
    second.var2 = f32(0.0)
    second.restore(path)
    assert second.var2.numpy() == 8.0
    recreated = f32(0.0)
    recreated.assign(-2.0)
    assert recreated.numpy() == -2.0
    second.var1 = recreated
    assert recreated.numpy() == 4.0


def test_e31_deferred_restore_through_track_trackable(prefix):
    path = ac.Checkpoint(v=f32(6.0)).save(prefix)
    root = ac.Trackable()
    ckpt = ac.Checkpoint(root=root)
    ckpt.restore(path)
    v = f32(0.0)
    root._track_trackable(v, name="v")
    assert v.numpy() == 6.0


def test_e32_attach_restores_descendants(prefix):
    class DepAfterVar(ac.Checkpoint):
        def add_dep(self):
            dep = Dependency()
            dep.build()
            self.dep = dep

    saver = DepAfterVar()
    saver.add_dep()
    saver.dep.var.assign(-14.0)
    path = saver.save(prefix)
    loaded = DepAfterVar()
    status = loaded.restore(path)
    loaded.add_dep()
    status.assert_consumed()
    assert loaded.dep.var.numpy() == -14.0


def test_e32_late_dependency_tracking(prefix):
    class LateDependencies(ac.Checkpoint):
        def add_dep(self):
            self.dep = Dependency()
            self.dep.build()

    original = LateDependencies()
    original.add_dep()
    original.dep.var.assign(123.0)
    path = original.save(prefix)
    load_into = LateDependencies()
    status = load_into.restore(path)
    status.assert_existing_objects_matched()
    with pytest.raises(AssertionError):
        status.assert_consumed()
    load_into.add_dep()
    status.assert_consumed()
    status.assert_existing_objects_matched()
    assert load_into.dep.var.numpy() == 123.0


def test_e32_overwrite_after_bind_does_not_reapply_restore(prefix):
    path = ac.Checkpoint(v=f32(4.0)).save(prefix)
    load = ac.Checkpoint()
    load.restore(path)
    first = f32(0.0)
    load.v = first
    assert first.numpy() == 4.0
    replacement = f32(9.0)
    load.v = replacement
    assert replacement.numpy() == 9.0


# ---------------------------------------------------------------- E33 restore-on-create


def test_e33_add_variable_takes_checkpoint_value_without_calling_initializer(prefix):
    path = ac.Checkpoint(v=f32(3.0)).save(prefix)
    load = ac.Checkpoint()
    load.restore(path)
    calls = []

    def initializer(shape, dtype):
        calls.append((shape, dtype))
        return np.zeros(shape, dtype)

    v = ac.add_variable(load, "v", shape=[], initializer=initializer)
    assert v.numpy() == 3.0
    assert calls == []


def test_e33_add_variable_without_pending_restore_uses_initializer():
    obj = ac.AutoTrackable()
    v = ac.add_variable(obj, "v", shape=[2], initializer=lambda shape, dtype: np.full(shape, 7.0, dtype))
    np.testing.assert_array_equal(v.numpy(), [7.0, 7.0])
    assert np.dtype(v.dtype) == np.float32


def test_e33_restore_on_create_in_nested_object(prefix):
    saver = ac.Checkpoint()
    saver.dep = Dependency()
    saver.dep.build()
    saver.dep.var.assign(12.0)
    path = saver.save(prefix)
    load = ac.Checkpoint()
    status = load.restore(path)
    load.dep = Dependency()
    load.dep.build()
    assert load.dep.var.numpy() == 12.0
    status.assert_consumed()


def test_e33_restore_on_create_keeps_declared_trainable(prefix):
    path = ac.Checkpoint(v=f32(3.0)).save(prefix)
    load = ac.Checkpoint()
    load.restore(path)
    v = ac.add_variable(load, "v", initializer=0.0, trainable=False)
    assert v.numpy() == 3.0
    assert v.trainable is False


# ---------------------------------------------------------------- E34 last restore wins


def _save_two(tmp_path):
    save_root = ac.Checkpoint()
    save_root.dep = ac.AutoTrackable()
    save_root.dep.var = ac.add_variable(save_root.dep, name="var", initializer=0.0)
    save_root.dep.var.assign(12.0)
    first = save_root.save(str(tmp_path / "first"))
    save_root.dep.var.assign(13.0)
    second = save_root.save(str(tmp_path / "second"))
    return first, second


def _load_dep():
    load_dep = ac.AutoTrackable()
    load_dep.var = ac.add_variable(load_dep, name="var", shape=[])
    return load_dep


def test_e34_overlapping_restores_later_attach_of_later_restore(tmp_path):
    first_path, second_path = _save_two(tmp_path)
    first_root, second_root = ac.Checkpoint(), ac.Checkpoint()
    first_status = first_root.restore(first_path)
    second_status = second_root.restore(second_path)
    load_dep = _load_dep()
    first_root.dep = load_dep
    first_status.assert_consumed()
    assert load_dep.var.numpy() == 12.0
    second_root.dep = load_dep
    second_status.assert_consumed()
    assert load_dep.var.numpy() == 13.0


def test_e34_overlapping_restores_last_call_wins_regardless_of_attach(tmp_path):
    first_path, second_path = _save_two(tmp_path)
    first_root, second_root = ac.Checkpoint(), ac.Checkpoint()
    second_status = second_root.restore(second_path)
    first_status = first_root.restore(first_path)
    load_dep = _load_dep()
    first_root.dep = load_dep
    first_status.assert_consumed()
    assert load_dep.var.numpy() == 12.0
    second_root.dep = load_dep
    second_status.assert_consumed()
    assert load_dep.var.numpy() == 12.0


def test_e34_two_restores_on_one_root_later_value_used(tmp_path):
    first_path, second_path = _save_two(tmp_path)
    root = ac.Checkpoint()
    root.restore(second_path)
    root.restore(first_path)
    root.dep = _load_dep()
    assert root.dep.var.numpy() == 12.0


# ---------------------------------------------------------------- E35 cycles


def test_e35_dependency_loop_deferred_and_immediate(prefix):
    first, second = ac.Checkpoint(), ac.Checkpoint()
    first.second = second
    second.first = first
    first.v = ac.add_variable(first, "v1", initializer=[3.0, 1.0, 4.0])
    second.v = ac.add_variable(second, "v2", initializer=[1.0, 1.0, 2.0, 3.0])
    path = first.save(prefix)

    first_load = ac.Checkpoint()
    status = first_load.restore(path)
    second_load = ac.AutoTrackable()
    first_load.second = second_load
    second_load.first = first_load
    with pytest.raises(AssertionError):
        status.assert_consumed()
    first_load.v = ac.add_variable(first_load, "v1", shape=[3])
    second_load.v = ac.add_variable(second_load, "v2", shape=[4])
    status.assert_consumed()
    np.testing.assert_array_equal(first_load.v.numpy(), [3.0, 1.0, 4.0])
    np.testing.assert_array_equal(second_load.v.numpy(), [1.0, 1.0, 2.0, 3.0])

    first_load.v.assign([2.0, 7.0, 1.0])
    second_load.v.assign([2.0, 7.0, 1.0, 8.0])
    first_load.restore(path).assert_consumed()
    np.testing.assert_array_equal(first_load.v.numpy(), [3.0, 1.0, 4.0])
    np.testing.assert_array_equal(second_load.v.numpy(), [1.0, 1.0, 2.0, 3.0])


def test_e35_tuple_loop_in_module(prefix):
    m = ac.Module()
    m.s = (m,)
    m.v = f32(2.0)
    path = ac.Checkpoint(m=m).save(prefix)
    m2 = ac.Module()
    m2.s = (m2,)
    m2.v = f32(0.0)
    ac.Checkpoint(m=m2).restore(path).assert_consumed()
    assert m2.v.numpy() == 2.0


# ---------------------------------------------------------------- E36 no reference cycles


def test_e36_deleting_checkpoint_and_status_frees_objects(prefix):
    deleted = []

    class TrackableWithDel(ac.AutoTrackable):
        def __del__(self):
            deleted.append(True)

    with no_cycle_collector():
        x = ac.AutoTrackable()
        x.v = f32(100.0)
        x.has_del = TrackableWithDel()
        checkpoint = ac.Checkpoint(x)
        path = checkpoint.save(prefix)
        del checkpoint, x
        assert len(deleted) == 1

        no_v = ac.AutoTrackable()
        no_v.has_del = TrackableWithDel()
        checkpoint = ac.Checkpoint(no_v)
        checkpoint.restore(path).expect_partial()
        del checkpoint, no_v
        assert len(deleted) == 2


def test_e36_partial_restore_root_is_freed(prefix):
    path = ac.Checkpoint(v1=f32(2.0), v2=f32(3.0)).save(prefix)
    with no_cycle_collector():
        partial = ac.Checkpoint(v1=f32(0.0))
        weak_root, weak_v1 = weakref.ref(partial), weakref.ref(partial.v1)
        partial.restore(path).expect_partial()
        assert partial.v1.numpy() == 2.0
        del partial
        assert weak_root() is None
        assert weak_v1() is None


def test_e36_pending_deferred_restore_does_not_form_a_cycle(prefix):
    # The root's deferred queue refers to the coordinator, so the coordinator must hold the root weakly.
    path = ac.Checkpoint(v=f32(2.0), w=f32(3.0)).save(prefix)
    with no_cycle_collector():
        load = ac.Checkpoint(v=f32(0.0))
        weak_load = weakref.ref(load)
        status = load.restore(path).expect_partial()
        del load, status
        assert weak_load() is None
