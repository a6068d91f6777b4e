"""The typed-JSON codec of framework state: every type kept exactly, nothing but data read back."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncckpt.model.adapters import typed_json
from asyncckpt.model.adapters.typed_json import ArrayRef, PrngKeyRef


def round_trip(value):
    return typed_json.loads(typed_json.dumps(value), lambda ref: ref)


def test_types_survive_that_plain_json_loses():
    value = {"t": (1, 2.5, None), 3: [True, "x"], (1, 2): {}, "nan": float("nan"), "-0": -0.0, "big": 2**80}
    back = round_trip(value)
    assert back["t"] == (1, 2.5, None) and isinstance(back["t"], tuple)
    assert back[3] == [True, "x"] and back[(1, 2)] == {}
    assert math.isnan(back["nan"]) and math.copysign(1.0, back["-0"]) == -1.0 and back["big"] == 2**80
    assert list(back) == list(value)  # order kept


def test_references_come_back_through_the_callback():
    refs = []
    document = typed_json.dumps({"w": ArrayRef("layer.w", "torch"), "k": PrngKeyRef("key", "threefry2x32")})
    back = typed_json.loads(document, lambda ref: refs.append(ref) or f"<{ref}>")
    assert back == {"w": "<layer.w>", "k": "<key>"}
    assert [(str(r), type(r).__name__) for r in refs] == [("layer.w", "ArrayRef"), ("key", "PrngKeyRef")]
    assert refs[0].kind == "torch" and refs[1].impl == "threefry2x32"


def test_numpy_scalars_are_stored_as_python_numbers():
    assert round_trip({"a": np.float32(1.5), "b": np.int64(7)}) == {"a": 1.5, "b": 7}


@pytest.mark.parametrize("value", [object(), b"bytes", {1, 2}, np.zeros(2), print])
def test_values_that_are_not_data_are_refused(value):
    with pytest.raises(TypeError, match="never pickled"):
        typed_json.dumps({"x": value})


@pytest.mark.parametrize("data", [
    b'{"eval": "x"}', b'[1, 2]', b'{"float": 3}', b'{"dict": [[1]]}', b'{"dict": [[{"list": []}, 1]]}',
    b'NaN', b'\xff', b'{"array": "a", "kind": 5}', b'{"prng_key": "a", "other": "b"}',
])
def test_documents_that_are_not_typed_json_are_refused(data):
    with pytest.raises(ValueError):
        typed_json.loads(data, lambda ref: ref)


def test_deep_nesting_is_refused_not_a_crash():
    data = b'{"list": [' * 200 + b"1" + b"]}" * 200
    with pytest.raises(ValueError, match="nested more than"):
        typed_json.loads(data, lambda ref: ref)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(st.integers() | st.text(max_size=3), inner, max_size=3),
    max_leaves=12,
)


@given(json_values)
def test_round_trip_is_exact(value):
    assert repr(round_trip(value)) == repr(value)


def test_what_a_save_may_nest_a_restore_reads_keys_included():
    tree: dict = {}
    cursor = tree
    for _ in range(typed_json.MAX_DEPTH - 2):
        cursor["a"] = {}
        cursor = cursor["a"]
    cursor[((((1,),),),)] = 1  # the key's own nesting counts, as decode counts it
    with pytest.raises(ValueError, match="nested more than 64 levels deep at a.a"):
        typed_json.dumps(tree)
    shallow = {"a": {(1, (2,)): [1]}}
    assert typed_json.loads(typed_json.dumps(shallow), lambda ref: ref) == shallow


def test_an_integer_python_cannot_read_back_is_refused_at_save_and_at_restore():
    with pytest.raises(TypeError, match="integer at x.*4,000 digits"):
        typed_json.dumps({"x": 10**5000})
    with pytest.raises(ValueError, match="not typed JSON"):
        typed_json.loads(b"1" * 5000, lambda ref: ref)
