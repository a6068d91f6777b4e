"""Unit tests for ``asyncckpt.optimizers``: SGD and Adam against NumPy references, slots and state.

The references below are the textbook update rules, written independently of the module:
SGD with (Nesterov) momentum as in Keras, and Adam in the "epsilon hat" form that TensorFlow
documents (epsilon added to ``sqrt(v)`` before bias correction of the step size).
"""

from __future__ import annotations

import numpy as np
import pytest

from asyncckpt.optimizers import SGD, Adam, Optimizer
from asyncckpt.model.trackable import Trackable
from asyncckpt.model.variable import Variable

STEPS = 6


def as_f32(value: float) -> float:
    """Hyperparameters are stored as float32 variables; the references use the same rounded values."""
    return float(np.float32(value))


def gradient_sequence(shape, steps=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(steps)]


def sgd_reference(w0, grads, lr, momentum=0.0, nesterov=False):
    w = np.array(w0, dtype=np.float64)
    velocity = np.zeros_like(w)
    for g in grads:
        if momentum == 0.0:
            w = w - lr * g
            continue
        velocity = momentum * velocity - lr * g
        w = w + (momentum * velocity - lr * g if nesterov else velocity)
    return w, velocity


def adam_reference(w0, grads, lr, beta_1, beta_2, epsilon):
    w = np.array(w0, dtype=np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        step_size = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        w = w - step_size * m / (np.sqrt(v) + epsilon)
    return w, m, v


def tolerance(dtype):
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-14}


def run(optimizer, variable, grads):
    for g in grads:
        optimizer.apply_gradients([(g, variable)])


# ---------------------------------------------------------------- SGD


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "momentum, nesterov", [(0.0, False), (0.9, False), (0.5, True)], ids=["plain", "momentum", "nesterov"]
)
def test_sgd_matches_reference(dtype, momentum, nesterov):
    w0 = np.linspace(-1.0, 1.0, 6).reshape(2, 3)
    grads = gradient_sequence((2, 3))
    variable = Variable(w0, dtype=dtype)
    optimizer = SGD(learning_rate=0.05, momentum=momentum, nesterov=nesterov)
    run(optimizer, variable, grads)
    expected, velocity = sgd_reference(w0, grads, as_f32(0.05), as_f32(momentum), nesterov)
    np.testing.assert_allclose(variable.numpy(), expected, **tolerance(dtype))
    assert variable.dtype == dtype
    if momentum:
        np.testing.assert_allclose(optimizer.get_slot(variable, "momentum").numpy(), velocity, **tolerance(dtype))


def test_sgd_nesterov_differs_from_plain_momentum():
    grads = gradient_sequence((3,))
    plain, nesterov = Variable(np.zeros(3)), Variable(np.zeros(3))
    run(SGD(0.1, momentum=0.9), plain, grads)
    run(SGD(0.1, momentum=0.9, nesterov=True), nesterov, grads)
    assert not np.allclose(plain.numpy(), nesterov.numpy())


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_sgd_momentum_out_of_range(momentum):
    with pytest.raises(ValueError, match=f"momentum must be between 0 and 1, got {momentum}"):
        SGD(momentum=momentum)


def test_sgd_slot_names():
    assert SGD().get_slot_names() == []
    assert SGD(momentum=0.5).get_slot_names() == ["momentum"]


# ---------------------------------------------------------------- Adam


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "hyper",
    [{}, {"learning_rate": 0.01, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 0.1}],
    ids=["defaults", "custom-large-epsilon"],
)
def test_adam_matches_reference(dtype, hyper):
    w0 = np.linspace(0.5, 2.0, 4)
    grads = gradient_sequence((4,), seed=1)
    variable = Variable(w0, dtype=dtype)
    optimizer = Adam(**hyper)
    run(optimizer, variable, grads)
    lr = as_f32(hyper.get("learning_rate", 0.001))
    beta_1 = as_f32(hyper.get("beta_1", 0.9))
    beta_2 = as_f32(hyper.get("beta_2", 0.999))
    epsilon = hyper.get("epsilon", 1e-7)  # a Python float on the optimizer, not a variable
    expected, m, v = adam_reference(w0, grads, lr, beta_1, beta_2, epsilon)
    np.testing.assert_allclose(variable.numpy(), expected, **tolerance(dtype))
    np.testing.assert_allclose(optimizer.get_slot(variable, "m").numpy(), m, **tolerance(dtype))
    np.testing.assert_allclose(optimizer.get_slot(variable, "v").numpy(), v, **tolerance(dtype))
    assert variable.dtype == dtype


def test_adam_first_step_moves_each_weight_by_about_the_learning_rate():
    # With zero moments and bias correction, the first Adam step is lr * sign(g) (up to epsilon).
    variable = Variable(np.zeros(3))
    Adam(learning_rate=0.5).apply_gradients([(np.array([3.0, -0.2, 0.05]), variable)])
    np.testing.assert_allclose(variable.numpy(), [-0.5, 0.5, -0.5], rtol=1e-3)


