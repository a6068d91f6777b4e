"""JAX state: pytrees of ``jax.Array``s (train states, optax states, ``flax.struct`` dataclasses).

Imported only when a JAX value reaches :func:`asyncckpt.model.adapters.adapt` (or a tree is
flattened while JAX is imported). JAX arrays never change in place, so a save takes a host view
of each at ``save()`` time (no copy on the CPU) and writes from it with no guard; an array split
over devices or processes is saved shard by shard (format version 2), each box once. A restore
builds new arrays with the given leaves' dtype and sharding, reading only the boxes of this
process's devices, from a checkpoint of any slicing; a typed PRNG key is stored as its key data and comes back as a typed key of the same
implementation.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from asyncckpt.model.adapters import leaves
from asyncckpt.model.adapters.pytree import PyTree
from asyncckpt.dtypes import dtype_string
from asyncckpt.model.adapters.structure import leaf_name
from asyncckpt.shards import Box, Shard, ShardedTarget, ShardedValue, spread_writer

__all__ = ["adapt", "boxes", "destination", "flatten", "host_view", "is_abstract", "is_array", "is_registered_node", "new", "restored", "restored_key",
           "save_value"]


#: How structures name this framework's arrays (``ArrayRef.kind``).
KIND = "jax"


def is_array(value: Any) -> bool:
    """A ``jax.Array``, or an abstract one (``jax.ShapeDtypeStruct``, as ``jax.eval_shape`` gives) to restore into."""
    return isinstance(value, (jax.Array, jax.ShapeDtypeStruct))


def is_abstract(value: Any) -> bool:
    return isinstance(value, jax.ShapeDtypeStruct)


def _is_key(value: Any) -> bool:
    return jnp.issubdtype(value.dtype, jax.dtypes.prng_key)


def is_registered_node(value: Any) -> bool:
    """Whether ``value`` is a pytree node JAX knows (a ``flax.struct`` dataclass, an optax state...)."""
    leaves_of = jax.tree_util.tree_leaves(value)
    return not (len(leaves_of) == 1 and leaves_of[0] is value)


def _key_part(entry: Any) -> Any:
    for field in ("key", "idx", "name"):
        if hasattr(entry, field):
            return getattr(entry, field)
    return str(entry)


def flatten(tree: Any) -> tuple[list[tuple[str, Any]], Callable[[list], Any]]:
    """``([(name, leaf), ...], rebuild)`` by JAX's flattening rules; names are the key paths with dots."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    named = [(leaf_name(tuple(_key_part(entry) for entry in path)), leaf) for path, leaf in with_paths]
    return named, treedef.unflatten


def _held_in_part(array: Any) -> bool:
    """Whether ``array`` is split over devices (or processes): saved and restored shard by shard."""
    sharding = getattr(array, "sharding", None)
    if sharding is None or _is_key(array):
        return False
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        return True
    return len(sharding.device_set) > 1 and not sharding.is_fully_replicated


def _box(index: tuple, shape: tuple[int, ...]) -> Box:
    """The box a device's index (a tuple of slices, as ``devices_indices_map`` gives) covers."""
    offset, size = [], []
    for part, dim in zip(index, shape):
        start, stop, _ = part.indices(dim)
        offset.append(start)
        size.append(stop - start)
    return Box(tuple(offset), tuple(size))


def _sharded_value(array: jax.Array, name: str) -> ShardedValue:
    """Each box of ``array`` this process holds; a box is written by one of the devices holding it.

    Every process knows every device's box (the sharding says), so each picks the same writer
    for a box -- spread over the holders by the value's name and the box -- with no agreement
    needed, and every box is written once.
    """
    shape = tuple(array.shape)
    holders: dict[Box, list] = {}
    for device, index in array.sharding.devices_indices_map(shape).items():
        holders.setdefault(_box(index, shape), []).append(device)
    written, held = [], []
    for shard in array.addressable_shards:
        box = _box(shard.index, shape)
        devices = sorted(holders[box], key=lambda device: device.id)
        piece = Shard(box.offset, leaves.FrozenArray(np.asarray(shard.data)))
        (written if devices[spread_writer(name, box, len(devices))] == shard.device else held).append(piece)
    return ShardedValue(shape, dtype_string(np.dtype(array.dtype)), tuple(written), tuple(held))


