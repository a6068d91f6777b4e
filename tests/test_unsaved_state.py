"""Arrays assigned to attributes are not saved (TensorFlow's rule), and a save says so once per attribute.

The warning goes to the ``asyncckpt`` logger at WARNING, names the attribute by its path from the
root and what to wrap it in, and is logged when the object graph is built: a repeat save of an
unchanged program reuses the cached graph and does not look again.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import graph


@pytest.fixture
def warnings_logged(caplog):
    caplog.set_level(logging.WARNING, logger="asyncckpt")

    def messages() -> list[str]:
        found = [record.getMessage() for record in caplog.records if "checkpoints do not save" in record.getMessage()]
        caplog.clear()
        return found

    return messages


def _model() -> ac.Module:
    model = ac.Module()
    model.kernel = ac.Variable(np.zeros(3, np.float32))
    model.cache = np.zeros(3)
    model.stats = {"mean": np.zeros(2), "count": ac.Variable(1.0)}
    model.history = [np.zeros(1), ac.Variable(2.0)]
    model.pair = (np.zeros(1), 3)
    model.mask = ac.NoDependency(np.ones(4))
    model.units = 10
    return model


def test_an_unsaved_array_is_named_once_with_what_to_wrap_it_in(tmp_path, warnings_logged):
    checkpoint = ac.Checkpoint(model=_model())
    checkpoint.save(str(tmp_path / "ckpt"))
    messages = warnings_logged()
    assert sorted(message.split(" holds ")[0] for message in messages) == [
        "(root).model.cache", "(root).model.history[0]", "(root).model.pair", "(root).model.stats['mean']",
    ]
    assert all("Wrap it in asyncckpt.Variable to save it" in message for message in messages)
    assert all("asyncckpt.NoDependency(value)" in message and "PythonState" in message for message in messages)
    checkpoint.save(str(tmp_path / "ckpt"))
    assert warnings_logged() == []


def test_each_attribute_is_named_once_even_when_the_graph_changes(tmp_path, warnings_logged):
    model = _model()
    checkpoint = ac.Checkpoint(model=model)
    checkpoint.save(str(tmp_path / "ckpt"))
    warnings_logged()
    model.bias = ac.Variable(np.zeros(3, np.float32))  # the graph is built again
    model.moments = np.zeros(3)
    checkpoint.save(str(tmp_path / "ckpt"))
    assert [message.split(" holds ")[0] for message in warnings_logged()] == ["(root).model.moments"]


def test_saved_and_silenced_state_is_not_named(tmp_path, warnings_logged):
    class Saved(ac.AutoTrackable):
        def __init__(self):
            self.value = np.arange(3.0)

        def _serialize_to_tensors(self):
            return {"value": self.value}

        def _restore_from_tensors(self, tensors):
            self.value = tensors["value"]

    class Counter(ac.PythonState):
        def __init__(self):
            self.counts = np.zeros(2)

        def serialize(self):
            return repr(self.counts.tolist())

        def deserialize(self, string_value):
            pass

    root = ac.AutoTrackable()
    root.saved = Saved()
    root.counter = Counter()
    root.quiet = ac.NoDependency({"a": np.zeros(1)})
    root.variable = ac.Variable(np.zeros(2))
    ac.Checkpoint(root=root).write(str(tmp_path / "ckpt"))
    assert warnings_logged() == []


def test_a_repeat_save_does_not_look_again(tmp_path, monkeypatch, warnings_logged):
    looked = []
    original = graph._unsaved_values
    monkeypatch.setattr(graph, "_unsaved_values", lambda obj: (looked.append(obj), original(obj))[1])
    checkpoint = ac.Checkpoint(model=_model())
    checkpoint.save(str(tmp_path / "ckpt"))
    assert looked
    looked.clear()
    for _ in range(3):
        checkpoint.save(str(tmp_path / "ckpt"))
    assert looked == []
