"""Unit tests for ``asyncckpt.model.variable``: construction, the mutation API and its hooks, conversions.

The snapshot side relies on two promises checked here: every in-place change runs the mutation
hooks first (so a hook can still see the old value), and nothing handed out by the variable aliases
its live array except the read-only ``array`` view.
"""

from __future__ import annotations

import copy
import pickle
import re
import threading

import numpy as np
import pytest

from asyncckpt.model.trackable import Trackable
from asyncckpt.model.variable import VARIABLE_VALUE_KEY, Variable

NUMERIC_DTYPES = [
    np.bool_,
    np.int8, np.int16, np.int32, np.int64,
    np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64,
    np.complex64, np.complex128,
]


# ---------------------------------------------------------------- construction


def test_construct_from_python_scalars_uses_numpy_default_dtypes():
    assert Variable(3).dtype == np.dtype(np.int64)
    assert Variable(3.5).dtype == np.dtype(np.float64)
    assert Variable(True).dtype == np.dtype(np.bool_)
    assert Variable(1 + 2j).dtype == np.dtype(np.complex128)
    assert Variable(3).shape == ()


def test_construct_from_nested_lists():
    v = Variable([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert v.shape == (2, 3)
    np.testing.assert_array_equal(v.numpy(), [[1, 2, 3], [4, 5, 6]])


def test_construct_copies_the_initial_array():
    source = np.arange(4, dtype=np.float32)
    v = Variable(source)
    source[0] = 100.0
    assert v.numpy()[0] == 0.0
    assert not np.shares_memory(v._snapshot_array(), source)


def test_construct_from_callable_calls_it_once():
    calls = []

    def init():
        calls.append(1)
        return np.ones((2, 2), dtype=np.float32)

    v = Variable(init)
    assert calls == [1]
    assert v.shape == (2, 2) and v.dtype == np.float32


def test_construct_from_variable_copies_its_value():
    a = Variable([1.0, 2.0])
    b = Variable(a)
    a.assign([5.0, 6.0])
    np.testing.assert_array_equal(b.numpy(), [1.0, 2.0])
    assert not np.shares_memory(a._snapshot_array(), b._snapshot_array())


def test_construct_with_explicit_dtype_casts():
    v = Variable([1, 2, 3], dtype=np.float16)
    assert v.dtype == np.float16
    np.testing.assert_array_equal(v.numpy(), np.array([1, 2, 3], dtype=np.float16))


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_numeric_dtype_and_bool_round_trips(dtype):
    value = np.array([0, 1, 1, 0], dtype=dtype)
    v = Variable(value)
    assert v.dtype == np.dtype(dtype)
    assert v.nbytes == 4 * np.dtype(dtype).itemsize
    np.testing.assert_array_equal(v.numpy(), value)
    assert v.numpy().dtype == np.dtype(dtype)


def test_zero_dimensional_variable():
    v = Variable(np.float32(2.5))
    assert v.shape == ()
    assert v.size == 1
    assert v.nbytes == 4
    with pytest.raises(TypeError, match="0-d"):
        len(v)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 2, 5)])
def test_empty_shapes(shape):
    v = Variable(np.zeros(shape, dtype=np.float32))
    assert v.shape == shape
    assert v.size == 0 and v.nbytes == 0
    assert v.numpy().shape == shape
    v.assign(7.0)  # a scalar broadcasts to an empty shape
    v.assign_add(np.zeros(shape, dtype=np.float32))
    assert v.numpy().shape == shape


@pytest.mark.parametrize(
    "value", ["text", ["a", "b"], np.array(["x"]), None, object(), np.array([1, "a"], dtype=object)],
    ids=["str", "list-of-str", "unicode-array", "None", "object", "object-array"],
)
def test_object_and_string_values_refused(value):
    with pytest.raises(TypeError, match="cannot be stored in a checkpoint"):
        Variable(value)