def save_value(array: jax.Array, name: str = "") -> Any:
    """A host view of ``array`` taken now (typed keys: their key data, with the implementation's name).

    An array split over devices is saved shard by shard from each device's own data, with no gather.
    """
    if isinstance(array, jax.ShapeDtypeStruct):
        raise TypeError("an abstract array (jax.ShapeDtypeStruct) has no values to save; it can only be restored into")
    if _is_key(array):
        return leaves.KeyArray(leaves.FrozenArray(np.asarray(jax.random.key_data(array))), str(jax.random.key_impl(array)))
    if _held_in_part(array):
        return _sharded_value(array, name)
    return leaves.FrozenArray(np.asarray(array))


def boxes(like: Any) -> ShardedTarget | None:
    """For a leaf split over devices, a request for the boxes of this process's devices only."""
    if not _held_in_part(like):
        return None
    shape = tuple(like.shape)
    unique = dict.fromkeys(_box(index, shape) for index in like.sharding.addressable_devices_indices_map(shape).values())
    return ShardedTarget(tuple(unique))


def destination(array: jax.Array, spec: Any) -> ShardedTarget | None:
    return boxes(array)  # immutable: a restore builds a new array (of this process's boxes, when split)


def restored(value: Any, like: jax.Array, *, into: bool = False) -> jax.Array:
    """A new array with ``like``'s dtype, shape and sharding holding host array ``value``.

    ``like`` may be abstract (a ``jax.ShapeDtypeStruct``): its sharding, when it has one, places
    the array; without one the array goes to the default device. ``into`` changes nothing: JAX
    arrays are immutable.
    """
    sharding = getattr(like, "sharding", None)
    if isinstance(value, list):  # one array per box of this process's devices (see boxes)
        return _from_boxes(value, like)
    leaves.check_alike(value, like)
    return jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)


def _from_boxes(arrays: list, like: Any) -> jax.Array:
    shape = tuple(like.shape)
    by_box = dict(zip(boxes(like).boxes, arrays))
    for box, array in by_box.items():
        if np.dtype(array.dtype) != np.dtype(like.dtype):
            raise ValueError(f"the checkpoint value is {np.dtype(array.dtype)} but the live array is "
                             f"{np.dtype(like.dtype)}{list(shape)}")
    return jax.make_array_from_callback(shape, like.sharding, lambda index: by_box[_box(index, shape)])


def host_view(array: jax.Array) -> Any:
    """A CPU array as NumPy (read-only, no copy); an array on a GPU (or an abstract one) as it is."""
    if not isinstance(array, jax.Array):
        return array
    on_host = all(device.platform == "cpu" for device in array.devices())
    return np.asarray(array) if on_host and not _is_key(array) else array


def new(value: Any) -> jax.Array:
    """A JAX array on the default device holding host array ``value``."""
    return jnp.asarray(value)


def restored_key(value: Any, impl: str, like: Any) -> jax.Array:
    """The typed PRNG key whose key data is ``value``, placed like ``like`` when there is one."""
    if like is not None and (not is_array(like) or not _is_key(like)):
        raise ValueError(f"the checkpoint holds a PRNG key but the live leaf is {getattr(like, 'dtype', type(like))}")
    key = jax.random.wrap_key_data(jnp.asarray(value), impl=impl)
    if like is not None:
        if isinstance(like, jax.Array) and str(jax.random.key_impl(like)) != impl:
            raise ValueError(f"the checkpoint holds a {impl} key but the live key is {jax.random.key_impl(like)}")
        if tuple(like.shape) != tuple(key.shape):
            raise ValueError(f"the checkpoint holds keys of shape {list(key.shape)} but the live keys are {list(like.shape)}")
        sharding = getattr(like, "sharding", None)
        key = jax.device_put(key, sharding) if sharding is not None else key
    return key


def adapt(value: Any) -> Any:
    """A :class:`PyTree` for a JAX array or a tree holding some; ``None`` otherwise."""
    if is_array(value) or leaves.holds_framework_arrays(jax.tree_util.tree_leaves(value)):
        return PyTree(value)
    return None
