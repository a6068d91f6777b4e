"""The graph cache: a save of an unchanged program reuses the last graph and layout, and any change
of structure is seen -- the bytes on disk are always those an uncached save writes.

Each test makes one kind of change between two saves of the same ``Checkpoint`` and compares the
second save with a save by a brand-new ``Checkpoint`` (which has no cache) of the same objects.
"""

from __future__ import annotations

import gc
import json
import os
import weakref
from pathlib import Path

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import io as ckio
from asyncckpt.graph import GraphCache, GraphView
from asyncckpt.model.trackable import TrackableReference, structure_version

MANIFEST_FIELDS = ("object_graph", "tensors")


class Notes(ac.PythonState):
    def __init__(self, text: str = "") -> None:
        super().__init__()
        self.text = text
        self.serialize_calls = 0

    def serialize(self) -> bytes:
        self.serialize_calls += 1
        return self.text.encode()

    def deserialize(self, value: bytes) -> None:
        self.text = value.decode()


class Computed(ac.AutoTrackable):
    """Values computed at save time, with a set of attributes that can change."""

    def __init__(self) -> None:
        self.names = ["a"]
        self.calls = 0

    def _serialize_to_tensors(self):
        self.calls += 1
        return {name: np.full(3, len(name), np.int32) for name in self.names}


def _model():
    model = ac.Module()
    model.dense = ac.Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
    model.layers = [ac.Variable(np.ones(4, np.float64)), ac.Variable(np.zeros(2, np.int64))]
    model.table = {"embedding": ac.Variable(np.full(5, 2.5, np.float32))}
    optimizer = ac.optimizers.Adam(0.1)
    notes = Notes("first")
    checkpoint = ac.Checkpoint(model=model, optimizer=optimizer, notes=notes)
    return model, optimizer, notes, checkpoint


def _files(prefix: Path) -> dict[str, bytes]:
    """The manifest fields that do not name the data directory, and every data file's bytes."""
    manifest = json.loads((prefix.parent / f"{prefix.name}.index").read_bytes())
    data_dir = prefix.parent / manifest["data_dir"]
    found = {field: json.dumps(manifest[field], sort_keys=True).encode() for field in MANIFEST_FIELDS}
    for name in sorted(os.listdir(data_dir)):
        found[name] = (data_dir / name).read_bytes()
    return found


def _same_as_uncached(checkpoint: ac.Checkpoint, tmp_path: Path, name: str, **objects) -> None:
    """Save through ``checkpoint`` (cached) and a new Checkpoint of ``objects``; compare the files."""
    cached = Path(checkpoint.write(tmp_path / f"{name}-cached"))
    fresh = Path(ac.Checkpoint(**objects).write(tmp_path / f"{name}-fresh"))
    assert _files(cached) == _files(fresh)


def _objects(model, optimizer, notes, checkpoint):
    return {"model": model, "optimizer": optimizer, "notes": notes}  # write() creates no save_counter


def _train(model, optimizer):
    optimizer.apply_gradients([(np.ones((2, 3), np.float32), model.dense)])


# ---------------------------------------------------------------------------------------------
# Reuse


def test_an_unchanged_graph_is_reused_and_computed_values_are_taken_fresh():
    root = ac.AutoTrackable()
    root.v = ac.Variable(np.zeros(3))
    root.notes = Notes("one")
    cache = GraphCache()
    view = GraphView(weakref.ref(root))
    first, values = cache.serialize(view)
    assert values is None  # built
    root.notes.text = "two"
    second, values = cache.serialize(view)
    assert second is first  # reused: no walk
    index = [key for key, _ in first.entries].index("notes/.ATTRIBUTES/py_state")
    assert values == {index: b"two"}
    assert root.notes.serialize_calls == 2  # once per save
    root.w = ac.Variable(np.ones(1))
    third, values = cache.serialize(view)
    assert third is not first and values is None
    assert "w/.ATTRIBUTES/VARIABLE_VALUE" in [key for key, _ in third.entries]


def test_saves_of_an_unchanged_program_match_uncached_saves_across_training(tmp_path):
    model, optimizer, notes, checkpoint = _model()
    _train(model, optimizer)
    for step in range(3):
        checkpoint.write(tmp_path / f"warm-{step}")
        _train(model, optimizer)
        notes.text = "x" * (step * 7)  # the Python state changes size: the layout must follow
        _same_as_uncached(checkpoint, tmp_path, f"step-{step}", **_objects(model, optimizer, notes, checkpoint))


def _children_asked_by_write(model, checkpoint, path) -> list:
    """The objects whose children ``checkpoint.write(path)`` asks for (of ``model.layers``' type)."""
    calls = []
    original = type(model.layers)._trackable_children

    def counting(self):
        calls.append(self)
        return original(self)

    type(model.layers)._trackable_children = counting
    try:
        checkpoint.write(path)
    finally:
        type(model.layers)._trackable_children = original
    return calls


