"""Unit tests for ``asyncckpt.model.data_structures``: the list/dict/tuple wrappers.

Two contracts: the wrappers behave as the Python containers they stand in for (``isinstance``,
equality, length, iteration, slicing, copying), and they track trackable elements by position or key
while refusing to be saved (``_trackable_children`` raises) after a mutation that would break
restore-on-create.
"""

from __future__ import annotations

import collections
import collections.abc
import copy
import json
import pickle
import re

import numpy as np
import pytest

from asyncckpt.model.data_structures import (
    DictWrapper,
    ListWrapper,
    TrackableDataStructure,
    TupleWrapper,
    sticky_attribute_assignment,
    wrap_or_unwrap,
)
from asyncckpt.model.trackable import NoDependency, Trackable
from asyncckpt.model.variable import Variable

APPEND_ONLY = re.escape("tracking is exclusively for append-only data structures")
LIST_OUTSIDE = re.escape("The wrapped list was modified outside the wrapper")
DICT_OUTSIDE = re.escape("The wrapped dictionary was modified outside the wrapper")
NON_STRING_KEY = re.escape("The wrapped dictionary contains a non-string key")

Point = collections.namedtuple("Point", ["x", "y"])


def var(value=0.0):
    return Variable(np.float32(value))


def children(obj):
    return obj._trackable_children()


# ---------------------------------------------------------------- wrap_or_unwrap


def test_wrap_or_unwrap_dispatch():
    v = var()
    assert wrap_or_unwrap(v) is v
    assert isinstance(wrap_or_unwrap([]), ListWrapper)
    assert isinstance(wrap_or_unwrap({}), DictWrapper)
    assert isinstance(wrap_or_unwrap(collections.OrderedDict()), DictWrapper)
    assert isinstance(wrap_or_unwrap((v,)), TupleWrapper)
    assert isinstance(wrap_or_unwrap((1, (2, [3]))), TupleWrapper)  # a nested mutable container
    plain = (1, "a", (2, 3))
    assert wrap_or_unwrap(plain) is plain
    raw = [v]
    assert wrap_or_unwrap(NoDependency(raw)) is raw
    for value in (3, "s", None, np.zeros(2)):
        assert wrap_or_unwrap(value) is value


def test_list_and_dict_subclasses_are_not_wrapped():
    class MyList(list):
        pass

    custom = MyList([var()])
    defaults = collections.defaultdict(list)
    assert wrap_or_unwrap(custom) is custom
    assert wrap_or_unwrap(defaults) is defaults


def test_sticky_assignment_tracks_only_trackables():
    owner = Trackable()
    v = var()
    assert sticky_attribute_assignment(owner, "a", v) is v
    assert sticky_attribute_assignment(owner, "a", 5) == 5  # does not remove the dependency
    assert sticky_attribute_assignment(owner, "b", NoDependency(var())) is not None
    wrapped = sticky_attribute_assignment(owner, "c", [v])
    assert children(owner) == {"a": v, "c": wrapped}


# ---------------------------------------------------------------- ListWrapper as a list


def test_list_wrapper_is_a_list():
    lw = ListWrapper([1, 2, 3])
    assert isinstance(lw, list)
    assert isinstance(lw, collections.abc.MutableSequence)
    assert isinstance(lw, TrackableDataStructure)
    assert ListWrapper().copy() == [] and ListWrapper(None) == []


def test_list_wrapper_sequence_protocol():
    lw = ListWrapper([3, 1, 2, 1])
    assert len(lw) == 4
    assert list(lw) == [3, 1, 2, 1]
    assert list(reversed(lw)) == [1, 2, 1, 3]
    assert 2 in lw and 7 not in lw
    assert lw.index(1) == 1 and lw.index(1, 2) == 3
    assert lw.count(1) == 2
    assert lw[-1] == 1
    assert bool(lw) and not bool(ListWrapper([]))
    assert sorted(lw) == [1, 1, 2, 3]
    assert tuple(lw) == (3, 1, 2, 1) and [*lw] == [3, 1, 2, 1]


def test_list_wrapper_slicing_returns_plain_lists():
    lw = ListWrapper([0, 1, 2, 3, 4])
    part = lw[1:4]
    assert part == [1, 2, 3] and type(part) is list
    assert lw[::-2] == [4, 2, 0]


