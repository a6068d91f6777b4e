"""Optimizers whose slot variables (momentum, Adam moments) checkpoint with the variables they serve.

Slots are not dependencies: a slot belongs to the pair (optimizer, variable), and is saved only if
both are. On restore, a saved slot waits until both its variable and its optimizer are matched, then
``_create_or_restore_slot_variable`` creates it with the checkpoint value as its initial value
(restore-on-create) or restores the existing slot in place. Updates go through ``Variable.assign*``
so that a pending snapshot sees every change coming.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from asyncckpt import _arrays
from asyncckpt.model.autotrackable import AutoTrackable
from asyncckpt.checkpoint import add_variable
from asyncckpt.restore import CheckpointPosition, variable_from_position
from asyncckpt.model.trackable import structure_changed
from asyncckpt.model.variable import Variable

__all__ = ["Optimizer", "SGD", "Adam"]


class Optimizer(AutoTrackable):
    """Base class: hyperparameters and the step counter are variables; slots are per-variable state."""

    _SLOT_NAMES: tuple[str, ...] = ()
    #: Every slot this class creates calls ``structure_changed()``, so a checkpoint may cache the
    #: slot layout of its graph (third-party slot providers without this promise are re-walked).
    _tracks_slot_changes = True

    def __init__(self, **hyperparameters: float):
        self._maybe_initialize_trackable()
        object.__setattr__(self, "_self_hyper_values", dict(hyperparameters))
        object.__setattr__(self, "_self_hyper", {})
        object.__setattr__(self, "_self_slots", {})
        object.__setattr__(self, "_self_deferred_slot_restorations", {})
        object.__setattr__(self, "_self_iterations", None)

    # ------------------------------------------------------------------ state variables
    @property
    def iterations(self) -> Variable:
        """The number of ``apply_gradients`` calls (checkpoint key ``.../iter``)."""
        if self._self_iterations is None:
            iterations = add_variable(self, "iter", shape=(), initializer=0, dtype=np.int64, trainable=False)
            object.__setattr__(self, "_self_iterations", iterations)
        return self._self_iterations

    def _hyper(self, name: str) -> Variable:
        if name not in self._self_hyper:
            value = self._self_hyper_values[name]
            self._self_hyper[name] = add_variable(self, name, shape=(), initializer=value, dtype=np.float32,
                                                  trainable=False)
        return self._self_hyper[name]

    def _hyper_value(self, name: str) -> float:
        return float(self._hyper(name))

    # ------------------------------------------------------------------ slot protocol
    def get_slot_names(self) -> list[str]:
        return list(self._SLOT_NAMES)

    def get_slot(self, var: Variable, slot_name: str) -> Variable | None:
        return self._self_slots.get(getattr(var, "_unique_id", None), {}).get(slot_name)

    def add_slot(self, var: Variable, slot_name: str) -> Variable:
        """The slot ``slot_name`` of ``var``, created (zeros, or a queued checkpoint value) if missing."""
        slots = self._self_slots.setdefault(var._unique_id, {})
        slot = slots.get(slot_name)
        if slot is not None:
            return slot
        queued = self._self_deferred_slot_restorations.get(slot_name, {}).get(var._unique_id, [])
        newest = max(queued, key=lambda p: p.restore_uid) if queued else None
        if newest is not None and newest.is_simple_variable():
            slot = variable_from_position(newest, name=f"{var.name}/{slot_name}", trainable=False, device=var.device,
                                          like=var)
        else:
            module = _arrays.array_module(var._snapshot_array())
            slot = Variable(module.zeros(var.shape, dtype=var.dtype), name=f"{var.name}/{slot_name}", trainable=False,
                            device=var.device)  # on the variable's own device, not the current one
        slots[slot_name] = slot
        structure_changed(self)
        self._restore_slot_variable(slot_name, var, slot)
        return slot

    def _restore_slot_variable(self, slot_name: str, var: Variable, slot: Variable) -> None:
        positions = self._self_deferred_slot_restorations.get(slot_name, {}).pop(var._unique_id, [])
        for position in sorted(positions, key=lambda p: p.restore_uid, reverse=True):
            position.restore(slot)

    def _create_or_restore_slot_variable(self, slot_variable_position: CheckpointPosition, slot_name: str,
                                         variable: Variable) -> None:
        """Called by the restore engine when a saved slot meets its variable and this optimizer."""
        slot = self.get_slot(variable, slot_name)
        if slot is None and slot_variable_position.is_simple_variable() and isinstance(variable, Variable):
            slot = variable_from_position(
                slot_variable_position, name=f"{variable.name}/{slot_name}", trainable=False, device=variable.device,
                like=variable,
            )
            self._self_slots.setdefault(variable._unique_id, {})[slot_name] = slot
            structure_changed(self)
        if slot is not None:
            slot_variable_position.restore(slot)
        else:
            self._self_deferred_slot_restorations.setdefault(slot_name, {}).setdefault(
                getattr(variable, "_unique_id", id(variable)), []
            ).append(slot_variable_position)

    # ------------------------------------------------------------------ training
    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, Variable]]) -> Variable:
        """Apply one update per (gradient, variable) pair; pairs with a ``None`` gradient are skipped."""
        pairs = [(grad, var) for grad, var in grads_and_vars if grad is not None]
        if not pairs:
            raise ValueError("No gradients provided for any variable.")
        checked = []
        for grad, var in pairs:  # validate everything before changing anything
            if not isinstance(var, Variable):
                raise TypeError(f"apply_gradients expects asyncckpt.Variable objects, got {type(var).__name__}")
            if not var.trainable:
                raise ValueError(f"variable {var.name!r} is not trainable")
            grad = _arrays.array_module(var._snapshot_array()).asarray(grad, dtype=var.dtype)
            if grad.shape != var.shape:
                raise ValueError(
                    f"gradient of shape {grad.shape} does not match variable {var.name!r} of shape {var.shape}"
                )
            checked.append((grad, var))
        for name in self._self_hyper_values:
            self._hyper(name)
        step = int(self.iterations) + 1
        for grad, var in checked:
            for slot_name in self._SLOT_NAMES:
                self.add_slot(var, slot_name)
            self._apply_dense(grad, var, step)
        self.iterations.assign_add(1)
        return self.iterations

    def _apply_dense(self, grad: Any, var: Variable, step: int) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum; slot ``momentum``."""

    def __init__(self, learning_rate: float = 0.01, momentum: float = 0.0, nesterov: bool = False):
        if momentum < 0 or momentum > 1:
            raise ValueError(f"momentum must be between 0 and 1, got {momentum}")
        super().__init__(learning_rate=learning_rate, momentum=momentum)
        object.__setattr__(self, "_self_nesterov", bool(nesterov))
        object.__setattr__(self, "_self_use_momentum", momentum > 0)

    @property
    def _SLOT_NAMES(self) -> tuple[str, ...]:  # noqa: N802 - mirrors the class attribute
        return ("momentum",) if self._self_use_momentum else ()

    def _apply_dense(self, grad: Any, var: Variable, step: int) -> None:
        lr = self._hyper_value("learning_rate")
        if not self._self_use_momentum:
            var.assign_sub(lr * grad)
            return
        momentum = self._hyper_value("momentum")
        velocity = self.get_slot(var, "momentum")
        velocity.assign(momentum * velocity.array - lr * grad)
        if self._self_nesterov:
            var.assign_add(momentum * velocity.array - lr * grad)
        else:
            var.assign_add(velocity.array)


class Adam(Optimizer):
    """Adam (Kingma & Ba); slots ``m`` and ``v``."""

    _SLOT_NAMES = ("m", "v")

    def __init__(self, learning_rate: float = 0.001, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7):
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2)
        object.__setattr__(self, "_self_epsilon", float(epsilon))

    def _apply_dense(self, grad: Any, var: Variable, step: int) -> None:
        lr = self._hyper_value("learning_rate")
        beta_1 = self._hyper_value("beta_1")
        beta_2 = self._hyper_value("beta_2")
        m = self.get_slot(var, "m")
        v = self.get_slot(var, "v")
        m.assign(beta_1 * m.array + (1 - beta_1) * grad)
        v.assign(beta_2 * v.array + (1 - beta_2) * grad * grad)
        lr_t = lr * math.sqrt(1 - beta_2**step) / (1 - beta_1**step)
        xp = _arrays.array_module(var._snapshot_array())
        var.assign_sub(lr_t * m.array / (xp.sqrt(v.array) + self._self_epsilon))
