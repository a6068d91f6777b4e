"""``PythonState``: non-array state (an RNG state, a data-loader position) saved as one string."""

from __future__ import annotations

import abc
from typing import Any

from asyncckpt.model.trackable import Trackable

__all__ = ["PythonState", "PYTHON_STATE_KEY"]

PYTHON_STATE_KEY = "py_state"


class PythonState(Trackable, metaclass=abc.ABCMeta):
    """Subclass and implement ``serialize`` and ``deserialize``.

    The value of ``serialize()`` is taken when ``save()`` is called and stored under the attribute
    ``py_state``; on restore ``deserialize(value)`` is called with the stored bytes as soon as the
    object is matched (immediately, or when it is attached later). The stored value is data only:
    it is never unpickled or evaluated by asyncckpt.
    """

    @abc.abstractmethod
    def serialize(self) -> str | bytes:
        """Return the state as a string or bytes."""

    @abc.abstractmethod
    def deserialize(self, string_value: bytes) -> None:
        """Set the state from the bytes ``serialize`` produced."""

    def _serialize_to_tensors(self) -> dict[str, Any]:
        value = self.serialize()
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"{type(self).__name__}.serialize() must return str or bytes, got {type(value).__name__}"
            )
        return {PYTHON_STATE_KEY: bytes(value)}

    def _checkpoint_attribute_names(self) -> tuple[str, ...]:
        return (PYTHON_STATE_KEY,)

    def _restore_from_tensors(self, restored_tensors: dict[str, Any]) -> None:
        value = restored_tensors[PYTHON_STATE_KEY]
        if not isinstance(value, bytes):
            raise ValueError(
                f"{type(self).__name__} expected a byte string for attribute {PYTHON_STATE_KEY!r}, "
                f"got an array of dtype {getattr(value, 'dtype', type(value).__name__)}"
            )
        self.deserialize(value)