def test_list_wrapper_equality():
    lw = ListWrapper([1, 2])
    assert lw == [1, 2] and [1, 2] == lw
    assert lw == ListWrapper([1, 2])
    assert lw != [2, 1] and not (lw != [1, 2])
    assert lw != (1, 2)
    assert lw < [1, 3]
    with pytest.raises(TypeError, match="unhashable"):
        hash(lw)


def test_list_wrapper_ordering_comparisons():
    lw = ListWrapper([5])
    assert not (lw <= [1])
    assert lw > [1]
    assert not (lw >= [9])


def test_list_wrapper_arithmetic_returns_plain_lists():
    lw = ListWrapper([1, 2])
    assert lw + [3] == [1, 2, 3] and type(lw + [3]) is list
    assert [0] + lw == [0, 1, 2] and type([0] + lw) is list
    assert lw * 2 == [1, 2, 1, 2] and 2 * lw == [1, 2, 1, 2]
    assert type(lw * 2) is list


def test_list_wrapper_repr_and_str():
    assert repr(ListWrapper([1, "a"])) == "ListWrapper([1, 'a'])"
    assert str(ListWrapper([])) == "ListWrapper([])"


def test_list_wrapper_works_with_c_level_consumers():
    assert json.dumps(ListWrapper([1, [2]])) == "[1, [2]]"
    assert ",".join(ListWrapper(["a", "b"])) == "a,b"
    np.testing.assert_array_equal(np.asarray(ListWrapper([1, 2])), [1, 2])


def test_list_wrapper_shares_storage_with_wrapped_list():
    original = [1, 2]
    lw = ListWrapper(original)
    lw.append(3)
    assert original == [1, 2, 3]
    assert lw._storage is original


def test_nested_list_is_wrapped_in_place():
    inner_value = var()
    original = [[inner_value], 1]
    lw = ListWrapper(original)
    assert isinstance(lw[0], ListWrapper) and original[0] is lw[0]
    assert children(lw) == {"0": lw[0]}
    assert children(lw[0]) == {"0": inner_value}


def test_list_wrapper_copy_and_deepcopy():
    v = var(1.0)
    lw = ListWrapper([v, 2])
    plain = lw.copy()
    assert type(plain) is list and plain[0] is v
    shallow = copy.copy(lw)
    assert isinstance(shallow, ListWrapper) and shallow[0] is v
    assert shallow._storage is not lw._storage
    shallow.append(3)
    assert len(lw) == 2
    deep = copy.deepcopy(lw)
    assert isinstance(deep, ListWrapper) and deep[0] is not v
    assert float(deep[0]) == 1.0 and children(deep) == {"0": deep[0]}


def test_list_wrapper_pickling_refused():
    with pytest.raises(TypeError, match="ListWrapper objects cannot be pickled"):
        pickle.dumps(ListWrapper([1]))


# ---------------------------------------------------------------- ListWrapper tracking


def test_list_elements_tracked_by_position():
    a, b = var(), var()
    lw = ListWrapper([a, 1, b])
    assert children(lw) == {"0": a, "2": b}
    c = var()
    lw.append(c)
    lw.extend([4, var()])
    assert list(children(lw)) == ["0", "2", "3", "5"]
    assert children(lw)["3"] is c


def test_no_dependency_elements_are_unwrapped_untracked():
    v, w = var(), var()
    lw = ListWrapper([NoDependency(v)])
    lw.append(NoDependency(w))
    assert lw[0] is v and lw[1] is w
    assert children(lw) == {}


def test_inplace_add_and_repeat_track_new_positions():
    v = var()
    lw = ListWrapper([v])
    result = lw.__iadd__([var()])
    assert result is lw
    lw *= 2
    assert len(lw) == 4
    assert list(children(lw)) == ["0", "1", "2", "3"]
    assert children(lw)["2"] is v


def test_insert_at_end_is_an_append():
    lw = ListWrapper([var()])
    lw.insert(5, var())
    assert list(children(lw)) == ["0", "1"]


