"""Walking nested state: arrays out of a nest of dicts, lists and tuples, and back in.

:func:`split_arrays` replaces every array leaf of a ``state_dict()``-style nest by an
:class:`~asyncckpt.model.adapters.typed_json.ArrayRef` naming the attribute it is saved under; the
rest of the nest is data for :mod:`~asyncckpt.model.adapters.typed_json`. Attribute names are the
leaf's path joined by dots (``state.0.exp_avg``, ``layer1.weight``), so checkpoint keys read as the
framework's own names; a path part containing ``.`` or ``%`` has them percent-escaped, which keeps
names unique. One array object met twice (tied weights) is one attribute, referred to twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from asyncckpt.model.adapters import leaves
from asyncckpt.model.adapters.typed_json import MAX_DEPTH, ArrayRef

__all__ = ["leaf_name", "split_arrays"]


def _part(key: Any) -> str:
    text = key if type(key) is str else str(key)
    return text.replace("%", "%25").replace(".", "%2E") if ("." in text or "%" in text) else text


def leaf_name(path: tuple) -> str:
    """The attribute name of the leaf at ``path``: its parts joined by dots."""
    return ".".join([_part(key) for key in path])


def split_arrays(state: Any, on_array: Callable[[str, Any], None], *, flat_names: bool = False) -> Any:
    """``state`` with each array leaf replaced by an ``ArrayRef``; ``on_array(name, leaf)`` sees each.

    With ``flat_names`` a top-level mapping's string keys are the names as they are (a module's
    ``state_dict`` keys such as ``layer1.weight`` are already unique dotted paths).
    """
    seen: set[str] = set()
    named: dict[int, ArrayRef] = {}  # id of an array object -> its reference: one object, one attribute

    def walk(value: Any, path: tuple, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ValueError(f"the state is nested more than {MAX_DEPTH} levels deep at {leaf_name(path)}")
        if leaves.is_array_leaf(value):
            known = named.get(id(value))
            if known is not None:
                return known  # the same array again (tied weights): saved once, referred to twice
            name = path[0] if flat_names and len(path) == 1 and isinstance(path[0], str) and path[0] else leaf_name(path)
            if name in seen or not name:
                name = leaf_name(path) + f"%{len(seen)}"
            seen.add(name)
            on_array(name, value)
            ref = named[id(value)] = ArrayRef(name, leaves.kind_of(value))
            return ref
        if isinstance(value, Mapping):
            return {key: walk(item, (*path, key), depth + 1) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            items = [walk(item, (*path, index), depth + 1) for index, item in enumerate(value)]
            return tuple(items) if isinstance(value, tuple) else items
        return value

    return walk(state, (), 0)
