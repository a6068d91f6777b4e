"""Array leaves of framework state: how each kind is saved, read into, and rebuilt.

A framework module (``asyncckpt.model.adapters.torch``, ``.jax``) provides, for its own arrays:

``is_array(value)``
    Whether ``value`` is one of its arrays.
``save_value(value)``
    What a save takes the bytes from: a snapshot source (``_snapshot_array`` and mutation hooks,
    see :mod:`asyncckpt.io.snapshot`), so nothing is copied unless the value is about to change.
``destination(value, spec)``
    The live array a restore may read the checkpoint value straight into, or ``None``.
``restored(value, like)``
    The leaf to put in the restored state: ``like`` itself when the value was read into it,
    else a new array of ``like``'s kind and placement built from the host array ``value``.
``boxes(value)``
    Optional: for an array this process holds only part of, a request for those parts
    (:class:`~asyncckpt.shards.ShardedTarget`); ``restored`` then gets a list, one array per box.
``adapt(value)``
    The trackable for one of its objects (a module, an optimizer, a tree), or ``None``.
``host_view(value)``
    A host array as NumPy (a view where it can be), a device array unchanged.

NumPy arrays are leaves of the core itself: saved as an owned copy taken when ``save()`` is
called (a NumPy array cannot announce a change), restored in place when writable and alike.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "FrozenArray",
    "KeyArray",
    "any_in_nest",
    "boxes",
    "host_view",
    "kind_of",
    "new_leaf",
    "framework_of",
    "holds_framework_arrays",
    "is_abstract",
    "is_array_leaf",
    "is_namedtuple",
    "mismatch",
    "restored_leaf",
    "save_value",
    "destination",
]

#: A framework's top-level module names → the adapter module serving its types.
_FRAMEWORK_ADAPTERS = {
    "torch": "asyncckpt.model.adapters.torch",
    "jax": "asyncckpt.model.adapters.jax",
    "jaxlib": "asyncckpt.model.adapters.jax",
    "flax": "asyncckpt.model.adapters.jax",
    "optax": "asyncckpt.model.adapters.jax",
}


def framework_of(value: Any) -> ModuleType | None:
    """The adapter module for ``value``'s framework, imported on first use; ``None`` for other values.

    A type counts as the framework's when it or a base class is declared in the framework (a
    ``torch.nn.Module`` subclass in the user's module is a module). Values of other modules' types
    are asked of the JAX adapter when JAX is already imported: a ``flax.struct`` dataclass or an
    optax state is declared in the user's module.
    """
    kind = type(value)
    name = _type_framework(kind)
    if name is not None:
        return importlib.import_module(name)
    root = kind.__module__.partition(".")[0]
    if "jax" in sys.modules and root not in ("builtins", "numpy", "collections", "asyncckpt"):
        jax_adapter = importlib.import_module(_FRAMEWORK_ADAPTERS["jax"])
        if jax_adapter.is_registered_node(value):
            return jax_adapter
    return None


#: type -> the adapter module name of the framework it or a base class comes from (memoised).
_TYPE_FRAMEWORKS: dict[type, str | None] = {}


def _type_framework(kind: type) -> str | None:
    try:
        return _TYPE_FRAMEWORKS[kind]
    except KeyError:
        pass
    found = None
    for base in kind.__mro__[:-1]:  # the type itself first, then its bases (object last, skipped)
        found = _FRAMEWORK_ADAPTERS.get(getattr(base, "__module__", "").partition(".")[0])
        if found is not None:
            break
    _TYPE_FRAMEWORKS[kind] = found
    return found


def is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


#: type -> the adapter module whose arrays are of that type, or None: pure memoisation (a save of a
#: 4,000-tensor model asks it 8,000 times).
_ARRAY_FRAMEWORKS: dict[type, ModuleType | None] = {}


def _array_framework(value: Any) -> ModuleType | None:
    kind = type(value)
    try:
        return _ARRAY_FRAMEWORKS[kind]
    except KeyError:
        pass
    name = _FRAMEWORK_ADAPTERS.get(kind.__module__.partition(".")[0])
    module = importlib.import_module(name) if name is not None else None
    found = module if module is not None and module.is_array(value) else None
    _ARRAY_FRAMEWORKS[kind] = found
    return found


def is_array_leaf(value: Any) -> bool:
    """NumPy arrays and framework arrays (a torch tensor, a ``jax.Array``)."""
    return isinstance(value, np.ndarray) or _array_framework(value) is not None


def is_abstract(value: Any) -> bool:
    """A leaf that only describes an array (``jax.ShapeDtypeStruct``): a restore fills it with what was saved."""
    framework = _array_framework(value)
    return framework is not None and bool(getattr(framework, "is_abstract", lambda _: False)(value))


def any_in_nest(tree: Any, found: Callable[[Any], bool], depth: int = 0) -> bool:
    """Whether ``found`` holds for ``tree`` or anything in its nest of mappings, lists and tuples.

    ``found`` is asked first, so a container that is itself a match (a dict wrapper is a
    trackable) is not looked into. Nests deeper than 64 levels count as holding nothing.
    """
    if found(tree):
        return True
    if depth > 64:
        return False
    if isinstance(tree, Mapping):
        return any(any_in_nest(item, found, depth + 1) for item in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(any_in_nest(item, found, depth + 1) for item in tree)
    return False


def _is_framework_array(value: Any) -> bool:
    return _array_framework(value) is not None


def holds_framework_arrays(tree: Any) -> bool:
    """Whether a nest of dicts, lists and tuples has a framework array among its leaves."""
    return any_in_nest(tree, _is_framework_array)


class FrozenArray:
    """A snapshot source over an array nobody changes in place (a JAX array's host view).

    Saved straight from its memory with no copy and no guard: its mutation hooks are never run.
    """

    __slots__ = ("array",)
    _single_use = True  # made for one save: a layout kept between saves need not hold it

    def __init__(self, array: Any) -> None:
        self.array = array

    def _snapshot_array(self) -> Any:
        return self.array

    def _add_mutation_hook(self, hook: Callable) -> None:
        pass  # immutable: nothing will call it

    def _remove_mutation_hook(self, hook: Callable) -> None:
        pass

    @classmethod
    def _add_mutation_hooks(cls, table: Mapping[int, Any], hook: Callable) -> Callable[[], None]:
        return _nothing


def _nothing() -> None:
    return None


class KeyArray(NamedTuple):
    """What a save takes from a typed PRNG key: its key data (a snapshot source) and its implementation's name."""

    data: Any
    impl: str


def host_view(value: Any) -> Any:
    """A framework array in host memory as a NumPy array (a view where it can be); other values unchanged.

    Lets ``Variable(tensor)`` and ``variable.assign(tensor)`` take a CPU torch tensor (bfloat16
    included) or a JAX array; device arrays are left to the device path.
    """
    framework = _array_framework(value)
    if framework is None:
        return value
    return framework.host_view(value)


def kind_of(leaf: Any) -> str:
    """The array type of a leaf as recorded in a structure: ``""`` for NumPy, else its framework."""
    if isinstance(leaf, np.ndarray):
        return ""
    framework = _array_framework(leaf)
    return framework.KIND if framework is not None else ""


def new_leaf(value: Any, kind: str) -> Any:
    """An array of ``kind`` holding host array ``value``, where the live state has no leaf to follow."""
    name = _FRAMEWORK_ADAPTERS.get(kind)
    return value if name is None else importlib.import_module(name).new(value)


def save_value(leaf: Any, name: str = "") -> Any:
    """What a save takes ``leaf``'s bytes from (NumPy arrays: the array, copied at ``save()``).

    A framework's refusal (a sparse tensor, an abstract array) is a ``TypeError`` naming ``name``.
    """
    if isinstance(leaf, np.ndarray):
        return leaf
    try:
        return _array_framework(leaf).save_value(leaf, name)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"cannot save {name!r}: {exc}") from None