def test_extend_with_itself():
    v = var()
    lw = ListWrapper([v])
    lw.extend(lw)
    assert lw == [v, v]
    assert children(lw) == {"0": v, "1": v}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda lw: lw.pop(0),
        lambda lw: lw.pop(),
        lambda lw: lw.remove(lw[0]),
        lambda lw: lw.reverse(),
        lambda lw: lw.clear(),
        lambda lw: lw.insert(0, 1),
        lambda lw: lw.__setitem__(-1, var()),
        lambda lw: lw.__setitem__(slice(0, 1), [var()]),
        lambda lw: lw.sort(key=lambda element: -float(element)),
    ],
    ids=["pop-first", "pop-last", "remove", "reverse", "clear", "insert-before", "setitem-negative",
         "setslice", "sort"],
)
def test_mutations_that_move_trackables_make_list_unsaveable(mutate):
    lw = ListWrapper([var(1.0), var(2.0)])
    mutate(lw)
    with pytest.raises(ValueError, match=APPEND_ONLY):
        children(lw)
    assert isinstance(len(lw), int)  # still a usable list
    lw.append(5)
    with pytest.raises(ValueError, match=APPEND_ONLY):
        children(lw)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda lw: lw.pop(),  # the last element is a plain value
        lambda lw: lw.__setitem__(0, lw[0]),  # same object back in place
        lambda lw: lw.__setitem__(2, "z"),  # plain value replaced by a plain value
        lambda lw: lw.__setitem__(slice(None), list(lw)),  # identical slice assignment
        lambda lw: lw.__imul__(1),
        lambda lw: lw.insert(2, "x"),  # no trackable after the insertion point
        lambda lw: lw.__delitem__(-1),
    ],
    ids=["pop-plain-tail", "setitem-same", "setitem-plain", "setslice-identical", "imul-1", "insert-after",
         "del-plain-tail"],
)
def test_mutations_that_keep_trackable_positions_stay_saveable(mutate):
    a, b = var(), var()
    lw = ListWrapper([a, b, "plain"])
    mutate(lw)
    assert children(lw) == {"0": a, "1": b}


def test_unsaveable_message_names_the_wrapper():
    lw = ListWrapper([var()])
    del lw[0]
    with pytest.raises(ValueError) as info:
        children(lw)
    message = str(info.value)
    assert message.startswith("Unable to save the object ListWrapper([])")
    assert "A list element was replaced (__setitem__, __setslice__), deleted" in message


def test_external_modification_makes_list_unsaveable():
    original = [var()]
    lw = ListWrapper(original)
    original.append(7)
    with pytest.raises(ValueError, match=LIST_OUTSIDE) as info:
        children(lw)
    assert "(its final value was [<asyncckpt.Variable" in str(info.value)
    lw.append(var())  # appending through the wrapper afterwards does not make it saveable again
    with pytest.raises(ValueError, match=LIST_OUTSIDE):
        children(lw)


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_external_modification_message_shows_previous_value(kind):
    if kind == "list":
        original = [1]
        wrapper = ListWrapper(original)
        original.append(2)
        previous = "[1]"
    else:
        original = {"a": 1}
        wrapper = DictWrapper(original)
        original["b"] = 2
        previous = "{'a': 1}"
    with pytest.raises(ValueError) as info:
        children(wrapper)
    assert f"its value when a checkpoint dependency was added was {previous})" in str(info.value)


def test_wrapper_mutations_are_not_external_modifications():
    original = [var()]
    lw = ListWrapper(original)
    lw.append(1)
    lw.extend([2, var()])
    assert list(children(lw)) == ["0", "3"]


# ---------------------------------------------------------------- DictWrapper as a dict


def test_dict_wrapper_is_a_dict():
    dw = DictWrapper({"a": 1})
    assert isinstance(dw, dict)
    assert isinstance(dw, collections.abc.MutableMapping)
    assert isinstance(dw, TrackableDataStructure)
    assert DictWrapper() == {}


def test_dict_wrapper_mapping_protocol():
    dw = DictWrapper({"b": 1, "a": 2})
    assert len(dw) == 2
    assert list(dw) == ["b", "a"]
    assert list(dw.keys()) == ["b", "a"] and list(dw.values()) == [1, 2]
    assert list(dw.items()) == [("b", 1), ("a", 2)]
    assert dw.get("a") == 2 and dw.get("z") is None and dw.get("z", 0) == 0
    assert "a" in dw and "z" not in dw
    with pytest.raises(KeyError):
        dw["z"]
    assert bool(dw) and not bool(DictWrapper({}))
    assert dict(dw) == {"b": 1, "a": 2} and {**dw} == {"b": 1, "a": 2}
    assert dw.copy() == {"b": 1, "a": 2} and type(dw.copy()) is dict


