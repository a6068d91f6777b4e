"""Tracking of lists, dicts and tuples assigned to trackable objects.

A plain ``list``/``dict`` assigned to an ``AutoTrackable`` is wrapped so that trackables put into it
become dependencies named by list index or dict key. The wrappers share storage with the object the
user assigned, as TensorFlow's do, so changes made behind the wrapper's back are detected and make
the container unsaveable rather than silently saving something else.

Lists are append-only for checkpointing: replacing, deleting or moving a trackable element breaks
restore-on-create (a restored value is matched by position), so such a list refuses to be saved.
"""

from __future__ import annotations

import collections
import collections.abc
import copy
from typing import Any

from asyncckpt.model import adapters
from asyncckpt.model.trackable import NoDependency, Trackable, structure_changed

__all__ = [
    "TrackableDataStructure",
    "ListWrapper",
    "DictWrapper",
    "TupleWrapper",
    "wrap_or_unwrap",
    "sticky_attribute_assignment",
]


def wrap_or_unwrap(value: Any) -> Any:
    """Unwrap ``NoDependency``; wrap lists, dicts and tuples that may hold trackables.

    A container of framework arrays (a dict of torch tensors, a JAX parameter tree) and holding
    no trackable becomes a :class:`~asyncckpt.model.adapters.PyTree` instead: it is saved whole
    and the user's container is left as it is.
    """
    if isinstance(value, NoDependency):
        return value.value
    if isinstance(value, Trackable):
        return value
    if type(value) in _CONTAINERS and adapters.leaves.holds_framework_arrays(value) and not adapters.holds_state_objects(value):
        return adapters.PyTree(value)
    if type(value) is list:
        return ListWrapper(value)
    if type(value) in (dict, collections.OrderedDict):
        return DictWrapper(value)
    if isinstance(value, tuple) and _should_wrap_tuple(value):
        return TupleWrapper(value)
    return value


def sticky_attribute_assignment(trackable: Trackable, name: str, value: Any) -> Any:
    """Track ``value`` under ``name`` if it is (or wraps into) a trackable; return what to store.

    Framework state (a torch module or optimizer, anything with ``state_dict``) is tracked
    through its adapter while the attribute keeps the object itself. Other non-trackable values
    create no dependency and do not remove an earlier one of the same name.
    """
    return _track_as(trackable, name, value, in_container=False)


def _track_as(trackable: Trackable, name: str, value: Any, *, in_container: bool) -> Any:
    """Track ``value`` (or the trackable it wraps or adapts into) as ``name``; return what to store.

    A container element keeps the user's own value even when it is framework state (the user's
    list or dict is shared with the wrapper and must not change); an attribute holding a tree of
    framework arrays becomes its ``PyTree`` holder, whose ``value`` is what a restore builds.
    """
    add_dependency = not isinstance(value, NoDependency)
    original = value
    value = wrap_or_unwrap(value)
    if not add_dependency:
        return value
    if isinstance(value, Trackable):
        trackable._track_trackable(value, name=name, overwrite=True)
        if in_container and isinstance(value, adapters.PyTree) and value is not original:
            value.restores_into(trackable, name)
            return original
        return value
    adapted = adapters.adapt(value)
    if adapted is not None:
        trackable._track_trackable(adapted.trackable, name=name, overwrite=True)
        if not in_container:
            return adapted.stored
        if isinstance(adapted.trackable, adapters.PyTree):
            adapted.trackable.restores_into(trackable, name)
        return value
    return value


def adapted_element(value: Any) -> Trackable | None:
    """The trackable a container element stands for: itself, its wrapper, or its adapter (else None)."""
    if isinstance(value, Trackable):
        return value
    adapted = adapters.adapt(value)
    return adapted.trackable if adapted is not None else None


_CONTAINERS = (dict, collections.OrderedDict, list, tuple)


def _should_wrap_tuple(value: tuple) -> bool:
    for element in value:
        if isinstance(element, NoDependency):
            return True
        if isinstance(element, Trackable) or type(element) in (list, dict, collections.OrderedDict):
            return True
        if isinstance(element, tuple) and _should_wrap_tuple(element):
            return True
    return False


class TrackableDataStructure(Trackable):
    """Base of the container wrappers; containers own no attributes of their own."""

    def _track_value(self, value: Any, name: str) -> Any:
        return _track_as(self, name, value, in_container=True)

    def _element_restored(self, name: str, before: Any, after: Any) -> None:
        """Put a restored framework value (a new JAX tree) where the user's container held ``before``.

        The element tracked as ``name`` is replaced only while it is still ``before``; the
        wrapper's record of its contents follows, so the change is not taken for an outside one.
        """
        storage = self._storage
        try:
            key = int(name) if isinstance(storage, list) else name
            if storage[key] is not before:
                return
        except (KeyError, IndexError, ValueError):
            return
        storage[key] = after
        self._update_snapshot()


