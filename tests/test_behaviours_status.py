"""Behaviours F (load-status objects and the partial-restore warning).

Ideas ported from TensorFlow's ``checkpoint_test.py`` (testLateDependencyTracking,
testPartialRestoreWarningAttribute, testSilencePartialWarning, testAssertConsumedNoCheckpoint) and
r2.x ``util_test.py::testPartialRestoreWarningObject``; numbers refer to ``behaviours.md``.
"""

from __future__ import annotations

import gc
import logging
import re

import numpy as np
import pytest

import asyncckpt as ac

SILENCE_HINT = "To silence these warnings, use `status.expect_partial()`"


def f32(value):
    return ac.Variable(value, dtype=np.float32)


def warnings_text(caplog):
    return "\n".join(
        r.getMessage() for r in caplog.records if r.name.startswith("asyncckpt") and r.levelno >= logging.WARNING
    )


@pytest.fixture
def two_var_path(prefix):
    return ac.Checkpoint(v1=f32(2.0), v2=f32(3.0)).save(prefix)


# ---------------------------------------------------------------- F37 assertions


@pytest.mark.parametrize(
    "method", ["assert_consumed", "assert_existing_objects_matched", "assert_nontrivial_match", "expect_partial"]
)
def test_f37_status_methods_return_self(two_var_path, method):
    status = ac.Checkpoint(v1=f32(0.0), v2=f32(0.0)).restore(two_var_path)
    assert getattr(status, method)() is status


def test_f37_full_match_passes_every_assertion(two_var_path):
    load = ac.Checkpoint(v1=f32(0.0), v2=f32(0.0))
    load.restore(two_var_path).assert_consumed().assert_existing_objects_matched().assert_nontrivial_match()
    assert (load.v1.numpy(), load.v2.numpy()) == (2.0, 3.0)


@pytest.mark.parametrize("method", ["run_restore_ops", "initialize_or_restore"])
def test_f37_graph_mode_methods_are_noops(two_var_path, method):
    load = ac.Checkpoint(v1=f32(0.0), v2=f32(0.0))
    status = load.restore(two_var_path)
    load.v1.assign(9.0)
    getattr(status, method)()
    assert load.v1.numpy() == 9.0


def test_f37_existing_objects_matched_passes_with_extra_checkpoint_objects(two_var_path):
    ac.Checkpoint(v1=f32(0.0)).restore(two_var_path).assert_existing_objects_matched()


@pytest.mark.parametrize("extra", [1, 2])
def test_f37_existing_objects_matched_counts_unbound_objects(two_var_path, extra):
    load = ac.Checkpoint(v1=f32(0.0), v2=f32(0.0))
    for i in range(extra):
        setattr(load, f"extra{i}", f32(0.0))
    status = load.restore(two_var_path)
    fragment = f"Found {extra} Python objects that were not bound to checkpointed values"
    with pytest.raises(AssertionError, match=re.escape(fragment)):
        status.assert_existing_objects_matched()


def test_f37_existing_objects_matched_fails_for_nested_unbound_variable(two_var_path):
    load = ac.Checkpoint(v1=f32(0.0), v2=f32(0.0))
    load.model = ac.AutoTrackable()
    load.model.kernel = f32(0.0)
    status = load.restore(two_var_path)
    with pytest.raises(AssertionError, match="not bound to checkpointed values"):
        status.assert_existing_objects_matched()


def test_f37_consumed_fails_for_unresolved_checkpoint_node(two_var_path):
    status = ac.Checkpoint(v1=f32(0.0)).restore(two_var_path)
    with pytest.raises(AssertionError, match=re.escape("Unresolved object in checkpoint (root).v2")):
        status.assert_consumed()


def test_f37_consumed_includes_existing_objects_check(two_var_path):
    status = ac.Checkpoint(v1=f32(0.0), v2=f32(0.0), extra=f32(0.0)).restore(two_var_path)
    with pytest.raises(AssertionError, match="not bound to checkpointed values"):
        status.assert_consumed()


