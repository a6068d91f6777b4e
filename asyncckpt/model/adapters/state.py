"""``LeafState``: what ``StateDict`` and ``PyTree`` share -- a structure attribute, array leaves read in place.

Both save one typed-JSON attribute (the structure) plus one attribute per array leaf, and both
restore by reading each array straight into the live leaf of that name when the leaf allows it
(:func:`~asyncckpt.model.adapters.leaves.destination`), building the rest from host arrays.
"""

from __future__ import annotations

from typing import Any

from asyncckpt.model.adapters import leaves, typed_json
from asyncckpt.model.trackable import Trackable

__all__ = ["LeafState"]


class LeafState(Trackable):
    """Base of the adapters whose state is a structure plus named array leaves.

    Subclasses set ``STRUCTURE_KEY`` and implement ``_live_leaf_map()`` (``{name: leaf}`` of the
    live state now). A restore changes live leaves only once it is known to succeed as far as
    the leaves go: a dtype or shape that differs from a live leaf fails it before anything is
    read, and values are read into live leaves only when :meth:`_may_read_in_place` agrees (the
    saved arrays are exactly the live ones); otherwise new arrays are built and the structure's
    own checks run before any of them reaches the live state.
    """

    STRUCTURE_KEY = ""

    def _init_leaf_state(self) -> None:
        self._maybe_initialize_trackable()
        self._restoring: dict[str, Any] | None = None  # live leaves by name, during one restore
        self._read_into: dict[str, Any] = {}  # name -> destination handed to the reader
        self._in_place = False  # whether this restore writes into live leaves (see _may_read_in_place)

    def _live_leaf_map(self) -> dict[str, Any]:
        raise NotImplementedError

    def _checkpoint_attribute_names(self) -> tuple[str, ...]:
        return (self.STRUCTURE_KEY,)

    def _restorable_attributes(self, saved: list[str]) -> set[str]:
        self._restoring, self._read_into = None, {}  # a restore that failed half-way leaves nothing behind
        live = self._live_leaves()
        arrays = set(saved) - {self.STRUCTURE_KEY}
        self._in_place = self._may_read_in_place(arrays, live)
        return self._wanted_attributes(set(saved), live)

    def _wanted_attributes(self, saved: set[str], live: dict[str, Any]) -> set[str]:
        return saved  # the state may have arrays the live object does not have yet

    def _may_read_in_place(self, saved_arrays: set[str], live: dict[str, Any]) -> bool:
        """Whether this restore may write into the live leaves: the saved arrays are exactly the live ones."""
        return saved_arrays == {name for name, leaf in live.items() if leaves.is_array_leaf(leaf)}

    def _live_leaves(self) -> dict[str, Any]:
        if self._restoring is None:
            self._restoring = self._live_leaf_map()
        return self._restoring

    def _restore_destination(self, name: str, spec: Any) -> Any:
        if name == self.STRUCTURE_KEY or isinstance(spec.dtype, str):
            return None
        like = self._live_leaves().get(name)
        if like is None or not leaves.is_array_leaf(like):
            return None
        problem = leaves.mismatch(like, spec)
        if problem is not None:  # found before any value is read: nothing of the live state changes
            self._end_restore()
            raise ValueError(f"cannot restore {name!r} of {self!r}: {problem}")
        if not self._in_place:
            return leaves.boxes(like)  # a leaf held in part still reads only its own parts
        target = leaves.destination(like, spec)
        if target is not None:
            self._read_into[name] = target
        return target

    def _end_restore(self) -> tuple[dict[str, Any], dict[str, Any], bool]:
        live, read_into, in_place = self._live_leaves(), self._read_into, self._in_place
        self._restoring, self._read_into, self._in_place = None, {}, False
        return live, read_into, in_place

    def _begin_restore(self, restored_tensors: dict[str, Any]) -> tuple[bytes, dict[str, Any], dict[str, Any], bool]:
        """``(structure bytes, live leaves, destinations read into, in place)``, ending this restore's bookkeeping."""
        live, read_into, in_place = self._end_restore()
        encoded = restored_tensors.get(self.STRUCTURE_KEY)
        if not isinstance(encoded, bytes):
            found = sorted(restored_tensors)[:5]
            raise ValueError(
                f"the checkpoint holds no {self.STRUCTURE_KEY} structure for {self!r} (its attributes there: "
                f"{found}); was it saved by another kind of object?"
            )
        return encoded, live, read_into, in_place

    def _restored_array(self, ref: typed_json.ArrayRef, restored_tensors: dict[str, Any], like: Any,
                        read_into: dict[str, Any], in_place: bool) -> Any:
        """The restored leaf for array ``ref``: ``like`` itself when read or copied into, else a new array."""
        name = str(ref)
        if name not in restored_tensors or name == self.STRUCTURE_KEY:
            raise ValueError(f"the saved structure of {self!r} names array {name!r}, which the checkpoint lacks")
        value = restored_tensors[name]
        if like is not None and name in read_into and value is read_into[name]:
            return like
        if like is None or not leaves.is_array_leaf(like):
            return leaves.new_leaf(value, ref.kind)
        try:
            return leaves.restored_leaf(value, like, into=in_place)
        except ValueError as exc:
            raise ValueError(f"cannot restore {name!r} of {self!r}: {exc}") from None
