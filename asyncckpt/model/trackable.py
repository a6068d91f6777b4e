"""Trackable objects: named dependency edges and the queues that make deferred restore work.

A ``Trackable`` keeps its children as ``(local_name, child)`` pairs in insertion order; those edges
name everything in a checkpoint. When a restore reaches a child name the live object does not have
yet, the checkpoint position waits in ``_deferred_dependencies[name]`` and is applied the moment a
dependency with that name is tracked (``_track_trackable``).

Per-object state lives in ``_self_*`` attributes set by ``_maybe_initialize_trackable`` so that
subclasses need not call ``super().__init__`` (as in TensorFlow).

Every change of a declared dependency (and of an optimizer's slots) calls
:func:`structure_changed`, which moves the process-wide :func:`structure_version` on. A checkpoint
caches its serialized object graph under that version, so saving an unchanged program again skips
the graph walk (see :class:`asyncckpt.graph.GraphCache`).
"""

from __future__ import annotations

import logging
from typing import Any

from asyncckpt._runtime import process_state

__all__ = ["Trackable", "NoDependency", "TrackableReference", "mark_walked", "structure_version", "structure_changed"]

logger = logging.getLogger("asyncckpt")

def structure_version() -> int:
    """A number that changes whenever any trackable's dependencies (or slots) change, in any object."""
    return process_state().last_number("structure version")


#: Set on each object a graph walk reaches, before its dependencies are read (see :func:`mark_walked`).
WALKED = "_self_walked_by_graph"


def structure_changed(owner: Any = None) -> None:
    """Record a change of dependencies: cached object graphs are stale from now on.

    Each call takes a fresh number from an atomic counter, so a graph cached under a version
    can never see that version again after a concurrent change. ``owner`` is the object whose
    dependencies changed: one that no graph walk has reached yet (a ``Checkpoint`` being built
    for a restore, its adapters) is in no cached graph, so its changes move nothing -- the change
    that attaches it to a walked object does.
    """
    if owner is not None:
        try:
            if not vars(owner).get(WALKED, False):
                return
        except TypeError:  # no __dict__: never marked, so count the change
            pass
    process_state().next_number("structure version")


def mark_walked(obj: Any) -> bool:
    """Mark ``obj`` as reached by a graph walk (before its dependencies are read); False if it cannot be marked."""
    try:
        vars(obj)[WALKED] = True
    except TypeError:
        return False
    return True


class TrackableReference:
    """A named edge to a child trackable."""

    __slots__ = ("name", "ref")

    def __init__(self, name: str, ref: "Trackable"):
        self.name = name
        self.ref = ref

    def __iter__(self):
        return iter((self.name, self.ref))

    def __repr__(self) -> str:
        return f"TrackableReference(name={self.name!r}, ref={self.ref!r})"


class Trackable:
    """Base class for objects whose state goes into checkpoints.

    Subclasses declare children with ``_track_trackable`` and their own values with
    ``_serialize_to_tensors`` / ``_restore_from_tensors``.
    """

    def _maybe_initialize_trackable(self) -> None:
        if "_self_dependencies" in self.__dict__:
            return
        set_ = object.__setattr__
        set_(self, "_self_dependencies", {})  # local name -> child, in insertion order
        set_(self, "_self_deferred_dependencies", {})  # name -> list[CheckpointPosition]
        set_(self, "_self_update_uid", -1)  # uid of the newest restore applied to this object

    # ------------------------------------------------------------------ dependencies
    @property
    def _deferred_dependencies(self) -> dict:
        self._maybe_initialize_trackable()
        return self._self_deferred_dependencies

    @property
    def _update_uid(self) -> int:
        self._maybe_initialize_trackable()
        return self._self_update_uid

    @_update_uid.setter
    def _update_uid(self, value: int) -> None:
        self._maybe_initialize_trackable()
        object.__setattr__(self, "_self_update_uid", value)

    @property
    def _checkpoint_dependencies(self) -> list[TrackableReference]:
        self._maybe_initialize_trackable()
        return [TrackableReference(name, child) for name, child in self._self_dependencies.items()]

    def _trackable_children(self) -> dict[str, "Trackable"]:
        """Children as an insertion-ordered ``{local_name: child}`` mapping."""
        self._maybe_initialize_trackable()
        return dict(self._self_dependencies)

    def _lookup_dependency(self, name: str, cached_dependencies: dict | None = None) -> "Trackable | None":
        if cached_dependencies is not None:
            return cached_dependencies.get(name)
        self._maybe_initialize_trackable()
        return self._self_dependencies.get(name)

    def _track_trackable(self, trackable: "Trackable", name: str, overwrite: bool = False) -> "Trackable":
        """Declare ``trackable`` as the dependency ``name``; apply any restore waiting for that name."""
        self._maybe_initialize_trackable()
        if not isinstance(trackable, Trackable):
            raise TypeError(
                "Trackable._track_trackable() can only be used to track objects of type Trackable. "
                f"Got type {type(trackable).__name__}."
            )
        current = self._lookup_dependency(name)
        if current is not None and current is not trackable:
            if not overwrite:
                raise ValueError(
                    f"Called Trackable._track_trackable() with name='{name}', but a Trackable with this "
                    "name is already declared as a dependency. Names must be unique (or overwrite=True)."
                )
            self._self_dependencies[name] = trackable  # an existing key keeps its position
            structure_changed(self)
        elif current is None:
            self._self_dependencies[name] = trackable
            structure_changed(self)
            self._handle_deferred_dependencies(name, trackable)
        return trackable

    def _handle_deferred_dependencies(self, name: str, trackable: "Trackable") -> None:
        """Apply restores queued for ``name``, newest restore first (the newest one wins)."""
        positions = self._deferred_dependencies.pop(name, ())
        for position in sorted(positions, key=lambda p: p.restore_uid, reverse=True):
            position.restore(trackable)

    def _delete_tracking(self, name: str) -> None:
        self._maybe_initialize_trackable()
        if self._self_dependencies.pop(name, None) is not None:
            structure_changed(self)

    # ------------------------------------------------------------------ values
    def _serialize_to_tensors(self) -> dict[str, Any]:
        """``{attribute_name: value}`` to save for this object (none by default)."""
        return {}

    def _restore_from_tensors(self, restored_tensors: dict[str, Any]) -> None:
        """Receive the checkpoint values of this object's attributes."""
        if restored_tensors:
            raise NotImplementedError(f"{type(self).__name__} does not restore attributes {sorted(restored_tensors)}")

    def _checkpoint_attribute_names(self) -> tuple[str, ...]:
        """Names of the attributes this object saves and can restore."""
        return tuple(self._serialize_to_tensors())

    def _restorable_attributes(self, saved: list[str]) -> set[str]:
        """Which of the checkpoint's attributes ``saved`` this object takes (its own by default).

        An adapter whose state grows (an optimizer's moments appear at its first step) takes
        attributes it does not have yet.
        """
        return set(self._checkpoint_attribute_names())


class NoDependency:
    """Wrap a value assigned to an attribute so that it is stored but not tracked."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return f"NoDependency({self.value!r})"

