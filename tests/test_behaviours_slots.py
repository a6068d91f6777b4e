"""Behaviours G (optimizer slot variables), through the slot protocol of Appendix C only.

The optimizer below is a test double: it implements ``get_slot_names``/``get_slot``/
``_create_or_restore_slot_variable`` and nothing else, so these tests do not depend on the real
optimizers. Ideas ported from TensorFlow's ``checkpoint_with_v1_optimizers_test.py``
(testDeferredSlotRestoration, testSkipSlotVarRestore) and r2.x ``util_test.py``
(testNamingWithOptimizer, testSaveRestore); numbers refer to ``behaviours.md``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import asyncckpt as ac

VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"


def f32(value):
    return ac.Variable(value, dtype=np.float32)


def keys(path):
    return [key for key, _ in ac.list_variables(path)]


class SlotOptimizer(ac.Trackable):
    """Keeps one slot per (variable, slot name) in a plain dict; ``iterations`` is non-slot state."""

    def __init__(self, slot_names=("m",)):
        super().__init__()
        self._slot_names = tuple(slot_names)
        self._slots = {}  # (id(variable), name) -> (variable, slot); not a dependency
        self.restore_calls = []

    def get_slot_names(self):
        return list(self._slot_names)

    def _lookup(self, var, name):
        return self._slots.get((id(var), name), (None, None))[1]

    def get_slot(self, var, name):
        return self._lookup(var, name)

    def _add_slot(self, var, name):
        slot = ac.Variable(np.zeros(var.shape, dtype=var.dtype), dtype=var.dtype, trainable=False)
        self._slots[(id(var), name)] = (var, slot)
        return slot

    def _create_or_restore_slot_variable(self, slot_variable_position, slot_name, variable):
        self.restore_calls.append((slot_name, variable))
        slot = self._lookup(variable, slot_name)
        if slot is None:
            slot = self._add_slot(variable, slot_name)
        slot_variable_position.restore(slot)

    def create_slots(self, var_list):
        for var in var_list:
            for name in self._slot_names:
                if self._lookup(var, name) is None:
                    self._add_slot(var, name)

    def build(self):
        """Create the non-slot state (like Adam's ``beta1_power`` or Keras' ``iter``)."""
        if not hasattr(self, "iterations"):
            self.iterations = ac.add_variable(self, "iterations", initializer=0, dtype=np.int64)

    def minimize(self, var_list):
        self.build()
        self.create_slots(var_list)
        for var in var_list:
            for name in self._slot_names:
                slot = self.get_slot(var, name)
                slot.assign(slot.numpy() + 1)
        self.iterations.assign(self.iterations.numpy() + 1)


def trained_root(slot_names=("m",), build=True):
    root = ac.Checkpoint()
    root.var = ac.add_variable(root, name="var", initializer=0.0)
    root.optimizer = SlotOptimizer(slot_names)
    if build:
        root.optimizer.build()
    root.optimizer.create_slots([root.var])
    root.var.assign(12.0)
    root.optimizer.get_slot(root.var, "m").assign(14.0)
    return root


def slot_key(var_path, slot, opt_path="optimizer"):
    return f"{var_path}/.OPTIMIZER_SLOT/{opt_path}/{slot}{VALUE}"


def node_of(meta, name):
    return {c["local_name"]: c["node_id"] for c in meta["nodes"][0]["children"]}[name]


# ---------------------------------------------------------------- G39 slot serialisation


def test_g39_slot_key_names_variable_optimizer_and_slot(prefix):
    path = trained_root().save(prefix)
    assert ac.load_variable(path, slot_key("var", "m")) == 14.0


def test_g39_full_key_listing(prefix):
    path = trained_root(slot_names=("m", "v")).save(prefix)
    assert keys(path) == [
        "_CHECKPOINTABLE_OBJECT_GRAPH",
        "optimizer/iterations" + VALUE,
        "save_counter" + VALUE,
        "var" + VALUE,
        slot_key("var", "m"),
        slot_key("var", "v"),
    ]


def test_g39_slot_recorded_on_optimizer_node_after_bfs_nodes(prefix):
    meta = ac.object_metadata(trained_root().save(prefix))
    nodes = meta["nodes"]
    opt_id, var_id = node_of(meta, "optimizer"), node_of(meta, "var")
    (record,) = nodes[opt_id]["slot_variables"]
    slot_id = record["slot_variable_node_id"]
    assert record["original_variable_node_id"] == var_id
    assert record["slot_name"] == "m"
    assert slot_id == len(nodes) - 1
    assert [a["checkpoint_key"] for a in nodes[slot_id]["attributes"]] == [slot_key("var", "m")]


def test_g39_slots_are_not_dependencies(prefix):
    meta = ac.object_metadata(trained_root().save(prefix))
    opt_id = node_of(meta, "optimizer")
    slot_id = meta["nodes"][opt_id]["slot_variables"][0]["slot_variable_node_id"]
    edges = [c["node_id"] for node in meta["nodes"] for c in node["children"]]
    assert slot_id not in edges


def test_g39_slots_of_variables_outside_graph_not_saved(prefix):
    model_var, nuisance_var = f32(1.0), f32(2.0)
    opt = SlotOptimizer()
    opt.create_slots([model_var, nuisance_var])
    path = ac.Checkpoint(var=model_var, optimizer=opt).save(prefix)
    assert [k for k in keys(path) if ".OPTIMIZER_SLOT" in k] == [slot_key("var", "m")]


def test_g39_slots_not_saved_without_optimizer(prefix):
    var = f32(1.0)
    opt = SlotOptimizer()
    opt.create_slots([var])
    path = ac.Checkpoint(var=var).save(prefix)
    assert not [k for k in keys(path) if ".OPTIMIZER_SLOT" in k]


def test_g39_slot_node_order(prefix):
    a, b = f32(1.0), f32(2.0)
    opt = SlotOptimizer(slot_names=("v", "m"))
    opt.create_slots([b, a])
    meta = ac.object_metadata(ac.Checkpoint(a=a, b=b, optimizer=opt).write(prefix))
    records = sorted(meta["nodes"][node_of(meta, "optimizer")]["slot_variables"],
                     key=lambda r: r["slot_variable_node_id"])
    names = {node_of(meta, "a"): "a", node_of(meta, "b"): "b"}
    order = [(r["slot_name"], names[r["original_variable_node_id"]]) for r in records]
    assert order == [("v", "a"), ("v", "b"), ("m", "a"), ("m", "b")]


@pytest.mark.parametrize("error", [KeyError, AttributeError])
def test_g39_get_slot_may_raise_for_unknown_variables(prefix, error):
    class Raising(SlotOptimizer):
        def get_slot(self, var, name):
            slot = self._lookup(var, name)
            if slot is None:
                raise error(name)
            return slot

    var = f32(1.0)
    opt = Raising()
    opt.create_slots([var])
    path = ac.Checkpoint(var=var, other=f32(2.0), optimizer=opt).save(prefix)
    assert [k for k in keys(path) if ".OPTIMIZER_SLOT" in k] == [slot_key("var", "m")]


def test_g39_slot_with_children_not_supported(prefix):
    class NestedSlots(SlotOptimizer):
        def get_slot(self, var, name):
            slot = ac.AutoTrackable()
            slot.inner = f32(0.0)
            return slot if var is model_var else None

    model_var = f32(1.0)
    with pytest.raises(NotImplementedError):
        ac.Checkpoint(var=model_var, optimizer=NestedSlots()).save(prefix)


def test_g39_slot_that_is_also_a_dependency_not_supported(prefix):
    root = trained_root()
    root.also_slot = root.optimizer.get_slot(root.var, "m")
    with pytest.raises(NotImplementedError):
        root.save(prefix)


# ---------------------------------------------------------------- G40 slot restoration


def test_g40_existing_slot_restored_in_place(prefix):
    root = trained_root()
    path = root.save(prefix)
    slot = root.optimizer.get_slot(root.var, "m")
    slot.assign(0.0)
    root.var.assign(0.0)
    root.restore(path).assert_consumed()
    assert root.optimizer.get_slot(root.var, "m") is slot
    assert (root.var.numpy(), slot.numpy()) == (12.0, 14.0)


def test_g40_optimizer_attached_after_variable(prefix):
    path = trained_root().save(prefix)
    new_root = ac.Checkpoint()
    status = new_root.restore(path)
    new_root.var = ac.add_variable(new_root, name="var", shape=[])
    new_root.optimizer = SlotOptimizer()
    assert new_root.optimizer.get_slot(new_root.var, "m").numpy() == 14.0
    new_root.optimizer.build()
    status.assert_consumed()


def test_g40_variable_attached_after_optimizer(prefix):
    path = trained_root().save(prefix)
    new_root = ac.Checkpoint()
    new_root.optimizer = SlotOptimizer()
    new_root.optimizer.build()
    status = new_root.restore(path)
    new_root.var = ac.add_variable(new_root, name="var", shape=[])
    assert new_root.var.numpy() == 12.0
    assert new_root.optimizer.get_slot(new_root.var, "m").numpy() == 14.0
    status.assert_consumed()


def test_g40_create_or_restore_receives_slot_name_and_variable(prefix):
    path = trained_root().save(prefix)
    new_root = ac.Checkpoint()
    new_root.optimizer = SlotOptimizer()
    new_root.var = f32(0.0)
    new_root.restore(path)
    assert new_root.optimizer.restore_calls == [("m", new_root.var)]


def test_g40_assert_consumed_waits_for_non_slot_state(prefix):
    path = trained_root().save(prefix)
    new_root = ac.Checkpoint()
    status = new_root.restore(path)
    new_root.var = ac.add_variable(new_root, name="var", shape=[])
    new_root.optimizer = SlotOptimizer()
    status.assert_existing_objects_matched()
    with pytest.raises(AssertionError, match="iterations"):
        status.assert_consumed()
    new_root.optimizer.minimize([new_root.var])
    status.assert_consumed()


def test_g40_unresolved_slot_named_with_pretty_path(prefix):
    path = trained_root(build=False).save(prefix)
    status = ac.Checkpoint(var=f32(0.0)).restore(path)
    with pytest.raises(AssertionError, match=re.escape("(root).optimizer's state 'm' for (root).var")):
        status.assert_consumed()


def test_g40_deferred_slot_restoration_with_overlapping_restores(tmp_path):
    root = ac.Checkpoint()
    root.var = ac.add_variable(root, name="var", initializer=0.0)
    optimizer = SlotOptimizer()
    optimizer.minimize([root.var])
    root.var.assign(12.0)
    no_slots_path = root.save(str(tmp_path / "no_slots"))
    root.optimizer = optimizer
    root.var.assign(13.0)
    optimizer.get_slot(root.var, "m").assign(14.0)
    slots_path = root.save(str(tmp_path / "with_slots"))

    new_root = ac.Checkpoint()
    slot_status = new_root.restore(slots_path)
    no_slot_status = new_root.restore(no_slots_path)
    with pytest.raises(AssertionError):
        no_slot_status.assert_consumed()
    new_root.var = ac.add_variable(new_root, name="var", shape=[])
    no_slot_status.assert_consumed()
    assert new_root.var.numpy() == 12.0  # the later restore() call wins
    new_root.optimizer = SlotOptimizer()
    slot_status.assert_existing_objects_matched()
    with pytest.raises(AssertionError, match="iterations"):
        slot_status.assert_consumed()
    assert new_root.var.numpy() == 12.0
    assert new_root.optimizer.get_slot(new_root.var, "m").numpy() == 14.0
    new_root.optimizer.minimize([new_root.var])
    slot_status.assert_consumed()


def test_g40_slot_restored_with_non_scalar_shape(prefix):
    root = ac.Checkpoint(var=f32([1.0, 2.0, 3.0]), optimizer=SlotOptimizer())
    root.optimizer.create_slots([root.var])
    root.optimizer.get_slot(root.var, "m").assign([4.0, 5.0, 6.0])
    path = root.save(prefix)
    new_root = ac.Checkpoint(var=f32([0.0, 0.0, 0.0]), optimizer=SlotOptimizer())
    new_root.restore(path).assert_consumed()
    np.testing.assert_array_equal(new_root.optimizer.get_slot(new_root.var, "m").numpy(), [4.0, 5.0, 6.0])
