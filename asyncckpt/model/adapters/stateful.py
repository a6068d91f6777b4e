"""``StateDict``: any object with ``state_dict()`` / ``load_state_dict()``, saved as arrays plus typed JSON.

A save calls ``state_dict()`` and stores each array leaf as an attribute of its own, named by its
path (``layer1.weight``, ``state.0.exp_avg``), and the rest of the nest (hyperparameters,
counters, the nest's shape) as one typed-JSON attribute, ``STATE_DICT_JSON``. Array leaves are
saved from their own memory: a torch tensor through a guarded snapshot source, so the values
written are those of ``save()`` time even when ``optimizer.step()`` runs right after it.

A restore rebuilds the nest from the JSON with new arrays and hands it to ``load_state_dict``:
state that does not exist yet (AdamW's moments before its first step) is created by the object
itself from the restored arrays, and the object's own checks (an optimizer's parameter groups)
run before any of its state changes. A checkpoint value whose dtype or shape differs from the
live array of that name fails the restore before anything is read. (A module's parameters and
buffers, whose names are checked first, are read straight into; see ``ModuleState``.)
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

from asyncckpt.model.adapters import leaves, typed_json
from asyncckpt.model.adapters.state import LeafState
from asyncckpt.model.adapters.structure import split_arrays

__all__ = ["StateDict", "STATE_DICT_KEY"]

STATE_DICT_KEY = "STATE_DICT_JSON"


class StateDict(LeafState):
    """Checkpoint ``obj`` through its ``state_dict()`` and ``load_state_dict()``.

    Found automatically for such objects passed to ``Checkpoint``; construct it yourself to pass
    ``load_state_dict`` arguments, e.g. ``StateDict(model, strict=False)``.

    Parameters
    ----------
    obj : object
        Anything with ``state_dict()`` and ``load_state_dict(state)``.
    **load_options
        Keyword arguments for every ``obj.load_state_dict`` call.
    """

    STRUCTURE_KEY = STATE_DICT_KEY

    def __new__(cls, obj: Any, **load_options: Any) -> "StateDict":
        if cls is StateDict:  # a framework's own kind of object gets its framework's adapter
            framework = leaves.framework_of(obj)
            special = getattr(framework, "state_dict_class", None)
            cls = special(obj) if special is not None else cls
        return super().__new__(cls)

    def __init__(self, obj: Any, **load_options: Any) -> None:
        self._init_leaf_state()
        self._obj = obj
        self._load_options = load_options
        self._flat_signature: tuple | None = None  # keys and kinds of the last flat state saved
        self._flat_encoded = b""
        self._live_nest: Any = None  # the live state during one restore, when it is a nest (named tuples)

    @property
    def wrapped(self) -> Any:
        """The object whose state this saves."""
        return self._obj

    def __repr__(self) -> str:
        return f"StateDict({type(self._obj).__name__})"

    def _state_dict(self) -> Any:
        return self._obj.state_dict()

    def _load_state_dict(self, state: Any) -> None:
        self._obj.load_state_dict(state, **self._load_options)

    def _save_value(self, leaf: Any, name: str) -> Any:
        """What a save takes array ``leaf`` (attribute ``name``) from."""
        return leaves.save_value(leaf, name)

    def _flat_names(self) -> bool:
        """Whether the state's top-level keys are already unique dotted names (a module's are)."""
        return False

    # ------------------------------------------------------------------ save
    def _serialize_to_tensors(self) -> dict[str, Any]:
        return self._serialize_state(self._state_dict())

    def _serialize_state(self, state: Any) -> dict[str, Any]:
        """The attributes for ``state``: its arrays by name and its structure as typed JSON."""
        flat = self._flat_arrays(state)
        if flat is not None:
            return flat
        arrays: dict[str, Any] = {}

        def keep(name: str, leaf: Any) -> None:
            arrays[name] = self._save_value(leaf, name)

        structure = split_arrays(state, keep, flat_names=self._flat_names())
        try:
            encoded = typed_json.dumps(structure)
        except TypeError as exc:
            raise TypeError(f"{type(self._obj).__name__}.state_dict(): {exc}") from None
        return {STATE_DICT_KEY: encoded, **arrays}

    def _flat_arrays(self, state: Any) -> dict[str, Any] | None:
        """The attributes of a flat state of arrays named by their keys (a module's), else ``None``.

        Its structure depends on the keys, the arrays' kinds and which keys hold one tensor (tied
        weights, saved once under the first key) alone, so it is encoded once and kept while they
        stay the same: a repeat save of a 2,000-tensor module does no JSON work.
        """
        if not self._flat_names() or type(state) not in (dict, collections.OrderedDict):
            return None
        kinds = []
        first: dict[int, str] = {}  # id of a tensor -> the first key holding it (tied weights)
        targets = []
        for key, leaf in state.items():
            if type(key) is not str or not key or not leaves.is_array_leaf(leaf):
                return None
            kinds.append(leaves.kind_of(leaf))
            targets.append(first.setdefault(id(leaf), key))
        arrays = {STATE_DICT_KEY: self._flat_structure(tuple(state), tuple(kinds), tuple(targets))}
        for (key, leaf), target in zip(state.items(), targets):
            if target == key:
                arrays[key] = self._save_value(leaf, key)
        return arrays

    def _flat_structure(self, keys: tuple[str, ...], kinds: tuple[str, ...], targets: tuple[str, ...]) -> bytes:
        """The typed JSON of a flat state (key -> reference to ``target`` of ``kind``), kept while it stays the same."""
        signature = (keys, kinds, targets)
        if self._flat_signature != signature:
            structure = {key: typed_json.ArrayRef(target, kind) for key, kind, target in zip(keys, kinds, targets)}
            self._flat_encoded, self._flat_signature = typed_json.dumps(structure), signature
        return self._flat_encoded

    # ------------------------------------------------------------------ restore
    def _live_leaf_map(self) -> dict[str, Any]:
        live: dict[str, Any] = {}
        state = self._state_dict()
        split_arrays(state, live.__setitem__, flat_names=self._flat_names())
        self._live_nest = None if self._flat_names() else state  # kept for this restore only
        return live

    def _may_read_in_place(self, saved_arrays: set[str], live: dict[str, Any]) -> bool:
        return False  # load_state_dict validates only once it has the whole state: nothing live changes before

    def _restore_from_tensors(self, restored_tensors: dict[str, Any]) -> None:
        encoded, live, read_into, in_place = self._begin_restore(restored_tensors)

        def value_of(ref: Any) -> Any:
            if self._skips(ref, restored_tensors):
                return _NOT_RESTORED
            return self._restored_array(ref, restored_tensors, live.get(str(ref)), read_into, in_place)

        state = typed_json.loads(encoded, value_of)
        live_nest, self._live_nest = self._live_nest, None
        if live_nest is not None and leaves.any_in_nest(live_nest, leaves.is_namedtuple):
            state = _shaped_like(state, live_nest)
        if isinstance(state, dict):
            state = type(state)((key, value) for key, value in state.items() if value is not _NOT_RESTORED)
        self._check_before_load(state)
        self._load_state_dict(state)

    def _skips(self, ref: Any, restored_tensors: dict[str, Any]) -> bool:
        """Whether array ``ref`` is left out of the state handed to ``load_state_dict``."""
        return False

    def _check_before_load(self, state: Any) -> None:
        """Raise for a state ``load_state_dict`` would take only in part (nothing has changed yet)."""


def _shaped_like(value: Any, live: Any, depth: int = 0) -> Any:
    """``value`` with its tuples rebuilt as the named tuples ``live`` holds at the same places.

    Typed JSON names no classes (it never builds one from a file), so a named tuple of a
    ``state_dict()`` comes back as a tuple; the live state says which class it was.
    """
    if depth > typed_json.MAX_DEPTH:
        return value
    if type(value) is tuple and leaves.is_namedtuple(live) and len(live) == len(value):
        return type(live)(*(_shaped_like(item, like, depth + 1) for item, like in zip(value, live)))
    if type(value) is dict and isinstance(live, Mapping):
        return {key: _shaped_like(item, live[key], depth + 1) if key in live else item for key, item in value.items()}
    if type(value) in (list, tuple) and isinstance(live, (list, tuple)) and len(live) == len(value):
        return type(value)(_shaped_like(item, like, depth + 1) for item, like in zip(value, live))
    return value


#: A top-level entry of a state left out (not asked for by a non-strict module).
_NOT_RESTORED = object()