@pytest.mark.parametrize("dtype", ["datetime64[s]", "timedelta64[s]", [("a", "f4"), ("b", "i4")]],
                         ids=["datetime", "timedelta", "structured"])
def test_non_numeric_dtypes_refused(dtype):
    with pytest.raises(TypeError, match="use a numeric or bool dtype"):
        Variable(np.zeros(2, dtype=dtype))


def test_defaults_and_properties():
    v = Variable([1.0], name="w", trainable=False)
    assert v.name == "w"
    assert v.trainable is False
    assert v.device == "cpu"
    assert Variable(0).name == "Variable"
    assert Variable(0).trainable is True
    assert isinstance(v, Trackable)


def test_unknown_device_refused():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        Variable(1.0, device="tpu")


def test_unique_ids_differ():
    assert Variable(1)._unique_id != Variable(1)._unique_id


def test_repr_names_shape_dtype_and_device():
    text = repr(Variable(np.zeros((2, 3), np.float32), name="kernel"))
    assert text == "<asyncckpt.Variable 'kernel' shape=(2, 3) dtype=float32 device=cpu>"


# ---------------------------------------------------------------- reading


def test_numpy_returns_a_copy():
    v = Variable([1.0, 2.0, 3.0])
    out = v.numpy()
    out[0] = 99.0
    np.testing.assert_array_equal(v.numpy(), [1.0, 2.0, 3.0])
    assert not np.shares_memory(out, v._snapshot_array())


def test_value_returns_a_copy():
    v = Variable([1, 2])
    out = v.value()
    out[:] = 0
    np.testing.assert_array_equal(v.numpy(), [1, 2])


def test_getitem_returns_a_copy():
    v = Variable(np.arange(6).reshape(2, 3))
    row = v[1]
    row[:] = -1
    np.testing.assert_array_equal(v.numpy()[1], [3, 4, 5])
    assert v[0, 2] == 2


def test_array_is_a_read_only_live_view():
    v = Variable([1.0, 2.0])
    view = v.array
    assert not view.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 5.0
    v.assign([3.0, 4.0])
    np.testing.assert_array_equal(view, [3.0, 4.0])  # a view, so it follows the variable
    assert v._snapshot_array().flags.writeable  # the variable itself stays writable


# ---------------------------------------------------------------- mutation in place


def test_assign_writes_in_place_and_returns_self():
    v = Variable(np.zeros(3, np.float32))
    buffer = v._snapshot_array()
    assert v.assign([1.0, 2.0, 3.0]) is v
    assert v._snapshot_array() is buffer
    np.testing.assert_array_equal(buffer, [1.0, 2.0, 3.0])


def test_assign_add_and_sub_in_place():
    v = Variable(np.array([10, 20], dtype=np.int32))
    buffer = v._snapshot_array()
    assert v.assign_add([1, 2]) is v
    assert v.assign_sub(5) is v
    assert v._snapshot_array() is buffer
    np.testing.assert_array_equal(v.numpy(), [6, 17])
    assert v.dtype == np.int32


def test_assign_from_another_variable():
    a = Variable([1.0, 2.0])
    b = Variable([0.0, 0.0])
    b.assign(a)
    a.assign_add(1.0)
    np.testing.assert_array_equal(b.numpy(), [1.0, 2.0])
    b.assign_add(a)
    np.testing.assert_array_equal(b.numpy(), [3.0, 5.0])


def test_scalar_broadcasts_on_assign():
    v = Variable(np.zeros((2, 2), np.float32))
    v.assign(1.5)
    np.testing.assert_array_equal(v.numpy(), np.full((2, 2), 1.5))
    v.assign_add(np.float32(0.5))
    np.testing.assert_array_equal(v.numpy(), np.full((2, 2), 2.0))