def test_the_cached_stall_does_not_walk_the_graph(tmp_path):
    model, optimizer, notes, checkpoint = _model()
    checkpoint.write(tmp_path / "first")
    # only the list is asked again (it can change behind our back)
    assert _children_asked_by_write(model, checkpoint, tmp_path / "second") == [model.layers]


# ---------------------------------------------------------------------------------------------
# Every structural change is seen


def _add_variable(model, optimizer, notes):
    model.extra = ac.Variable(np.full(2, 7.0))


def _delete_attribute(model, optimizer, notes):
    del model.dense


def _overwrite_attribute(model, optimizer, notes):
    model.dense = ac.Variable(np.zeros((4, 4), np.float32))


def _append_to_list(model, optimizer, notes):
    model.layers.append(ac.Variable(np.full(3, 9, np.int16)))


def _set_and_delete_dict_items(model, optimizer, notes):
    model.table["more"] = ac.Variable(np.ones(1, np.float32))
    del model.table["embedding"]


def _create_slots(model, optimizer, notes):
    optimizer.apply_gradients([(np.ones(4), model.layers[0])])  # new m and v slots for layers[0]


def _nest_a_module(model, optimizer, notes):
    inner = ac.Module()
    inner.w = ac.Variable(np.ones(2))
    model.inner = inner
    inner.b = ac.Variable(np.zeros(1))  # a change below an attribute added earlier


@pytest.mark.parametrize(
    "change",
    [_add_variable, _delete_attribute, _overwrite_attribute, _append_to_list, _set_and_delete_dict_items,
     _create_slots, _nest_a_module],
)
def test_a_structural_change_between_saves_is_saved_as_an_uncached_save_would(tmp_path, change):
    model, optimizer, notes, checkpoint = _model()
    _train(model, optimizer)
    checkpoint.write(tmp_path / "before")
    version = structure_version()
    change(model, optimizer, notes)
    assert structure_version() != version
    _same_as_uncached(checkpoint, tmp_path, "after", **_objects(model, optimizer, notes, checkpoint))


def test_a_list_changed_behind_its_wrappers_back_still_fails_the_save(tmp_path):
    model = ac.Module()
    plain = [ac.Variable(np.zeros(1))]
    model.layers = plain
    checkpoint = ac.Checkpoint(model=model)
    checkpoint.write(tmp_path / "first")
    plain.append(ac.Variable(np.ones(1)))  # the wrapper is not told: no structure change recorded
    with pytest.raises(ValueError, match="modified outside the wrapper"):
        checkpoint.write(tmp_path / "second")


def test_a_replaced_list_element_still_fails_the_save(tmp_path):
    model = ac.Module()
    model.layers = [ac.Variable(np.zeros(1))]
    checkpoint = ac.Checkpoint(model=model)
    checkpoint.write(tmp_path / "first")
    model.layers[0] = ac.Variable(np.ones(1))
    with pytest.raises(ValueError, match="append-only"):
        checkpoint.write(tmp_path / "second")


def test_computed_attributes_that_change_rebuild_the_graph_and_are_computed_once_per_save(tmp_path):
    computed = Computed()
    checkpoint = ac.Checkpoint(computed=computed)
    checkpoint.write(tmp_path / "first")
    computed.names = ["a", "bb"]
    calls = computed.calls
    _same_as_uncached(checkpoint, tmp_path, "second", computed=computed)
    assert computed.calls == calls + 2  # one per save: the cached save did not ask twice


class ThirdPartyOptimizer(ac.AutoTrackable):
    """Slots that appear without any structure change being recorded."""

    def __init__(self) -> None:
        self.slots = ac.NoDependency({})  # slots are not dependencies

    def get_slot_names(self):
        return ["accumulator"]

    def get_slot(self, variable, name):
        return self.slots.get(id(variable))


def test_a_third_party_slot_provider_disables_the_cache(tmp_path):
    variable = ac.Variable(np.ones(3))
    optimizer = ThirdPartyOptimizer()
    checkpoint = ac.Checkpoint(v=variable, optimizer=optimizer)
    checkpoint.write(tmp_path / "first")
    version = structure_version()
    optimizer.slots[id(variable)] = ac.Variable(np.full(3, 4.0))
    assert structure_version() == version  # nobody said anything
    path = checkpoint.write(tmp_path / "second")
    reader = ckio.open_reader(path)
    assert "v/.OPTIMIZER_SLOT/optimizer/accumulator/.ATTRIBUTES/VARIABLE_VALUE" in reader.keys()


def test_a_weakly_attached_object_that_dies_is_dropped_from_the_next_graph():
    root = ac.AutoTrackable()
    root.v = ac.Variable(np.zeros(2))
    extra = ac.AutoTrackable()
    extra.w = ac.Variable(np.ones(2))
    view = GraphView(weakref.ref(root), (TrackableReference("extra", weakref.ref(extra)),))
    cache = GraphCache()
    first, _ = cache.serialize(view)
    assert "extra/w/.ATTRIBUTES/VARIABLE_VALUE" in [key for key, _ in first.entries]
    assert cache.serialize(view)[0] is first
    weak_extra = weakref.ref(extra)
    del extra
    gc.collect()
    assert weak_extra() is None  # the cache does not keep it alive
    second, values = cache.serialize(view)
    assert values is None and [key for key, _ in second.entries] == ["v/.ATTRIBUTES/VARIABLE_VALUE"]