def test_two_variables_in_one_call_have_their_own_slots():
    a, b = Variable(np.zeros(2)), Variable(np.zeros(3))
    grads_a, grads_b = gradient_sequence((2,), seed=2), gradient_sequence((3,), seed=3)
    optimizer = Adam(learning_rate=0.01)
    for ga, gb in zip(grads_a, grads_b):
        optimizer.apply_gradients([(ga, a), (gb, b)])
    np.testing.assert_allclose(a.numpy(), adam_reference(np.zeros(2), grads_a, as_f32(0.01), as_f32(0.9),
                                                         as_f32(0.999), 1e-7)[0], rtol=1e-12)
    np.testing.assert_allclose(b.numpy(), adam_reference(np.zeros(3), grads_b, as_f32(0.01), as_f32(0.9),
                                                         as_f32(0.999), 1e-7)[0], rtol=1e-12)
    assert optimizer.get_slot(a, "m") is not optimizer.get_slot(b, "m")
    assert int(optimizer.iterations) == STEPS


# ---------------------------------------------------------------- slots


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_slots_created_lazily_with_variable_shape_and_dtype(dtype):
    variable = Variable(np.ones((2, 5), dtype=dtype), name="kernel")
    optimizer = Adam()
    assert optimizer.get_slot(variable, "m") is None and optimizer.get_slot(variable, "v") is None
    optimizer.apply_gradients([(np.ones((2, 5)), variable)])
    for name in ("m", "v"):
        slot = optimizer.get_slot(variable, name)
        assert isinstance(slot, Variable)
        assert (slot.shape, slot.dtype, slot.trainable) == ((2, 5), np.dtype(dtype), False)
        assert slot.name == f"kernel/{name}"
    first = optimizer.get_slot(variable, "m")
    optimizer.apply_gradients([(np.ones((2, 5)), variable)])
    assert optimizer.get_slot(variable, "m") is first


def test_slots_start_at_zero():
    variable = Variable(np.zeros(2))
    optimizer = SGD(learning_rate=1.0, momentum=0.5)
    optimizer.apply_gradients([(np.array([1.0, 2.0]), variable)])
    # velocity = 0.5 * 0 - 1.0 * g: any non-zero initial slot would show here.
    np.testing.assert_array_equal(optimizer.get_slot(variable, "momentum").numpy(), [-1.0, -2.0])


def test_add_slot_creates_zeros_and_is_idempotent():
    variable = Variable(np.ones(3, np.float32))
    optimizer = Adam()
    slot = optimizer.add_slot(variable, "m")
    np.testing.assert_array_equal(slot.numpy(), np.zeros(3, np.float32))
    assert optimizer.add_slot(variable, "m") is slot
    assert optimizer.get_slot(variable, "m") is slot


def test_get_slot_for_unknown_variables_and_names():
    variable = Variable(np.zeros(2))
    other = Variable(np.zeros(2))
    optimizer = Adam()
    optimizer.apply_gradients([(np.ones(2), variable)])
    assert optimizer.get_slot(other, "m") is None
    assert optimizer.get_slot(variable, "momentum") is None
    assert optimizer.get_slot(np.zeros(2), "m") is None
    assert optimizer.get_slot(Trackable(), "m") is None


def test_slots_are_not_dependencies():
    variable = Variable(np.zeros(2))
    optimizer = Adam()
    optimizer.apply_gradients([(np.ones(2), variable)])
    assert optimizer.get_slot(variable, "m") not in optimizer._trackable_children().values()


# ---------------------------------------------------------------- iterations and hyperparameters


def test_iterations_counts_calls_not_variables():
    a, b = Variable(np.zeros(2)), Variable(np.zeros(2))
    optimizer = SGD(0.1)
    assert int(optimizer.iterations) == 0
    for step in range(1, 4):
        returned = optimizer.apply_gradients([(np.ones(2), a), (np.ones(2), b)])
        assert returned is optimizer.iterations
        assert int(optimizer.iterations) == step
    iterations = optimizer.iterations
    assert (iterations.dtype, iterations.shape, iterations.trainable) == (np.dtype(np.int64), (), False)


def test_state_variables_are_created_lazily():
    optimizer = SGD(0.1)
    assert optimizer._trackable_children() == {}
    counter = optimizer.iterations
    assert optimizer.iterations is counter
    assert optimizer._trackable_children() == {"iter": counter}