@pytest.mark.parametrize("method, verb", [("assign", "assign"), ("assign_add", "add"), ("assign_sub", "subtract")])
def test_shape_mismatch_refused_with_clear_message(method, verb):
    v = Variable(np.zeros((2, 3), np.float32), name="w")
    with pytest.raises(ValueError) as info:
        getattr(v, method)(np.zeros((3, 2), np.float32))
    assert str(info.value) == (
        f"cannot {verb} a value of shape (3, 2) to variable 'w' of shape (2, 3)"
    )
    np.testing.assert_array_equal(v.numpy(), np.zeros((2, 3)))


def test_larger_value_does_not_broadcast_into_scalar_variable():
    v = Variable(np.float32(0.0), name="s")
    with pytest.raises(ValueError, match=r"shape \(1,\) to variable 's' of shape \(\)"):
        v.assign(np.ones(1, np.float32))


@pytest.mark.parametrize("method, verb", [("assign", "assign"), ("assign_add", "add"), ("assign_sub", "subtract")])
def test_lossy_array_cast_refused(method, verb):
    v = Variable(np.zeros(2, np.int32), name="counts")
    with pytest.raises(ValueError) as info:
        getattr(v, method)(np.array([1.5, 2.5]))
    assert str(info.value) == f"cannot {verb} a value of dtype float64 to variable 'counts' of dtype int32"
    np.testing.assert_array_equal(v.numpy(), [0, 0])


@pytest.mark.parametrize(
    "variable_dtype, value",
    [
        (np.int64, np.array([1.0])),
        (np.float64, np.array([1 + 1j])),
        (np.bool_, np.array([1])),
        (np.uint8, np.array([-1], dtype=np.int8)),
    ],
    ids=["float->int", "complex->float", "int->bool", "int8->uint8"],
)
def test_cross_kind_array_casts_refused(variable_dtype, value):
    v = Variable(np.zeros(1, variable_dtype))
    with pytest.raises(ValueError, match="cannot assign a value of dtype"):
        v.assign(value)


def test_lossless_and_same_kind_casts_allowed():
    v = Variable(np.zeros(2, np.float32))
    v.assign(np.array([1, 2], dtype=np.int16))  # int -> float is a safe cast
    v.assign_add(np.array([0.5, 0.5], dtype=np.float64))  # same kind
    np.testing.assert_array_equal(v.numpy(), [1.5, 2.5])
    assert v.dtype == np.float32


@pytest.mark.parametrize("value", [1.5, [1.5, 2.5], 1 + 2j], ids=["python-float", "list-of-floats", "complex"])
def test_lossy_python_value_cast_refused(value):
    v = Variable(np.zeros(2, np.int64), name="n")
    with pytest.raises(ValueError, match="cannot assign a value of dtype (float64|complex128) to variable 'n'"):
        v.assign(value)
    np.testing.assert_array_equal(v.numpy(), [0, 0])


@pytest.mark.parametrize(
    "dtype, value, bounds",
    [(np.int8, 128, "[-128, 127]"), (np.int8, [0, -129], "[-128, 127]"), (np.uint8, -1, "[0, 255]"),
     (np.uint16, 70000, "[0, 65535]")],
)
def test_python_ints_out_of_range_refused(dtype, value, bounds):
    v = Variable(np.zeros(2, dtype), name="small")
    with pytest.raises(ValueError) as info:
        v.assign_add(value)
    assert str(info.value) == f"cannot add values outside {bounds} to variable 'small' of dtype {np.dtype(dtype)}"
    np.testing.assert_array_equal(v.numpy(), [0, 0])


def test_python_ints_in_range_accepted_by_small_int_variables():
    v = Variable(np.zeros(2, np.uint8))
    v.assign([255, 0])
    v.assign_sub([0, 0])
    np.testing.assert_array_equal(v.numpy(), [255, 0])
    assert v.dtype == np.uint8
    f = Variable(np.zeros(2, np.float32))
    f.assign([1, 2])  # Python ints into a float variable are a safe cast
    np.testing.assert_array_equal(f.numpy(), [1.0, 2.0])