class ListWrapper(TrackableDataStructure, collections.abc.MutableSequence, list):
    """A list whose trackable elements are dependencies named ``"0"``, ``"1"``, … by position."""

    def __init__(self, wrapped_list: list | None = None):
        self._maybe_initialize_trackable()
        storage = wrapped_list if wrapped_list is not None else []
        object.__setattr__(self, "_storage", storage)
        object.__setattr__(self, "_non_append_mutation", False)
        object.__setattr__(self, "_external_modification", False)
        for index, element in enumerate(storage):
            storage[index] = self._track_value(element, str(index))
        self._update_snapshot()

    # --------------------------------------------------------------- bookkeeping
    def _update_snapshot(self) -> None:
        # Mirror the storage into the list base so that C-level consumers (json, numpy) see it.
        list.__setitem__(self, slice(None), self._storage)
        if self._external_modification or self._non_append_mutation:
            return
        object.__setattr__(self, "_last_wrapped_list_snapshot", list(self._storage))

    def _check_external_modification(self) -> None:
        if self._external_modification or self._non_append_mutation:
            return
        snapshot = self._last_wrapped_list_snapshot
        if len(snapshot) != len(self._storage) or any(a is not b for a, b in zip(snapshot, self._storage)):
            object.__setattr__(self, "_external_modification", True)
            structure_changed(self)

    def _flag_if_trackable(self, *values: Any) -> None:
        if any(isinstance(v, (Trackable, NoDependency)) for v in values):
            object.__setattr__(self, "_non_append_mutation", True)
            structure_changed(self)

    def _retrack_all(self) -> None:
        """Re-derive dependencies from positions after a non-append mutation."""
        self._self_dependencies.clear()
        for index, element in enumerate(self._storage):
            if isinstance(element, Trackable):
                self._self_dependencies[str(index)] = element
        structure_changed(self)

    def _trackable_children(self) -> dict[str, Trackable]:
        self._check_external_modification()
        if self._non_append_mutation:
            raise ValueError(
                f"Unable to save the object {self!r} (a list wrapper constructed to track trackable "
                "TensorFlow objects). A list element was replaced (__setitem__, __setslice__), deleted "
                "(__delitem__, __delslice__), or moved (sort). In order to support restoration on object "
                "creation, tracking is exclusively for append-only data structures.\n\nIf you don't need "
                "this list checkpointed, wrap it in a non-trackable object; it will be subsequently ignored."
            )
        if self._external_modification:
            raise ValueError(
                f"Unable to save the object {self!r} (a list wrapper constructed to track trackable "
                "TensorFlow objects). The wrapped list was modified outside the wrapper (its final value "
                f"was {self._storage!r}, its value when a checkpoint dependency was added was "
                f"{self._last_wrapped_list_snapshot!r}), which breaks restoration on object creation.\n\n"
                "If you don't need this list checkpointed, wrap it in a NoDependency object; it will be "
                "subsequently ignored."
            )
        return super()._trackable_children()

    # --------------------------------------------------------------- sequence API
    def __getitem__(self, index):
        return self._storage[index]

    def __len__(self) -> int:
        return len(self._storage)

    def __iter__(self):
        return iter(self._storage)

    def __contains__(self, value) -> bool:
        return value in self._storage

    def __reversed__(self):
        return reversed(self._storage)

    def append(self, value: Any) -> None:
        self._check_external_modification()
        self._storage.append(self._track_value(value, str(len(self._storage))))
        self._update_snapshot()

    def extend(self, values) -> None:
        for value in list(values):
            self.append(value)

    def __iadd__(self, values):
        self.extend(values)
        return self

    def __add__(self, other):
        return self._storage + list(other)

    def __radd__(self, other):
        return list(other) + self._storage

    def __mul__(self, n):
        return self._storage * n

    def __rmul__(self, n):
        return n * self._storage

    def __imul__(self, n):
        self._check_external_modification()
        if n <= 0:
            self._flag_if_trackable(*self._storage)
            self._storage[:] = []
            self._retrack_all()
            self._update_snapshot()
        else:
            original = list(self._storage)
            for _ in range(n - 1):
                self.extend(original)
        return self

    def __setitem__(self, key, value) -> None:
        self._check_external_modification()
        if isinstance(key, slice):
            before = list(self._storage)
            new_values = [wrap_or_unwrap(v) for v in value]
            self._storage[key] = new_values
            if len(before) != len(self._storage) or any(a is not b for a, b in zip(before, self._storage)):
                changed = [a for a in before if not any(a is b for b in self._storage)]
                self._flag_if_trackable(*changed, *new_values)
            self._retrack_all()
        else:
            if isinstance(key, int) and key < 0:
                key += len(self._storage)
            current = self._storage[key]
            if current is not value:
                self._flag_if_trackable(current, value)
            value = wrap_or_unwrap(value)
            self._storage[key] = value
            if isinstance(value, Trackable):
                self._track_trackable(value, str(key), overwrite=True)
        self._update_snapshot()

    def __delitem__(self, key) -> None:
        self._check_external_modification()
        removed = self._storage[key]
        removed = removed if isinstance(key, slice) else [removed]
        self._flag_if_trackable(*removed)
        del self._storage[key]
        self._retrack_all()
        self._update_snapshot()

    def insert(self, index: int, value: Any) -> None:
        self._check_external_modification()
        if index >= len(self._storage):
            self.append(value)
            return
        self._flag_if_trackable(value, *self._storage[index:])
        self._storage.insert(index, wrap_or_unwrap(value))
        self._retrack_all()
        self._update_snapshot()

    def pop(self, index: int = -1):
        self._check_external_modification()
        position = index if index >= 0 else index + len(self._storage)
        value = self._storage[position]
        self._flag_if_trackable(*self._storage[position:])
        del self._storage[position]
        self._retrack_all()
        self._update_snapshot()
        return value

    def remove(self, value) -> None:
        self.pop(self._storage.index(value))

    def clear(self) -> None:
        del self[:]

    def sort(self, *args, **kwargs) -> None:
        self._check_external_modification()
        before = list(self._storage)
        self._storage.sort(*args, **kwargs)
        if any(a is not b for a, b in zip(before, self._storage)):
            self._flag_if_trackable(*before)
        self._retrack_all()
        self._update_snapshot()

    def reverse(self) -> None:
        self._check_external_modification()
        self._flag_if_trackable(*self._storage)
        self._storage.reverse()
        self._retrack_all()
        self._update_snapshot()

    def index(self, value, *args):
        return self._storage.index(value, *args)

    def count(self, value) -> int:
        return self._storage.count(value)

    def copy(self) -> list:
        return list(self._storage)

    def __eq__(self, other) -> bool:
        return self._storage == getattr(other, "_storage", other)

    def __ne__(self, other) -> bool:
        return not self == other

    def __lt__(self, other) -> bool:
        return self._storage < getattr(other, "_storage", other)

    def __le__(self, other) -> bool:
        return self._storage <= getattr(other, "_storage", other)

    def __gt__(self, other) -> bool:
        return self._storage > getattr(other, "_storage", other)

    def __ge__(self, other) -> bool:
        return self._storage >= getattr(other, "_storage", other)

    __hash__ = None

    def __bool__(self) -> bool:
        return bool(self._storage)

    def __repr__(self) -> str:
        return f"ListWrapper({self._storage!r})"

    def __deepcopy__(self, memo):
        return ListWrapper(copy.deepcopy(self._storage, memo))

    def __copy__(self):
        return ListWrapper(list(self._storage))

    def __reduce__(self):
        raise TypeError("ListWrapper objects cannot be pickled")