def test_f37_nontrivial_match_nothing_except_root(prefix):
    path = ac.Checkpoint(v=f32(1.0)).write(prefix)
    status = ac.Checkpoint(other=f32(0.0)).read(path)
    with pytest.raises(AssertionError, match=re.escape("Nothing except the root object matched a checkpointed value.")):
        status.assert_nontrivial_match()


def test_f37_nontrivial_match_nothing_to_load(prefix):
    path = ac.Checkpoint(v=f32(1.0)).write(prefix)
    status = ac.Checkpoint().read(path)
    with pytest.raises(AssertionError, match=re.escape("Nothing to load. No dependencies have been added to")):
        status.assert_nontrivial_match()


def test_f37_nontrivial_match_satisfied_by_restored_save_counter(two_var_path):
    ac.Checkpoint(other=f32(0.0)).restore(two_var_path).assert_nontrivial_match()


def test_f37_expect_partial_does_not_change_assertions(two_var_path):
    status = ac.Checkpoint(v1=f32(0.0)).restore(two_var_path).expect_partial()
    with pytest.raises(AssertionError, match=re.escape("Unresolved object in checkpoint (root).v2")):
        status.assert_consumed()


def test_f37_assertions_reevaluated_when_objects_created(two_var_path):
    load = ac.Checkpoint(v1=f32(0.0))
    status = load.restore(two_var_path)
    with pytest.raises(AssertionError):
        status.assert_consumed()
    load.v2 = f32(0.0)
    status.assert_consumed()
    assert load.v2.numpy() == 3.0


def test_f37_status_outlives_checkpoint(prefix):
    v = f32(0.0)
    ckpt = ac.Checkpoint(v=v)
    path = ckpt.save(prefix)
    status = ckpt.restore(path)
    del ckpt
    status.assert_consumed()


# ---------------------------------------------------------------- F38 teardown warning


def test_f38_teardown_warning_names_unused_attribute(two_var_path, ac_log):
    partial = ac.Checkpoint(v1=ac.Trackable(), v2=f32(0.0))
    partial.restore(two_var_path)
    assert partial.v2.numpy() == 3.0
    del partial
    gc.collect()
    text = warnings_text(ac_log)
    assert "(root).v1" in text
    assert "(root).v2" not in text
    assert "expect_partial()" in text


def test_f38_teardown_warning_names_unresolved_checkpoint_value(two_var_path, ac_log):
    partial = ac.Checkpoint(v1=f32(0.0))
    status = partial.restore(two_var_path)
    del partial, status
    gc.collect()
    text = warnings_text(ac_log)
    assert SILENCE_HINT in text
    assert "Value in checkpoint could not be found in the restored object: (root).v2" in text
    assert "(root).v1" not in text


def test_f38_expect_partial_silences_teardown_warning(two_var_path, ac_log):
    partial = ac.Checkpoint(v1=f32(0.0))
    partial.restore(two_var_path).expect_partial()
    assert partial.v1.numpy() == 2.0
    del partial
    gc.collect()
    assert SILENCE_HINT not in warnings_text(ac_log)
    assert "(root).v2" not in warnings_text(ac_log)


def test_f38_no_teardown_warning_after_full_restore(two_var_path, ac_log):
    full = ac.Checkpoint(v1=f32(0.0), v2=f32(0.0))
    full.restore(two_var_path).assert_consumed()
    del full
    gc.collect()
    assert SILENCE_HINT not in warnings_text(ac_log)


def test_f38_no_teardown_warning_once_late_objects_attached(two_var_path, ac_log):
    load = ac.Checkpoint(v1=f32(0.0))
    status = load.restore(two_var_path)
    load.v2 = f32(0.0)
    del load, status
    gc.collect()
    assert SILENCE_HINT not in warnings_text(ac_log)