def test_bool_variable_accepts_python_bools():
    v = Variable([False, False])
    v.assign([True, False])
    np.testing.assert_array_equal(v.numpy(), [True, False])


# ---------------------------------------------------------------- mutation hooks


@pytest.mark.parametrize(
    "mutate",
    [lambda v: v.assign([7.0, 8.0]), lambda v: v.assign_add(1.0), lambda v: v.assign_sub(1.0),
     lambda v: v._restore_from_tensors({VARIABLE_VALUE_KEY: np.array([9.0, 9.0])})],
    ids=["assign", "assign_add", "assign_sub", "restore"],
)
def test_hook_runs_before_change_and_sees_old_value(mutate):
    v = Variable([1.0, 2.0])
    seen = []

    def hook(holder):
        seen.append((holder, holder.numpy()))

    v._add_mutation_hook(hook)
    mutate(v)
    assert len(seen) == 1
    holder, old = seen[0]
    assert holder is v
    np.testing.assert_array_equal(old, [1.0, 2.0])
    assert not np.array_equal(v.numpy(), [1.0, 2.0])


def test_every_mutation_runs_every_hook_in_registration_order():
    v = Variable(0)
    calls = []
    v._add_mutation_hook(lambda holder: calls.append(("a", int(holder))))
    v._add_mutation_hook(lambda holder: calls.append(("b", int(holder))))
    v.assign(5)
    v.assign_add(1)
    assert calls == [("a", 0), ("b", 0), ("a", 5), ("b", 5)]


def test_refused_mutation_runs_no_hook():
    v = Variable(np.zeros(2, np.int32))
    calls = []
    v._add_mutation_hook(calls.append)
    with pytest.raises(ValueError):
        v.assign(np.zeros(3, np.int32))
    with pytest.raises(ValueError):
        v.assign(np.zeros(2, np.float64))
    assert calls == []


def test_removed_hook_is_not_called():
    v = Variable(0.0)
    calls = []
    hook = calls.append
    v._add_mutation_hook(hook)
    v.assign(1.0)
    v._remove_mutation_hook(hook)
    v.assign(2.0)
    assert calls == [v]


def test_removing_an_unknown_hook_is_a_no_op():
    v = Variable(0.0)
    v._remove_mutation_hook(lambda holder: None)
    v.assign(1.0)
    assert float(v) == 1.0


def test_hook_may_remove_itself_while_running():
    v = Variable(0.0)
    saved = []

    def copy_once(holder):
        saved.append(holder.numpy())
        holder._remove_mutation_hook(copy_once)

    v._add_mutation_hook(copy_once)
    v.assign(1.0)
    v.assign(2.0)
    assert [float(x) for x in saved] == [0.0]
    assert float(v) == 2.0