def test_dict_wrapper_equality_and_repr():
    dw = DictWrapper({"a": 1})
    assert dw == {"a": 1} and {"a": 1} == dw
    assert dw == DictWrapper({"a": 1})
    assert dw != {"a": 2} and not (dw != {"a": 1})
    assert repr(dw) == "DictWrapper({'a': 1})"
    with pytest.raises(TypeError, match="unhashable"):
        hash(dw)


def test_dict_wrapper_mutating_methods():
    dw = DictWrapper({"a": 1})
    dw.update({"b": 2}, c=3)
    assert dw.setdefault("d", 4) == 4 and dw.setdefault("a", 9) == 1
    assert dw.pop("b") == 2 and dw.pop("z", None) is None
    assert dw == {"a": 1, "c": 3, "d": 4}
    dw.clear()
    assert dw == {} and len(dw) == 0


def test_dict_wrapper_shares_storage():
    original = collections.OrderedDict(a=1)
    dw = DictWrapper(original)
    dw["b"] = 2
    assert original == {"a": 1, "b": 2}
    assert dw._storage is original


def test_dict_wrapper_deepcopy_and_pickle():
    v = var(2.0)
    dw = DictWrapper({"v": v})
    deep = copy.deepcopy(dw)
    assert isinstance(deep, DictWrapper) and deep["v"] is not v and float(deep["v"]) == 2.0
    assert children(deep) == {"v": deep["v"]}
    with pytest.raises(TypeError, match="DictWrapper objects cannot be pickled"):
        pickle.dumps(dw)


def test_dict_wrapper_shallow_copy():
    v = var()
    shallow = copy.copy(DictWrapper({"v": v}))
    assert shallow == {"v": v} and shallow["v"] is v


def test_dict_wrapper_json():
    assert json.loads(json.dumps(DictWrapper({"a": 1}))) == {"a": 1}


def test_dict_wrapper_union_operators():
    dw = DictWrapper({"a": 1})
    assert dw | {"b": 2} == {"a": 1, "b": 2}
    dw |= {"c": 3}
    assert dw == {"a": 1, "c": 3}


def test_dict_wrapper_reversed():
    assert list(reversed(DictWrapper({"a": 1, "b": 2}))) == ["b", "a"]


# ---------------------------------------------------------------- DictWrapper tracking


def test_dict_values_tracked_by_string_key():
    a, b = var(), var()
    dw = DictWrapper({"a": a, "n": 1})
    dw["b"] = b
    assert children(dw) == {"a": a, "b": b}
    replacement = var()
    dw["a"] = replacement
    assert children(dw) == {"a": replacement, "b": b}
    assert list(children(dw)) == ["a", "b"]


def test_dict_delete_and_pop_untrack():
    dw = DictWrapper({"a": var(), "b": var(), "c": var()})
    del dw["a"]
    dw.pop("b")
    assert list(children(dw)) == ["c"]


def test_dict_no_dependency_value_untracked():
    v = var()
    dw = DictWrapper({"a": NoDependency(v)})
    dw["b"] = NoDependency(v)
    assert dw["a"] is v and dw["b"] is v
    assert children(dw) == {}


def test_dict_nested_containers_wrapped():
    v = var()
    dw = DictWrapper({"layers": [v], "cfg": {"w": v}})
    assert isinstance(dw["layers"], ListWrapper) and isinstance(dw["cfg"], DictWrapper)
    assert children(dw) == {"layers": dw["layers"], "cfg": dw["cfg"]}


def test_non_string_key_to_trackable_is_unsaveable():
    dw = DictWrapper({})
    dw[1] = var()
    with pytest.raises(ValueError, match=NON_STRING_KEY) as info:
        children(dw)
    assert str(info.value).startswith("Unable to save the object DictWrapper({1: <asyncckpt.Variable")