def test_the_cache_does_not_keep_a_weak_root_or_its_variables_alive(tmp_path):
    root = ac.AutoTrackable()
    root.v = ac.Variable(np.zeros(1000))
    checkpoint = ac.Checkpoint(root=weakref.ref(root))
    checkpoint.write(tmp_path / "a")
    checkpoint.write(tmp_path / "b")  # served from the cache
    weak_root, weak_v = weakref.ref(root), weakref.ref(root.v)
    del root
    gc.collect()
    assert weak_root() is None and weak_v() is None
    with pytest.raises(ValueError, match="garbage-collected"):
        checkpoint.write(tmp_path / "c")


# ---------------------------------------------------------------------------------------------
# The statistics hook


def test_the_metrics_callback_receives_each_writes_statistics(tmp_path):
    received = []
    variables = {f"v{i}": ac.Variable(np.full(1000, i, np.float64)) for i in range(3)}
    checkpoint = ac.Checkpoint(**variables)
    options = ac.CheckpointOptions(enable_async=True, experimental_metrics_callback=received.append)
    path = checkpoint.save(tmp_path / "ckpt", options=options)
    checkpoint.sync()
    (stats,) = received
    assert isinstance(stats, ckio.WriteStats)
    assert stats.path == path and stats.error is None
    assert stats.tensors == 4  # three variables and save_counter
    assert stats.bytes_written == 3 * 8000 + 8
    assert stats.files_written >= 1
    assert 0 <= stats.snapshot_seconds <= stats.total_seconds
    assert 0 <= stats.write_seconds <= stats.total_seconds and stats.commit_seconds > 0
    with pytest.raises(AttributeError):
        stats.bytes_written = 0  # frozen


def test_the_metrics_callback_reports_a_failed_write_and_its_own_errors_are_only_logged(tmp_path, caplog):
    received = []

    def broken(stats):
        received.append(stats)
        raise RuntimeError("dashboard down")

    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")
    checkpoint = ac.Checkpoint(v=ac.Variable(np.zeros(2)))
    with pytest.raises(OSError):
        checkpoint.write(blocker / "ckpt", options=ac.CheckpointOptions(experimental_metrics_callback=broken))
    assert isinstance(received[0].error, OSError)
    path = checkpoint.write(tmp_path / "ok", options=ac.CheckpointOptions(experimental_metrics_callback=broken))
    assert received[1].error is None and received[1].path == path
    assert "dashboard down" in caplog.text


def test_a_metrics_callback_must_be_callable():
    with pytest.raises(TypeError, match="callable"):
        ac.CheckpointOptions(experimental_metrics_callback=3)


def test_the_cached_layout_keeps_no_computed_value_alive_between_saves(tmp_path):
    """A state_dict's arrays (copied by each save) and a PythonState's bytes are not held after the save."""
    import gc
    import weakref

    class Holder:
        def __init__(self):
            self.refs = []

        def state_dict(self):
            array = np.arange(1000.0)
            self.refs.append(weakref.ref(array))
            return {"a": array}

        def load_state_dict(self, state):
            pass

    holder = Holder()
    checkpoint = ac.Checkpoint(holder=holder, v=ac.Variable(1.0))
    for _ in range(3):
        checkpoint.save(tmp_path / "ckpt")
    gc.collect()
    assert all(ref() is None for ref in holder.refs)


def test_new_write_settings_on_a_cached_graph_still_write_the_fresh_computed_values(tmp_path):
    class Text(ac.PythonState):
        def __init__(self):
            self.text = "first"

        def serialize(self):
            return self.text

        def deserialize(self, value):
            self.text = value.decode()

    state = Text()
    checkpoint = ac.Checkpoint(state=state)
    checkpoint.save(tmp_path / "ckpt")
    state.text = "second"
    other = ac.CheckpointOptions(write_settings=ac.WriteSettings(chunk_bytes=1 << 20))
    path = checkpoint.save(tmp_path / "ckpt", options=other)
    restored = Text()
    ac.Checkpoint(state=restored).restore(path)
    assert restored.text == "second"


def test_building_other_objects_between_saves_keeps_the_cached_graph(tmp_path):
    model, optimizer, notes, checkpoint = _model()
    checkpoint.write(tmp_path / "first")
    version = structure_version()
    # a restore target built between saves (as an evaluation run does): none of it is in the cached graph
    other = ac.Checkpoint(model=_model()[0], extra=[ac.Variable(np.zeros(2))])
    other.extra.append(ac.Variable(np.ones(2)))
    assert structure_version() == version
    # the cached graph was reused: no walk
    assert _children_asked_by_write(model, checkpoint, tmp_path / "second") == [model.layers]
    model.extra_weights = ac.Variable(np.ones(3))  # a change of a walked object is still seen
    assert structure_version() != version
