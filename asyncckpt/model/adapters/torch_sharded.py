"""DTensors: each rank saves its own shard of a ``torch.distributed.tensor.DTensor``, restores its own box.

A DTensor (what FSDP2's ``fully_shard`` and tensor parallelism make of parameters and optimizer
moments) is a global tensor of which each rank holds a local piece, placed on a device mesh by
``Shard(dim)`` and ``Replicate()`` placements. A save records the global shape and this rank's
box (``compute_local_shape_and_global_offset``); a box replicated along mesh dimensions is
written by one of its holders, picked alike on each. A restore asks for this rank's box only,
from a checkpoint of any slicing and any number of ranks, and reads it straight into the local
tensor when it can. ``Partial`` placements (pending reductions) are refused.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from asyncckpt.dtypes import dtype_string
from asyncckpt.model.adapters import torch as torch_adapter
from asyncckpt.shards import Box, Shard, ShardedTarget, ShardedValue, spread_writer

__all__ = ["is_dtensor", "local_tensor", "save_value", "destination", "boxes", "restored"]


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a DTensor (only ever true once ``torch.distributed.tensor`` is imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    kind = getattr(module, "DTensor", None) if module is not None else None
    return kind is not None and isinstance(value, kind)


def local_tensor(dtensor: Any) -> torch.Tensor:
    """The tensor holding this rank's piece (the same memory the DTensor computes with)."""
    return dtensor._local_tensor


def _layout(dtensor: Any) -> tuple[Box, int, int]:
    """``(this rank's box, its replica index, how many ranks hold that box)``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # noqa: PLC0415

    placements = tuple(dtensor.placements)
    if any(placement.is_partial() for placement in placements):
        raise TypeError(f"a DTensor with a Partial placement ({placements}) holds unreduced partial values; "
                        "redistribute it to Shard or Replicate placements before saving")
    mesh = dtensor.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError("this rank is not in the DTensor's device mesh: it holds no part of it")
    shape, offset = compute_local_shape_and_global_offset(dtensor.shape, mesh, placements)
    index, count = 0, 1
    for dim, placement in enumerate(placements):
        if placement.is_replicate():
            index = index * mesh.size(dim) + coordinate[dim]
            count *= mesh.size(dim)
    return Box(tuple(int(o) for o in offset), tuple(int(s) for s in shape)), index, count


def save_value(dtensor: Any, name: str = "") -> ShardedValue:
    """The global shape and, when this rank writes it, its box (from the local tensor's own memory)."""
    box, index, count = _layout(dtensor)
    dtype = dtype_string(torch_adapter.numpy_dtype(dtensor.dtype))
    shard = Shard(box.offset, torch_adapter.save_value(local_tensor(dtensor).detach()))
    if spread_writer(name, box, count) != index:
        return ShardedValue(tuple(dtensor.shape), dtype, held=(shard,))  # another holder writes it
    return ShardedValue(tuple(dtensor.shape), dtype, (shard,))


def boxes(dtensor: Any) -> ShardedTarget:
    """A request for this rank's box only, read into new memory."""
    return ShardedTarget((_layout(dtensor)[0],))


def destination(dtensor: Any, spec: Any) -> ShardedTarget | None:
    """This rank's box, read straight into the local tensor when it is a contiguous CPU tensor."""
    if torch_adapter.mismatch(dtensor, spec) is not None:
        return None
    local = local_tensor(dtensor)
    target = boxes(dtensor)
    if local.device.type == "cpu" and local.is_contiguous() and not (local.is_conj() or local.is_neg()):
        torch_adapter.before_change([local])
        target.out = (torch_adapter.to_numpy_view(local),)
    return target


def restored(value: Any, like: Any, *, into: bool = False) -> Any:
    """``like`` with its box from ``value`` (one array per box, or the whole value), or a new DTensor."""
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    box = _layout(like)[0]
    array = value[0] if isinstance(value, list) else np.asarray(value)[box.slices()]
    if tuple(array.shape) != box.shape:
        raise ValueError(f"the restored box is {list(array.shape)} but this rank's part is {list(box.shape)}")
    local = local_tensor(like)
    if into and local.device.type != "meta":
        if local.device.type == "cpu" and _shares_memory(array, local):
            return like  # read straight into it
        if local.is_cpu:
            torch_adapter.before_change([local])
        with torch.no_grad():
            local.copy_(torch_adapter.new(array))
        return like
    tensor = torch_adapter.new(array)
    if local.device.type != "cpu":
        tensor = tensor.to(local.device)
    return DTensor.from_local(tensor, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def _shares_memory(array: np.ndarray, local: torch.Tensor) -> bool:
    return isinstance(array, np.ndarray) and array.size > 0 and local.numel() > 0 and (
        array.__array_interface__["data"][0] == local.data_ptr())