def test_non_string_keys_with_plain_or_untracked_values_are_fine():
    v = var()
    dw = DictWrapper({1: "one", (2, 3): 4.0, "v": v})
    dw[5] = NoDependency(var())
    assert children(dw) == {"v": v}


def test_external_modification_makes_dict_unsaveable():
    original = {"a": var()}
    dw = DictWrapper(original)
    original["b"] = 1
    with pytest.raises(ValueError, match=DICT_OUTSIDE):
        children(dw)


def test_external_replacement_of_value_detected():
    original = {"a": var()}
    dw = DictWrapper(original)
    original["a"] = var()
    with pytest.raises(ValueError, match=DICT_OUTSIDE):
        children(dw)


# ---------------------------------------------------------------- TupleWrapper


def test_tuple_wrapper_is_a_tuple():
    v = var()
    tw = TupleWrapper((v, 1, "s"))
    assert isinstance(tw, tuple) and isinstance(tw, Trackable)
    assert tw == (v, 1, "s") and (v, 1, "s") == tw
    assert len(tw) == 3 and list(tw) == [v, 1, "s"]
    assert tw[1:] == (1, "s") and type(tw[1:]) is tuple
    assert tw.index(1) == 1 and tw.count("s") == 1
    assert hash(tw) == hash((v, 1, "s"))
    assert repr(tw) == repr((v, 1, "s"))


def test_tuple_elements_tracked_by_index():
    a, b = var(), var()
    tw = TupleWrapper((a, 2, b))
    assert children(tw) == {"0": a, "2": b}


def test_tuple_no_dependency_element_unwrapped_untracked():
    a, b = var(), var()
    tw = TupleWrapper((NoDependency(a), b))
    assert tw[0] is a
    assert children(tw) == {"1": b}


def test_tuple_nested_containers_wrapped():
    v = var()
    tw = TupleWrapper(([v], {"k": v}, (v,)))
    assert isinstance(tw[0], ListWrapper) and isinstance(tw[1], DictWrapper) and isinstance(tw[2], TupleWrapper)
    assert list(children(tw)) == ["0", "1", "2"]


def test_namedtuple_wrapper_keeps_type_and_fields():
    v = var()
    tw = TupleWrapper(Point(x=v, y=2))
    assert isinstance(tw, Point) and isinstance(tw, TupleWrapper)
    assert tw.x is v and tw.y == 2
    assert tw == Point(v, 2)
    assert tw._fields == ("x", "y")
    assert repr(tw) == f"Point(x={v!r}, y=2)"
    assert list(children(tw)) == ["x", "0"]


def test_tuple_wrapper_deepcopy_and_pickle():
    v = var(4.0)
    tw = TupleWrapper((v, 1))
    deep = copy.deepcopy(tw)
    assert isinstance(deep, TupleWrapper) and deep[0] is not v and float(deep[0]) == 4.0
    assert children(deep) == {"0": deep[0]}
    with pytest.raises(TypeError, match="TupleWrapper objects cannot be pickled"):
        pickle.dumps(tw)


def test_tuple_wrapper_shallow_copy():
    v = var()
    tw = TupleWrapper((v, 1))
    assert copy.copy(tw) == (v, 1)


def test_namedtuple_wrapper_deepcopy_keeps_fields():
    deep = copy.deepcopy(TupleWrapper(Point(x=var(1.0), y=2)))
    assert isinstance(deep, Point)
    assert float(deep.x) == 1.0



@pytest.mark.parametrize("cached", [False, True], ids=["fresh-graph", "cached-graph"])
def test_a_container_that_cannot_be_saved_is_named_by_its_checkpoint_path(tmp_path, cached):
    import asyncckpt as ac

    model = ac.Module()
    original = [ac.Variable(1.0)]
    model.layers = original
    checkpoint = ac.Checkpoint(model=model)
    if cached:
        checkpoint.save(str(tmp_path / "ckpt"))  # the next save checks the cached graph's containers
    original.append(ac.Variable(2.0))  # behind the wrapper's back: the list can no longer be saved
    with pytest.raises(ValueError, match=LIST_OUTSIDE) as info:
        checkpoint.save(str(tmp_path / "ckpt"))
    assert str(info.value).endswith("The object is at checkpoint path 'model/layers'.")
