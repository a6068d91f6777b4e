"""``PyTree``: a nest of arrays and numbers (a JAX train state, a dict of tensors) as one trackable.

The holder never changes the tree it was given; after a restore, :attr:`PyTree.value` is a new
tree of the same structure whose leaves have the given leaves' dtypes, shapes and placement (a
JAX array on the same devices with the same sharding). Trees are flattened by JAX's own rules
when JAX is imported (so ``flax.struct`` dataclasses, optax states and other registered nodes are
nests), else as dicts, lists, tuples and named tuples (by field name, as JAX names them). Each array leaf is an attribute named by
its path (``params.dense.kernel``); the Python numbers among the leaves and the list of names are
one typed-JSON attribute, ``PYTREE_JSON``.
"""

from __future__ import annotations

import collections
import importlib
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from asyncckpt.model.adapters import leaves, typed_json
from asyncckpt.model.adapters.state import LeafState
from asyncckpt.model.adapters.structure import leaf_name

__all__ = ["PyTree", "PYTREE_KEY", "flatten"]

PYTREE_KEY = "PYTREE_JSON"
_JAX_ADAPTER = "asyncckpt.model.adapters.jax"
#: The attribute name of a tree that is a single array (TensorFlow's name for a variable's value).
ROOT_LEAF_NAME = "VARIABLE_VALUE"


def _flatten_builtin(tree: Any) -> tuple[list[tuple[tuple, Any]], Callable[[list], Any]]:
    """Leaves by path of a nest of dicts, lists, tuples and named tuples, and its rebuilder."""
    found: list[tuple[tuple, Any]] = []

    def walk(value: Any, path: tuple, depth: int) -> Callable[[Any], Any]:
        if depth > typed_json.MAX_DEPTH:
            raise ValueError(f"the tree is nested more than {typed_json.MAX_DEPTH} levels deep at {leaf_name(path)}")
        if value is None:
            return lambda values: None
        if isinstance(value, Mapping) and type(value) in (dict, collections.OrderedDict):
            keys = list(value)
            parts = [walk(value[key], (*path, key), depth + 1) for key in keys]
            kind = type(value)
            return lambda values: kind((key, part(values)) for key, part in zip(keys, parts))
        if leaves.is_namedtuple(value):  # by field name, as JAX names them: a tree's names never depend on imports
            parts = [walk(item, (*path, field), depth + 1) for field, item in zip(value._fields, value)]
            kind = type(value)
            return lambda values: kind(*(part(values) for part in parts))
        if isinstance(value, (list, tuple)):
            parts = [walk(item, (*path, index), depth + 1) for index, item in enumerate(value)]
            kind = list if isinstance(value, list) else tuple
            return lambda values: kind(part(values) for part in parts)
        index = len(found)
        found.append((path, value))
        return lambda values: values[index]

    rebuild = walk(tree, (), 0)
    return found, lambda values: rebuild(values)


def flatten(tree: Any) -> tuple[list[tuple[str, Any]], Callable[[list], Any]]:
    """``([(name, leaf), ...], rebuild)`` for ``tree``; ``rebuild(new_leaves)`` makes a tree like it."""
    if "jax" in sys.modules:
        named, rebuild = importlib.import_module(_JAX_ADAPTER).flatten(tree)
    else:
        found, rebuild = _flatten_builtin(tree)
        named = [(leaf_name(path), leaf) for path, leaf in found]
    named = [(name or ROOT_LEAF_NAME, leaf) for name, leaf in named]  # a tree that is one array
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"the tree's leaves do not have unique paths: {repeated[:5]}")
    return named, rebuild


