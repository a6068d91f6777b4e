"""``ShardedVariable``: a variable of which this process holds only some boxes of the global array.

Each rank of a tensor-parallel or sharded run holds its own slices; the checkpoint stores the
global value once, each box written by one rank (format version 2), and a restore gives every
rank its own boxes whatever slicing -- and however many ranks -- saved it. Each box is a
:class:`~asyncckpt.Variable`, so a save has the same snapshot guarantee as for whole variables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from asyncckpt import _arrays
from asyncckpt.dtypes import dtype_string
from asyncckpt.model.trackable import Trackable
from asyncckpt.model.variable import VARIABLE_VALUE_KEY, Variable
from asyncckpt.shards import Box, Shard, ShardedTarget, ShardedValue, spread_writer

__all__ = ["ShardedVariable"]


class ShardedVariable(Trackable):
    """Boxes of one global array held by this process, saved and restored as that global array.

    Parameters
    ----------
    global_shape:
        The shape of the whole array, the same on every rank.
    pieces:
        ``[(offset, array), ...]``: each box this process holds, by its offset in the global
        array; the array (NumPy or device) is the box's elements. Arrays are wrapped as
        :class:`~asyncckpt.Variable` (not copied), available as :attr:`pieces`.
    replicas:
        How many ranks hold each of these boxes (replicated along a mesh dimension), and which
        of them this rank is: ``(index, count)``. Of the ``count`` holders exactly one writes a
        box (chosen alike on all of them, spread over boxes). ``(0, 1)``: nobody else holds them.
    name:
        The variable's name; also what spreads the writing of replicated boxes.

    A restore reads into each piece the elements of its box, from a checkpoint saved by any
    number of ranks with any slicing, or from a whole (unsharded) value of the global shape.
    """

    def __init__(self, global_shape: Sequence[int], pieces: Sequence[tuple[Sequence[int], Any]], *,
                 replicas: tuple[int, int] = (0, 1), name: str | None = None) -> None:
        self._maybe_initialize_trackable()
        self._global_shape = tuple(int(dim) for dim in global_shape)
        index, count = replicas
        if not (isinstance(count, int) and isinstance(index, int) and 0 <= index < count):
            raise ValueError(f"replicas must be (index, count) with 0 <= index < count, got {replicas!r}")
        self._replicas = (index, count)
        self._name = name or "ShardedVariable"
        self._pieces: list[tuple[tuple[int, ...], Variable]] = []
        dtypes = set()
        for offset, array in pieces:
            if isinstance(array, Variable):
                variable = array
            elif _arrays.is_device_array(array):
                variable = Variable.wrap(array, name=self._name)
            else:
                variable = Variable(array, name=self._name)
            offset = tuple(int(start) for start in offset)
            if len(offset) != len(self._global_shape) or len(variable.shape) != len(offset) or any(
                    start < 0 or start + size > dim
                    for start, size, dim in zip(offset, variable.shape, self._global_shape)):
                raise ValueError(f"the piece at offset {list(offset)} with shape {list(variable.shape)} does not fit "
                                 f"in the global shape {list(self._global_shape)}")
            dtypes.add(np.dtype(variable.dtype))
            self._pieces.append((offset, variable))
        if len(dtypes) > 1:
            raise ValueError(f"the pieces of a ShardedVariable must share one dtype, got {sorted(map(str, dtypes))}")
        if not dtypes:
            raise ValueError("a ShardedVariable needs at least one piece (a rank holding nothing saves nothing)")
        self._dtype = dtypes.pop()

    @classmethod
    def shard(cls, local: Any, *, global_shape: Sequence[int], offset: Sequence[int],
              replicas: tuple[int, int] = (0, 1), name: str | None = None) -> "ShardedVariable":
        """A sharded variable of one box: ``local`` at ``offset`` of ``global_shape``."""
        return cls(global_shape, [(offset, local)], replicas=replicas, name=name)

    @property
    def global_shape(self) -> tuple[int, ...]:
        return self._global_shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def pieces(self) -> list[tuple[tuple[int, ...], Variable]]:
        """``(offset, Variable)`` of every box this process holds."""
        return list(self._pieces)

    @property
    def local(self) -> Variable:
        """The one piece's variable (for a sharded variable of one box)."""
        if len(self._pieces) != 1:
            raise ValueError(f"this ShardedVariable holds {len(self._pieces)} pieces; use .pieces")
        return self._pieces[0][1]

    def boxes(self) -> tuple[Box, ...]:
        return tuple(Box(offset, variable.shape) for offset, variable in self._pieces)

    # ------------------------------------------------------------------ checkpointing
    def _serialize_to_tensors(self) -> dict[str, Any]:
        index, count = self._replicas
        written, held = [], []
        for offset, variable in self._pieces:
            mine = spread_writer(self._name, Box(offset, variable.shape), count) == index
            (written if mine else held).append(Shard(offset, variable))
        value = ShardedValue(self._global_shape, dtype_string(self._dtype), tuple(written), tuple(held))
        return {VARIABLE_VALUE_KEY: value}

    def _checkpoint_attribute_names(self) -> tuple[str, ...]:
        return (VARIABLE_VALUE_KEY,)

    def _restore_destination(self, name: str, spec: Any, source: str | None = None) -> ShardedTarget | None:
        """The boxes of this process's pieces, read straight into host pieces (checked first)."""
        if name != VARIABLE_VALUE_KEY:
            return None
        self._check_spec(spec, source)
        out = []
        for _, variable in self._pieces:
            array = variable.array
            readable = type(array) is np.ndarray and array.flags.c_contiguous and array.flags.writeable
            if readable:
                variable._run_mutation_hooks()
            out.append(array if readable else None)
        return ShardedTarget(self.boxes(), tuple(out))

    def _restore_from_tensors(self, restored_tensors: dict[str, Any]) -> None:
        values = restored_tensors[VARIABLE_VALUE_KEY]
        if not isinstance(values, list) or len(values) != len(self._pieces):
            raise ValueError(f"expected the {len(self._pieces)} boxes of {self._name!r}, got {type(values).__name__}")
        for (_, variable), value in zip(self._pieces, values):
            if value is not variable.array:
                variable._mutate(lambda array, value=value: _arrays.copy_into(array, value))

    def _check_spec(self, spec: Any, source: str | None) -> None:
        origin = f" from {source}" if source else ""
        if isinstance(spec.dtype, str):
            raise ValueError(f"Received a byte string{origin} when attempting to restore sharded variable "
                             f"{self._name!r}.")
        if tuple(spec.shape) != self._global_shape:
            raise ValueError(f"Received a value of global shape {tuple(spec.shape)}{origin} when attempting to "
                             f"restore sharded variable {self._name!r} of global shape {self._global_shape}.")
        if np.dtype(spec.dtype) != self._dtype:
            raise ValueError(f"Received a value of dtype {np.dtype(spec.dtype)}{origin} when attempting to restore "
                             f"sharded variable {self._name!r} of dtype {self._dtype}.")

    def __repr__(self) -> str:
        boxes = ", ".join(box.describe() for box in self.boxes())
        return f"<ShardedVariable {self._name!r} {list(self._global_shape)} {self._dtype}: {boxes}>"
