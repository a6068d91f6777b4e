"""``AutoTrackable``: attribute assignment declares dependencies."""

from __future__ import annotations

from typing import Any

from asyncckpt.model.data_structures import sticky_attribute_assignment
from asyncckpt.model.trackable import Trackable

__all__ = ["AutoTrackable"]


class AutoTrackable(Trackable):
    """A trackable that tracks trackables (and lists, dicts, tuples of them) assigned to attributes.

    Assigning a non-trackable value creates no dependency and leaves an earlier dependency with the
    same name in place; only ``del obj.name`` removes it (TensorFlow's sticky assignment).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_self_"):
            value = sticky_attribute_assignment(self, name, value)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        self._delete_tracking(name)
        super().__delattr__(name)