@pytest.mark.parametrize(
    "optimizer, expected",
    [
        (SGD(learning_rate=0.25, momentum=0.5), {"learning_rate": 0.25, "momentum": 0.5, "iter": 1}),
        (Adam(learning_rate=0.5, beta_1=0.75, beta_2=0.875, epsilon=1e-3),
         {"learning_rate": 0.5, "beta_1": 0.75, "beta_2": 0.875, "iter": 1}),
    ],
    ids=["SGD", "Adam"],
)
def test_hyperparameters_are_tracked_variables(optimizer, expected):
    optimizer.apply_gradients([(np.ones(2), Variable(np.zeros(2)))])
    children = optimizer._trackable_children()
    assert list(children) == list(expected)  # no epsilon variable: it stays a Python float
    for name, value in expected.items():
        variable = children[name]
        assert isinstance(variable, Variable) and variable.trainable is False
        assert float(variable) == value
        assert variable.dtype == (np.int64 if name == "iter" else np.float32)


def test_hyperparameter_variables_drive_the_update():
    variable = Variable(np.zeros(2))
    optimizer = SGD(learning_rate=0.1)
    optimizer.apply_gradients([(np.ones(2), variable)])
    optimizer._lookup_dependency("learning_rate").assign(1.0)
    optimizer.apply_gradients([(np.ones(2), variable)])
    np.testing.assert_allclose(variable.numpy(), [-1.1, -1.1], rtol=1e-6)


def test_base_optimizer_has_no_update_rule():
    class Bare(Optimizer):
        pass

    with pytest.raises(NotImplementedError):
        Bare().apply_gradients([(np.ones(1), Variable(np.zeros(1)))])


# ---------------------------------------------------------------- apply_gradients input checks


def test_none_gradients_are_skipped():
    a, b = Variable(np.ones(2)), Variable(np.ones(2))
    optimizer = Adam()
    optimizer.apply_gradients([(None, a), (np.ones(2), b)])
    np.testing.assert_array_equal(a.numpy(), [1.0, 1.0])
    assert optimizer.get_slot(a, "m") is None
    assert not np.array_equal(b.numpy(), [1.0, 1.0])
    assert int(optimizer.iterations) == 1


def test_accepts_iterators_lists_and_variables_as_gradients():
    variable = Variable(np.zeros(2))
    gradient = Variable(np.array([1.0, 2.0]))
    optimizer = SGD(learning_rate=1.0)
    optimizer.apply_gradients(zip([gradient], [variable]))
    optimizer.apply_gradients(iter([([1.0, 1.0], variable)]))
    np.testing.assert_array_equal(variable.numpy(), [-2.0, -3.0])


def test_gradient_cast_to_variable_dtype():
    variable = Variable(np.zeros(2, np.float32))
    SGD(learning_rate=0.5).apply_gradients([(np.array([1.0, 2.0], np.float64), variable)])
    assert variable.dtype == np.float32
    np.testing.assert_array_equal(variable.numpy(), np.array([-0.5, -1.0], np.float32))


def test_non_trainable_variable_rejected_before_any_change():
    trainable = Variable(np.zeros(2), name="ok")
    frozen = Variable(np.zeros(2), name="frozen", trainable=False)
    optimizer = SGD(0.1, momentum=0.9)
    with pytest.raises(ValueError, match="variable 'frozen' is not trainable"):
        optimizer.apply_gradients([(np.ones(2), trainable), (np.ones(2), frozen)])
    np.testing.assert_array_equal(trainable.numpy(), [0.0, 0.0])
    assert optimizer.get_slot(trainable, "momentum") is None
    assert int(optimizer.iterations) == 0


@pytest.mark.parametrize("target", [np.zeros(2), [0.0, 0.0], Trackable()], ids=["ndarray", "list", "trackable"])
def test_non_variable_target_rejected(target):
    variable = Variable(np.zeros(2))
    optimizer = SGD(0.1)
    with pytest.raises(TypeError, match=f"apply_gradients expects asyncckpt.Variable objects, got "
                                        f"{type(target).__name__}"):
        optimizer.apply_gradients([(np.ones(2), variable), (np.ones(2), target)])
    np.testing.assert_array_equal(variable.numpy(), [0.0, 0.0])


@pytest.mark.parametrize("gradient", [np.ones(3), np.ones((2, 1)), 1.0], ids=["longer", "2d", "scalar"])
def test_gradient_shape_mismatch_rejected(gradient):
    variable = Variable(np.zeros(2), name="w")
    optimizer = SGD(0.1)
    with pytest.raises(ValueError, match=r"gradient of shape .* does not match variable 'w' of shape \(2,\)"):
        optimizer.apply_gradients([(gradient, variable)])
    np.testing.assert_array_equal(variable.numpy(), [0.0, 0.0])
    assert int(optimizer.iterations) == 0


def test_shape_mismatch_on_a_later_pair_changes_nothing():
    first, second = Variable(np.zeros(2)), Variable(np.zeros(3))
    optimizer = SGD(0.1, momentum=0.9)
    with pytest.raises(ValueError, match="does not match"):
        optimizer.apply_gradients([(np.ones(2), first), (np.ones(2), second)])
    np.testing.assert_array_equal(first.numpy(), [0.0, 0.0])
    assert optimizer.get_slot(second, "momentum") is None