def test_hook_add_remove_is_safe_under_concurrent_assigns():
    v = Variable(np.zeros(16, np.float64))
    permanent_calls = []
    v._add_mutation_hook(permanent_calls.append)
    assigns_per_thread = 200
    churns_per_thread = 200
    errors = []
    start = threading.Barrier(4)

    def assigner():
        try:
            start.wait()
            for i in range(assigns_per_thread):
                v.assign(float(i))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    def churner():
        try:
            start.wait()
            for _ in range(churns_per_thread):
                seen = []
                hook = seen.append
                v._add_mutation_hook(hook)
                v._remove_mutation_hook(hook)
                assert all(holder is v for holder in seen)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=assigner) for _ in range(2)] + [
        threading.Thread(target=churner) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(permanent_calls) == 2 * assigns_per_thread
    assert v._mutation_hooks == [permanent_calls.append]


# ---------------------------------------------------------------- restore protocol


def test_restore_from_tensors_copies_in_place():
    v = Variable(np.zeros(3, np.float32))
    buffer = v._snapshot_array()
    value = np.array([1.0, 2.0, 3.0], np.float32)
    v._restore_from_tensors({VARIABLE_VALUE_KEY: value})
    assert v._snapshot_array() is buffer
    np.testing.assert_array_equal(buffer, value)
    value[0] = 50.0
    assert v.numpy()[0] == 1.0


def test_restore_refuses_shape_mismatch():
    v = Variable(np.zeros((2, 2), np.float32), name="k")
    with pytest.raises(ValueError) as info:
        v._restore_from_tensors({VARIABLE_VALUE_KEY: np.zeros(4, np.float32)})
    assert str(info.value) == (
        "Received incompatible tensor with shape (4,) when attempting to restore variable with shape (2, 2) "
        "and name k."
    )


def test_restore_refuses_dtype_cast_and_names_key():
    v = Variable(np.zeros(2, np.float32), name="k")
    with pytest.raises(ValueError, match="of dtype float64 when attempting to restore variable 'k' of dtype "
                                         "float32: expected dtype float32 does not equal original dtype float64"):
        v._restore_from_tensors({VARIABLE_VALUE_KEY: np.zeros(2, np.float64)})
    source = "checkpoint key 'a/.ATTRIBUTES/VARIABLE_VALUE' of /tmp/ckpt-1"
    with pytest.raises(ValueError, match=re.escape(f"of dtype int32 from {source} when")):
        v._check_restorable(np.zeros(2, np.int32), source)


def test_restore_messages_name_an_unnamed_variable_by_its_key():
    v = Variable(np.zeros(2, np.float32))
    source = "checkpoint key 'v/.ATTRIBUTES/VARIABLE_VALUE' of /tmp/ckpt-1"
    with pytest.raises(ValueError) as info:
        v._check_restorable(np.zeros(2, np.float64), source)
    assert str(info.value).startswith(f"Received a value of dtype float64 from {source} when attempting to restore "
                                      "a variable of dtype float32")
    with pytest.raises(ValueError) as info:
        v._check_restorable(np.zeros(3, np.float32), source)
    assert str(info.value).endswith(f"and name Variable. The value is {source}.")
    np.testing.assert_array_equal(v.numpy(), [0.0, 0.0])


def test_checkpoint_attributes():
    v = Variable(1.0)
    assert v._checkpoint_attribute_names() == (VARIABLE_VALUE_KEY,)
    assert v._serialize_to_tensors() == {VARIABLE_VALUE_KEY: v}


def test_non_native_byte_order_is_normalised():
    v = Variable(np.array([1.0, 2.0], dtype=">f4"))
    assert v.dtype == np.dtype(np.float32) and v.dtype.isnative
    np.testing.assert_array_equal(v.numpy(), [1.0, 2.0])


def test_big_endian_variable_restores_little_endian_value():
    v = Variable(np.zeros(3, dtype=">f4"))
    v._restore_from_tensors({VARIABLE_VALUE_KEY: np.array([1.0, 2.0, 3.0], dtype="<f4")})
    np.testing.assert_array_equal(v.numpy(), [1.0, 2.0, 3.0])


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize == 8, reason="longdouble is float64 on this platform")
def test_dtype_the_format_cannot_store_refused_at_construction():
    with pytest.raises(TypeError, match="cannot be stored in a checkpoint"):
        Variable(np.zeros(2, dtype=np.longdouble))
    with pytest.raises(TypeError, match="cannot be stored in a checkpoint"):
        Variable([1.0, 2.0], dtype=np.longdouble)


# ---------------------------------------------------------------- conversions and arithmetic


def test_scalar_conversions():
    assert int(Variable(7)) == 7
    assert float(Variable(np.float32(0.5))) == 0.5
    assert bool(Variable(0)) is False and bool(Variable(3)) is True
    assert [10, 20, 30][Variable(1)] == 20  # __index__


