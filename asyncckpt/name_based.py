"""Restoring a name-based (TensorFlow 1) checkpoint: no object graph, so each variable by its name.

``tf.compat.v1.train.Saver`` checkpoints key every value by its variable's name. Their restore
shares nothing with the object-graph matching of :mod:`asyncckpt.restore` but its step protocol
(one :class:`~asyncckpt.restore.ReadRequest`, served blocking or awaited) and the variables'
restore hooks; its status is TensorFlow's ``NameBasedSaverStatus``.
"""

from __future__ import annotations

from typing import Any

from asyncckpt.graph import GraphView, list_objects
from asyncckpt.model.variable import VARIABLE_VALUE_KEY, Variable
from asyncckpt.restore import ReadRequest, RestoreSteps

__all__ = ["NameBasedSaverStatus", "restore_by_names"]


def restore_by_names(view: GraphView, reader: Any, optional: tuple = ()) -> RestoreSteps:
    """Restore a name-based (TF1 ``tf.compat.v1.train.Saver``) checkpoint: each variable by its name.

    A checkpoint without an object graph names its values by the variables' names
    (``layer/weights``, TensorFlow's ``variable.name`` without ``:0``); every variable of the
    object graph whose name is a key of the checkpoint takes that value (dtype and shape checked
    first, nothing changed on a mismatch), the others are left as they are; the ``optional``
    ones (a ``save_counter``, which TF1 checkpoints do not have) are not missed by the status.
    Steps, like every restore: one :class:`ReadRequest`. Returns the :class:`NameBasedSaverStatus`.
    """
    keys = reader.key_set()
    matched: dict[str, Variable] = {}
    unmatched: list[Variable] = []
    for obj in list_objects(view):
        if not isinstance(obj, Variable):
            continue
        name = obj.name.split(":")[0]
        if name in keys and name not in matched:
            obj._check_restorable(reader.spec(name), f"checkpoint key {name!r} of {reader.path}")
            matched[name] = obj
        elif not any(obj is skipped for skipped in optional):
            unmatched.append(obj)
    destinations = {}
    for name, variable in matched.items():
        destination = variable._restore_destination(VARIABLE_VALUE_KEY, reader.spec(name))
        if destination is not None:
            destinations[name] = destination
    values = (yield ReadRequest(reader, list(matched), destinations)) if matched else {}
    for name, variable in matched.items():
        variable._restore_from_tensors({VARIABLE_VALUE_KEY: values[name]})
    return NameBasedSaverStatus(reader.path, list(matched), unmatched)


class NameBasedSaverStatus:
    """What restoring a name-based (TF1) checkpoint returns, as TensorFlow's status of that name.

    There is no object graph to match, so the assertions ask only whether every variable of the
    object graph found its name in the checkpoint.
    """

    def __init__(self, path: str, restored: list[str], unmatched: list[Any]):
        self._path = path
        self.restored_names = tuple(restored)
        self._unmatched = unmatched

    def assert_consumed(self) -> "NameBasedSaverStatus":
        if self._unmatched:
            names = ", ".join(repr(variable.name) for variable in self._unmatched[:10])
            raise AssertionError(
                f"Some objects had attributes which were not restored: {len(self._unmatched)} variable(s) have no "
                f"value under their name in the name-based checkpoint {self._path}: {names}"
            )
        return self

    def assert_existing_objects_matched(self) -> "NameBasedSaverStatus":
        return self.assert_consumed()

    def assert_nontrivial_match(self) -> "NameBasedSaverStatus":
        if not self.restored_names:
            raise AssertionError(f"No variable's name matched a value of the name-based checkpoint {self._path}")
        return self

    def run_restore_ops(self, session: Any = None) -> None:
        """The values are restored already (eagerly); nothing to run."""

    def initialize_or_restore(self, session: Any = None) -> None:
        """The values are restored already (eagerly); nothing to run."""

    def expect_partial(self) -> "NameBasedSaverStatus":
        return self