class PyTree(LeafState):
    """Checkpoint a tree of arrays and numbers; after restore, :attr:`value` is the restored tree.

    Examples
    --------
    >>> holder = asyncckpt.PyTree(train_state)            # doctest: +SKIP
    >>> ckpt = asyncckpt.Checkpoint(state=holder)          # doctest: +SKIP
    >>> ckpt.restore(path); train_state = holder.value     # doctest: +SKIP
    """

    STRUCTURE_KEY = PYTREE_KEY

    def __init__(self, value: Any) -> None:
        self._init_leaf_state()
        self._value = value
        self._container: tuple[weakref.ref, str] | None = None

    def restores_into(self, container: Any, name: str) -> None:
        """Have each restore put the restored tree back as element ``name`` of ``container``.

        A tree inside a tracked list or dict stays the user's own value there (the holder is
        tracked in its place); JAX arrays cannot be restored in place, so the container gets
        the new tree.
        """
        self._container = (weakref.ref(container), name)

    @property
    def value(self) -> Any:
        """The tree: the one given, or the one the latest restore built."""
        return self._value

    @value.setter
    def value(self, tree: Any) -> None:
        self._value = tree

    def __repr__(self) -> str:
        return f"PyTree({type(self._value).__name__})"

    # ------------------------------------------------------------------ save
    def _serialize_to_tensors(self) -> dict[str, Any]:
        named, _ = flatten(self._value)
        arrays: dict[str, Any] = {}
        structure: dict[str, Any] = {}
        for name, leaf in named:
            if leaves.is_array_leaf(leaf):
                value = leaves.save_value(leaf, name)
                if isinstance(value, leaves.KeyArray):  # a typed PRNG key: its key data, and its kind
                    structure[name] = typed_json.PrngKeyRef(name, value.impl)
                    arrays[name] = value.data
                else:
                    structure[name] = typed_json.ArrayRef(name, leaves.kind_of(leaf))
                    arrays[name] = value
            else:
                structure[name] = leaf
        try:
            encoded = typed_json.dumps(structure)
        except TypeError as exc:
            raise TypeError(f"a leaf of {self!r}: {exc}") from None
        return {PYTREE_KEY: encoded, **arrays}

    # ------------------------------------------------------------------ restore
    def _live_leaf_map(self) -> dict[str, Any]:
        return dict(flatten(self._value)[0])

    def _restore_from_tensors(self, restored_tensors: dict[str, Any]) -> None:
        encoded, live, read_into, in_place = self._begin_restore(restored_tensors)
        named, rebuild = flatten(self._value)
        saved = typed_json.loads(encoded, lambda ref: ref)
        if not isinstance(saved, dict):
            raise ValueError(f"the {PYTREE_KEY} structure of {self!r} is not a mapping of leaves")
        missing = [name for name, _ in named if name not in saved]
        unknown = sorted(set(saved) - {name for name, _ in named})
        if missing or unknown:
            raise ValueError(
                f"the checkpoint's tree does not match {self!r}: leaves missing from the checkpoint "
                f"{missing[:5]}, leaves the tree does not have {unknown[:5]}"
            )
        new_leaves = []
        for name, like in named:
            stored = saved[name]
            saved_array = isinstance(stored, (typed_json.ArrayRef, typed_json.PrngKeyRef))
            if saved_array != leaves.is_array_leaf(like) and not (not saved_array and leaves.is_abstract(like)):
                what = "an array" if saved_array else f"a value of type {type(stored).__name__}"
                raise ValueError(
                    f"cannot restore leaf {name!r} of {self!r}: the checkpoint holds {what} there but the live tree "
                    f"holds a {type(like).__name__}"
                )
            if not saved_array:  # a number, string or None saved in the structure (an abstract leaf takes it too)
                new_leaves.append(stored)
                continue
            if isinstance(stored, typed_json.PrngKeyRef):
                value = restored_tensors.get(name)
                if value is None:
                    raise ValueError(f"the saved structure of {self!r} names key {name!r}, which the checkpoint lacks")
                try:
                    key_like = like if leaves.is_array_leaf(like) else None
                    new_leaves.append(importlib.import_module(_JAX_ADAPTER).restored_key(value, stored.impl, key_like))
                except ValueError as exc:
                    raise ValueError(f"cannot restore leaf {name!r} of {self!r}: {exc}") from None
                continue
            new_leaves.append(self._restored_array(stored, restored_tensors, like, read_into, in_place))
        before = self._value
        if len(new_leaves) == len(named) and all(new is old for new, (_, old) in zip(new_leaves, named)):
            return  # every leaf restored in place (or unchanged): the tree stays the one given
        self._value = rebuild(new_leaves)
        container = self._container[0]() if self._container is not None else None
        if container is not None:
            container._element_restored(self._container[1], before, self._value)