def test_conversion_of_non_scalar_fails():
    with pytest.raises(TypeError):
        int(Variable([1, 2]))
    with pytest.raises(ValueError, match="ambiguous"):
        bool(Variable([1, 2]))


def test_np_asarray_gives_an_independent_copy():
    v = Variable([1, 2, 3])
    out = np.asarray(v)
    np.testing.assert_array_equal(out, [1, 2, 3])
    out[0] = 100
    assert v.numpy()[0] == 1
    as_float = np.asarray(v, dtype=np.float32)
    assert as_float.dtype == np.float32


def test_len_of_vector():
    assert len(Variable(np.zeros((4, 2)))) == 4


@pytest.mark.parametrize(
    "op, expected",
    [
        (lambda v: v + 1, [3.0, 5.0]),
        (lambda v: 1 + v, [3.0, 5.0]),
        (lambda v: v - 1, [1.0, 3.0]),
        (lambda v: 10 - v, [8.0, 6.0]),
        (lambda v: v * 2, [4.0, 8.0]),
        (lambda v: 2 * v, [4.0, 8.0]),
        (lambda v: v / 2, [1.0, 2.0]),
        (lambda v: 8 / v, [4.0, 2.0]),
        (lambda v: v**2, [4.0, 16.0]),
        (lambda v: -v, [-2.0, -4.0]),
        (lambda v: v + Variable([1.0, 1.0]), [3.0, 5.0]),
    ],
)
def test_arithmetic_returns_new_arrays(op, expected):
    v = Variable([2.0, 4.0])
    result = op(v)
    assert type(result) is np.ndarray
    np.testing.assert_array_equal(result, expected)
    assert not np.shares_memory(result, v._snapshot_array())
    np.testing.assert_array_equal(v.numpy(), [2.0, 4.0])


def test_matmul_and_comparisons():
    m = Variable(np.eye(2))
    np.testing.assert_array_equal(m @ np.array([1.0, 2.0]), [1.0, 2.0])
    np.testing.assert_array_equal(np.array([[1.0, 2.0]]) @ m, [[1.0, 2.0]])
    v = Variable([1, 5])
    np.testing.assert_array_equal(v < 3, [True, False])
    np.testing.assert_array_equal(v <= 1, [True, False])
    np.testing.assert_array_equal(v > 3, [False, True])
    np.testing.assert_array_equal(v >= 5, [False, True])


def test_variables_hash_by_identity():
    a, b = Variable(1), Variable(1)
    assert len({a, b, a}) == 2


# ---------------------------------------------------------------- copying


def test_deepcopy_gives_an_independent_variable():
    v = Variable(np.array([1.0, 2.0], np.float32), name="w", trainable=False)
    hook_calls = []
    v._add_mutation_hook(hook_calls.append)
    c = copy.deepcopy(v)
    assert c is not v and isinstance(c, Variable)
    assert (c.name, c.trainable, c.dtype, c.shape) == ("w", False, np.dtype(np.float32), (2,))
    assert c._unique_id != v._unique_id
    assert not np.shares_memory(c._snapshot_array(), v._snapshot_array())
    c.assign([5.0, 6.0])
    np.testing.assert_array_equal(v.numpy(), [1.0, 2.0])
    assert hook_calls == []  # hooks of the original do not follow the copy


def test_deepcopy_preserves_sharing_within_one_copy():
    v = Variable(1.0)
    pair = copy.deepcopy([v, v])
    assert pair[0] is pair[1] and pair[0] is not v


def test_pickling_refused():
    with pytest.raises(TypeError, match="cannot be pickled; save it with a Checkpoint"):
        pickle.dumps(Variable(1.0))


def test_wrap_refuses_host_arrays_naming_the_alternative():
    with pytest.raises(TypeError, match=r"Variable.wrap needs a GPU array .* got ndarray; use Variable\(value\)"):
        Variable.wrap(np.zeros(3))
    with pytest.raises(TypeError, match="got list"):
        Variable.wrap([1.0, 2.0])
