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
    live state now).
    """

    STRUCTURE_KEY = ""

    def _init_leaf_state(self) -> None:
        self._maybe_initialize_trackable()
        self._restoring: dict[str, Any] | None = None  # live leaves by name, during one restore
        self._read_into: dict[str, Any] = {}  # name -> destination handed to the reader

    def _live_leaf_map(self) -> dict[str, Any]:
        raise NotImplementedError

    def _checkpoint_attribute_names(self) -> tuple[str, ...]:
        return (self.STRUCTURE_KEY,)

    def _restorable_attributes(self, saved: list[str]) -> set[str]:
        return set(saved)  # the state may have arrays the live object does not have yet

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
        target = leaves.destination(like, spec)
        if target is not None:
            self._read_into[name] = target
        return target

    def _begin_restore(self, restored_tensors: dict[str, Any]) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
        """``(structure bytes, live leaves, destinations read into)``, ending this restore's bookkeeping."""
        live = self._live_leaves()
        read_into, self._restoring, self._read_into = self._read_into, None, {}
        encoded = restored_tensors.get(self.STRUCTURE_KEY)
        if not isinstance(encoded, bytes):
            found = sorted(restored_tensors)[:5]
            raise ValueError(
                f"the checkpoint holds no {self.STRUCTURE_KEY} structure for {self!r} (its attributes there: "
                f"{found}); was it saved by another kind of object?"
            )
        return encoded, live, read_into

    def _restored_array(self, ref: typed_json.ArrayRef, restored_tensors: dict[str, Any], like: Any,
                        read_into: dict[str, Any]) -> Any:
        """The restored leaf for array ``ref``: ``like`` itself when read in place, else a new array."""
        name = str(ref)
        if name not in restored_tensors or name == self.STRUCTURE_KEY:
            raise ValueError(f"the saved structure of {self!r} names array {name!r}, which the checkpoint lacks")
        value = restored_tensors[name]
        if like is not None and name in read_into and value is read_into[name]:
            return like
        if like is None or not leaves.is_array_leaf(like):
            return leaves.new_leaf(value, ref.kind)
        try:
            return leaves.restored_leaf(value, like)
        except ValueError as exc:
            raise ValueError(f"cannot restore {name!r} of {self!r}: {exc}") from None