def destination(leaf: Any, spec: Any) -> Any:
    """The live array to read a checkpoint value of ``spec`` into, or ``None`` to read into a new one."""
    if isinstance(leaf, np.ndarray):
        alike = leaf.dtype == spec.dtype and tuple(leaf.shape) == tuple(spec.shape)
        return leaf if alike and leaf.flags.c_contiguous and leaf.flags.writeable and type(leaf) is np.ndarray else None
    return _array_framework(leaf).destination(leaf, spec)


def boxes(leaf: Any) -> Any:
    """For a leaf this process holds only part of (a DTensor, a sharded ``jax.Array``), a request
    (:class:`~asyncckpt.shards.ShardedTarget`) for those parts only; ``None`` for a whole leaf."""
    if isinstance(leaf, np.ndarray):
        return None
    ask = getattr(_array_framework(leaf), "boxes", None)
    return ask(leaf) if ask is not None else None


def restored_leaf(value: Any, like: Any, *, into: bool = False) -> Any:
    """The restored leaf for host array ``value`` where the live state had ``like`` (or nothing).

    With ``into`` a mutable live leaf (a torch tensor, a writable NumPy array) takes the value in
    place and is returned; otherwise the leaf is a new array placed like ``like``.
    """
    if like is None or isinstance(like, np.ndarray):
        if like is not None and value is not like:
            check_alike(value, like)
            if into and like.flags.writeable and type(like) is np.ndarray:
                np.copyto(like, value)
                return like
        return value
    return _array_framework(like).restored(value, like, into=into)


def mismatch(like: Any, spec: Any) -> str | None:
    """Why a checkpoint value of ``spec`` cannot restore live leaf ``like`` (dtype, shape), or ``None``.

    Asked before any value is read; a framework that builds new arrays on restore anyway (JAX)
    answers ``None`` and checks when it builds them.
    """
    if isinstance(like, np.ndarray):
        return _difference(spec, like, "live array")
    describe = getattr(_array_framework(like), "mismatch", None)
    return describe(like, spec) if describe is not None else None


def check_alike(value: Any, like: Any, where: str = "") -> None:
    """A checkpoint value must have the live leaf's dtype and shape exactly: no cast, no reshape."""
    problem = _difference(value, like, "live value", where)
    if problem is not None:
        raise ValueError(problem)


def _difference(value: Any, like: Any, live: str, where: str = "") -> str | None:
    """How checkpoint value (or spec) ``value`` differs from ``like`` in dtype or shape, or ``None``."""
    dtype, shape = np.dtype(value.dtype), tuple(value.shape)
    if dtype == np.dtype(like.dtype) and shape == tuple(like.shape):
        return None
    return f"the checkpoint value{where} is {dtype}{list(shape)} but the {live} is {np.dtype(like.dtype)}{list(like.shape)}"