class DictWrapper(TrackableDataStructure, collections.abc.MutableMapping, dict):
    """A dict whose trackable values are dependencies named by their (string) keys."""

    def __init__(self, wrapped_dict: dict | None = None):
        self._maybe_initialize_trackable()
        storage = wrapped_dict if wrapped_dict is not None else {}
        object.__setattr__(self, "_storage", storage)
        object.__setattr__(self, "_non_string_key", False)
        object.__setattr__(self, "_external_modification", False)
        for key, value in list(storage.items()):
            storage[key] = self._track_keyed(key, value)
        self._update_snapshot()

    def _track_keyed(self, key: Any, value: Any) -> Any:
        if isinstance(value, NoDependency):
            return value.value
        if isinstance(key, str):
            return _track_as(self, key, value, in_container=True)
        original = value
        value = wrap_or_unwrap(value)
        stands_for = value if isinstance(value, Trackable) else adapted_element(value)
        if stands_for is not None:
            object.__setattr__(self, "_non_string_key", True)
            structure_changed(self)
        return original if isinstance(value, adapters.PyTree) and value is not original else value

    def _update_snapshot(self) -> None:
        # Mirror the storage into the dict base so that C-level consumers (json, `|`) see it.
        dict.clear(self)
        dict.update(self, self._storage)
        if self._external_modification:
            return
        object.__setattr__(self, "_last_wrapped_dict_snapshot", dict(self._storage))

    def _check_external_modification(self) -> None:
        if self._external_modification:
            return
        snapshot = self._last_wrapped_dict_snapshot
        if snapshot.keys() != self._storage.keys() or any(
            snapshot[k] is not self._storage[k] for k in snapshot
        ):
            object.__setattr__(self, "_external_modification", True)
            structure_changed(self)

    def _trackable_children(self) -> dict[str, Trackable]:
        self._check_external_modification()
        if self._non_string_key:
            raise ValueError(
                f"Unable to save the object {self!r} (a dictionary wrapper constructed automatically on "
                "attribute assignment). The wrapped dictionary contains a non-string key which maps to a "
                "trackable object or mutable data structure.\n\nIf you don't need this dictionary "
                "checkpointed, wrap it in a non-trackable object; it will be subsequently ignored."
            )
        if self._external_modification:
            raise ValueError(
                f"Unable to save the object {self!r} (a dictionary wrapper constructed automatically on "
                "attribute assignment). The wrapped dictionary was modified outside the wrapper (its final "
                f"value was {self._storage!r}, its value when a checkpoint dependency was added was "
                f"{self._last_wrapped_dict_snapshot!r}), which breaks restoration on object creation.\n\n"
                "If you don't need this dictionary checkpointed, wrap it in a non-trackable object; it will "
                "be subsequently ignored."
            )
        return super()._trackable_children()

    def __getitem__(self, key):
        return self._storage[key]

    def __setitem__(self, key, value) -> None:
        self._check_external_modification()
        self._storage[key] = self._track_keyed(key, value)
        self._update_snapshot()

    def __delitem__(self, key) -> None:
        self._check_external_modification()
        del self._storage[key]
        if isinstance(key, str):
            self._delete_tracking(key)
        self._update_snapshot()

    def __iter__(self):
        return iter(self._storage)

    def __len__(self) -> int:
        return len(self._storage)

    def __contains__(self, key) -> bool:
        return key in self._storage

    def keys(self):
        return self._storage.keys()

    def values(self):
        return self._storage.values()

    def items(self):
        return self._storage.items()

    def get(self, key, default=None):
        return self._storage.get(key, default)

    def copy(self) -> dict:
        return dict(self._storage)

    def __copy__(self) -> "DictWrapper":
        return DictWrapper(dict(self._storage))

    def __reversed__(self):
        return reversed(self._storage)

    def __or__(self, other):
        return self._storage | dict(getattr(other, "_storage", other))

    def __ror__(self, other):
        return dict(getattr(other, "_storage", other)) | self._storage

    def __ior__(self, other):
        self.update(other)
        return self

    def popitem(self):
        if not self._storage:
            raise KeyError("popitem(): dictionary is empty")
        key = next(reversed(self._storage))
        return key, self.pop(key)

    def __eq__(self, other) -> bool:
        return self._storage == getattr(other, "_storage", other)

    def __ne__(self, other) -> bool:
        return not self == other

    __hash__ = None

    def __bool__(self) -> bool:
        return bool(self._storage)

    def __repr__(self) -> str:
        return f"DictWrapper({self._storage!r})"

    def __deepcopy__(self, memo):
        return DictWrapper(copy.deepcopy(self._storage, memo))

    def __reduce__(self):
        raise TypeError("DictWrapper objects cannot be pickled")


