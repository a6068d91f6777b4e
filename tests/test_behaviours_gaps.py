"""Behaviours the section suites leave out because they need a lower-level entry point."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

import asyncckpt as ac


def test_i42_timestamps_must_match_paths(tmp_path):
    directory = str(tmp_path)
    with pytest.raises(ValueError, match="timestamps"):
        ac.update_checkpoint_state(
            directory,
            os.path.join(directory, "ckpt-2"),
            all_model_checkpoint_paths=[os.path.join(directory, "ckpt-1"), os.path.join(directory, "ckpt-2")],
            all_model_checkpoint_timestamps=[1.0],
        )


def test_i42_model_path_is_appended_to_all_paths_when_missing(tmp_path):
    directory = str(tmp_path)
    ac.update_checkpoint_state(
        directory, os.path.join(directory, "ckpt-2"), all_model_checkpoint_paths=[os.path.join(directory, "ckpt-1")]
    )
    state = ac.get_checkpoint_state(directory)
    assert state.all_model_checkpoint_paths == [os.path.join(directory, "ckpt-1"), os.path.join(directory, "ckpt-2")]
    assert state.model_checkpoint_path == os.path.join(directory, "ckpt-2")


def test_i44_save_path_equal_to_state_file_is_refused(tmp_path):
    directory = str(tmp_path)
    with pytest.raises(RuntimeError, match="conflicts with path used for checkpoint state"):
        ac.update_checkpoint_state(directory, os.path.join(directory, "checkpoint"))


def test_k53_deprecated_async_alias_enables_async_and_warns(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="asyncckpt")
    options = ac.CheckpointOptions(experimental_enable_async_checkpoint=True, experimental_io_device="/job:localhost")
    assert options.enable_async
    assert "deprecated" in caplog.text
    variable = ac.Variable(np.arange(3.0))
    checkpoint = ac.Checkpoint(v=variable)
    path = checkpoint.save(tmp_path / "ckpt", options=options)
    checkpoint.sync()
    restored = ac.Variable(np.zeros(3))
    ac.Checkpoint(v=restored).restore(path).assert_consumed()
    np.testing.assert_array_equal(restored.numpy(), variable.numpy())


def test_d25_missing_checkpoint_message_suggests_the_suffix(tmp_path):
    with pytest.raises(ac.NotFoundError, match=r"You may be missing the checkpoint suffix \(e.g. the '-1'"):
        ac.Checkpoint(v=ac.Variable(1.0)).restore(str(tmp_path / "ckpt"))


def test_c18_options_object_is_copied_not_mutated(tmp_path):
    calls = []
    options = ac.CheckpointOptions(experimental_write_callbacks=[lambda: calls.append(1)])
    checkpoint = ac.Checkpoint(v=ac.Variable(1.0))
    checkpoint.save(tmp_path / "ckpt", options=options)
    checkpoint.save(tmp_path / "ckpt", options=options)
    assert len(options.experimental_write_callbacks) == 1  # the state-file updater was not appended
    assert calls == [1, 1]
