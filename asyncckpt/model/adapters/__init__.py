"""Framework state as trackables: PyTorch modules and optimizers, JAX pytrees, anything with ``state_dict``.

``Checkpoint(model=model, optimizer=optimizer)`` and attribute assignment call :func:`adapt` on
every value that is not a trackable. It answers with the trackable that saves and restores the
value, or ``None`` (the value stays unsaved, as TensorFlow does for plain Python values):

* a value of a framework's own types (its module is ``torch``, ``jax``, ``flax``, ``optax``...) is
  handed to that framework's adapter module, imported only then -- the core never imports a
  framework itself;
* a ``dict``/``list``/``tuple`` whose leaves hold framework arrays (and no modules, optimizers or
  trackables, which are tracked one by one) becomes a :class:`PyTree`;
* any object with ``state_dict()`` and ``load_state_dict()`` (the protocol PyTorch's distributed
  checkpoint calls *Stateful*) becomes a :class:`StateDict`.

The framework modules turn their arrays into the leaves the rest of the package handles (see
:mod:`asyncckpt.model.adapters.leaves`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from asyncckpt.model.adapters import leaves
from asyncckpt.model.adapters.pytree import PyTree
from asyncckpt.model.adapters.stateful import StateDict
from asyncckpt.model.trackable import Trackable

__all__ = ["Adapted", "PyTree", "StateDict", "adapt", "holds_state_objects", "is_stateful"]


class Adapted(NamedTuple):
    """What :func:`adapt` found: the trackable to track, and the value the attribute keeps.

    A stateful object stays the attribute's value (it is restored in place); a tree's attribute
    becomes its :class:`PyTree` holder, whose ``value`` is the restored tree.
    """

    trackable: Any
    stored: Any


def is_stateful(value: Any) -> bool:
    """Whether ``value`` has callable ``state_dict()`` and ``load_state_dict()``."""
    kind = type(value)
    return callable(getattr(kind, "state_dict", None)) and callable(getattr(kind, "load_state_dict", None))


def _is_state_object(value: Any) -> bool:
    return isinstance(value, Trackable) or is_stateful(value)


def holds_state_objects(tree: Any) -> bool:
    """Whether a nest holds trackables or stateful objects (a module, an optimizer).

    Such a nest is a container of objects, each tracked on its own, not one tree of arrays: a
    ``{"model": model, "step": tensor}`` dict tracks the model's adapter and the tensor's tree.
    """
    return leaves.any_in_nest(tree, _is_state_object)


def adapt(value: Any) -> Adapted | None:
    """The trackable standing for framework state ``value``, or ``None`` for anything else."""
    framework = leaves.framework_of(value)
    if framework is not None:
        trackable = framework.adapt(value)
        if trackable is not None:
            return Adapted(trackable, trackable if isinstance(trackable, PyTree) else value)
    if type(value) in (dict, list, tuple) or leaves.is_namedtuple(value):
        if leaves.holds_framework_arrays(value) and not holds_state_objects(value):
            tree = PyTree(value)
            return Adapted(tree, tree)
        return None
    if is_stateful(value):
        return Adapted(StateDict(value), value)
    return None