class TupleWrapper(TrackableDataStructure, tuple):
    """A tuple whose trackable elements are dependencies named by index (and field name for namedtuples)."""

    def __new__(cls, original: tuple):
        depend = [not isinstance(element, NoDependency) for element in original]
        wrapped = [wrap_or_unwrap(element) for element in original]
        fields = getattr(type(original), "_fields", None)
        if fields is not None and cls is TupleWrapper:
            subclass = type(type(original).__name__, (TupleWrapper, type(original)), {})
            instance = tuple.__new__(subclass, wrapped)
        else:
            instance = tuple.__new__(cls, wrapped)
        instance._maybe_initialize_trackable()
        # Namedtuple fields first (as dict-like names), then positions (as list-like names).
        names = [(field, index) for index, field in enumerate(fields or ())]
        names += [(str(index), index) for index in range(len(wrapped))]
        for name, index in names:
            if depend[index] and isinstance(wrapped[index], Trackable):
                instance._track_trackable(wrapped[index], name, overwrite=True)
        return instance

    def __init__(self, original: tuple):  # noqa: D107 - construction happens in __new__
        pass

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def __reduce__(self):
        raise TypeError("TupleWrapper objects cannot be pickled")

    def _original(self, elements) -> tuple:
        for base in type(self).__mro__[1:]:
            if base is not TupleWrapper and issubclass(base, tuple) and hasattr(base, "_fields"):
                return base(*elements)
        return tuple(elements)

    def __copy__(self) -> "TupleWrapper":
        return TupleWrapper(self._original(tuple(self)))

    def __deepcopy__(self, memo):
        return TupleWrapper(self._original(copy.deepcopy(tuple(self), memo)))
