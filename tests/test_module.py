"""Unit tests for ``asyncckpt.model.module.Module``: name, and the variables and sub-modules it can list.

``variables``, ``trainable_variables`` and ``submodules`` follow the tracked dependencies
(attributes, lists, dicts, tuples, sub-modules) breadth-first and list each object once.
"""

from __future__ import annotations

import numpy as np

from asyncckpt.model.autotrackable import AutoTrackable
from asyncckpt.model.module import Module
from asyncckpt.model.trackable import NoDependency
from asyncckpt.model.variable import Variable


def var(name, trainable=True):
    return Variable(np.float32(0.0), name=name, trainable=trainable)


def names(variables):
    return [v.name for v in variables]


class Dense(Module):
    def __init__(self, name=None):
        super().__init__(name=name)
        self.kernel = var("kernel")
        self.bias = var("bias")


class NoSuperInit(Module):
    def __init__(self):
        self.w = var("w")


# ---------------------------------------------------------------- name


def test_default_name_is_snake_case_of_class():
    assert Module().name == "module"
    assert Dense().name == "dense"

    class MyDenseLayer(Module):
        pass

    assert MyDenseLayer().name == "my_dense_layer"


def test_explicit_name():
    assert Dense(name="encoder").name == "encoder"


def test_name_without_super_init():
    m = NoSuperInit()
    assert m.name == "no_super_init"
    assert names(m.variables) == ["w"]


def test_name_keeps_acronyms_together():
    class HTTPServer(Module):
        pass

    assert HTTPServer().name == "http_server"


def test_name_is_not_a_dependency():
    m = Module(name="x")
    assert m._trackable_children() == {}


# ---------------------------------------------------------------- variables


def test_empty_module():
    m = Module()
    assert m.variables == [] and m.trainable_variables == [] and m.submodules == []


def test_variables_breadth_first_in_assignment_order():
    m = Module()
    m.a = var("a")
    m.sub = Dense()
    m.c = var("c")
    assert names(m.variables) == ["a", "c", "kernel", "bias"]


def test_variables_through_lists_dicts_and_tuples():
    m = Module()
    m.layers = [var("l0"), Dense(name="d"), var("l2")]
    m.table = {"x": var("tx"), "y": [var("ty")]}
    m.pair = (var("p0"), 3)
    assert names(m.variables) == ["l0", "l2", "tx", "p0", "kernel", "bias", "ty"]


def test_each_variable_listed_once():
    m = Module()
    shared = var("shared")
    m.a = shared
    m.b = [shared, shared]
    m.c = {"again": shared}
    m.sub = Module()
    m.sub.also = shared
    assert m.variables == [shared]


def test_shared_submodule_listed_once():
    m = Module()
    d = Dense()
    m.first = d
    m.second = [d]
    assert m.submodules == [d]
    assert names(m.variables) == ["kernel", "bias"]


def test_trainable_variables_filter_keeps_order():
    m = Module()
    m.a = var("a")
    m.frozen = var("frozen", trainable=False)
    m.b = var("b")
    assert names(m.variables) == ["a", "frozen", "b"]
    assert names(m.trainable_variables) == ["a", "b"]


def test_untracked_variables_are_not_listed():
    m = Module()
    m.hidden = NoDependency(var("hidden"))
    m.plain_tuple = (1, 2)
    m.array = np.zeros(3)
    assert m.variables == []


def test_variables_follow_reassignment_and_deletion():
    m = Module()
    m.a = var("a1")
    m.b = var("b")
    m.a = var("a2")
    assert names(m.variables) == ["a2", "b"]
    del m.b
    assert names(m.variables) == ["a2"]
    m.layers = []
    m.layers.append(var("late"))
    assert names(m.variables) == ["a2", "late"]


def test_cycles_terminate_and_self_is_excluded():
    m = Module()
    m.child = Module()
    m.child.parent = m
    m.me = m
    m.child.w = var("w")
    assert m.submodules == [m.child]
    assert names(m.variables) == ["w"]
    assert m.child.submodules == [m]


def test_slot_like_variables_are_not_module_variables():
    class FakeOptimizer(AutoTrackable):
        def __init__(self, slot):
            self._self_slot = slot

        def get_slot_names(self):
            return ["m"]

        def get_slot(self, variable, slot_name):
            return self._self_slot

    m = Module()
    m.w = var("w")
    m.opt = FakeOptimizer(var("slot"))
    assert names(m.variables) == ["w"]


# ---------------------------------------------------------------- submodules


def test_submodules_breadth_first_through_containers():
    m = Module(name="root")
    m.encoder = Module(name="encoder")
    m.blocks = [Module(name="b0"), {"inner": Module(name="b1")}]
    m.encoder.deep = Module(name="deep")
    m.plain = AutoTrackable()
    # Depth 1: encoder, the list; depth 2: deep, b0, the dict; depth 3: b1.
    assert [s.name for s in m.submodules] == ["encoder", "deep", "b0", "b1"]


def test_variables_after_non_append_list_mutation():
    m = Module()
    m.layers = [var("a"), var("b")]
    m.layers[0] = var("c")
    assert sorted(names(m.variables)) == ["b", "c"]
