"""``AutoTrackable``: attribute assignment declares dependencies."""

from __future__ import annotations

from typing import Any

from asyncckpt.model.data_structures import sticky_attribute_assignment
from asyncckpt.model.trackable import NoDependency, Trackable

__all__ = ["AutoTrackable", "untracked_names"]

_UNTRACKED = "_self_untracked_names"


def _declare_untracked(obj: Trackable, name: str) -> None:
    """Remember that attribute ``name`` was assigned through ``NoDependency``: not saved on purpose."""
    obj.__dict__.setdefault(_UNTRACKED, set()).add(name)


def untracked_names(obj: Any) -> frozenset:
    """The attributes of ``obj`` assigned through ``NoDependency`` (the save-time warning skips them)."""
    return frozenset(getattr(obj, "__dict__", {}).get(_UNTRACKED, ()))


class AutoTrackable(Trackable):
    """A trackable that tracks trackables (and lists, dicts, tuples of them) assigned to attributes.

    Assigning a non-trackable value creates no dependency and leaves an earlier dependency with the
    same name in place; only ``del obj.name`` removes it (TensorFlow's sticky assignment). An array
    so assigned is not saved; a save logs that once per attribute unless it was assigned as
    ``NoDependency(value)``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_self_"):
            if isinstance(value, NoDependency):
                _declare_untracked(self, name)
            value = sticky_attribute_assignment(self, name, value)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        self._delete_tracking(name)
        self.__dict__.get(_UNTRACKED, set()).discard(name)
        super().__delattr__(name)
