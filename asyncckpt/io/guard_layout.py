"""Which holder owns which pieces of a write plan: derived once per plan, reused by every write of it.

A :class:`~asyncckpt.io.snapshot.Snapshot` guards values by holder (a ``Variable``, a tensor's
source): a holder's mutation hook must know every piece of every file its bytes are in, and which
holders register their hooks in bulk. That layout depends only on the sources and the plan, so a
program that saves the same objects again keeps it (:class:`~asyncckpt.io.write.PreparedWrite`)
instead of deriving it at every ``save()``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from asyncckpt.io.plan import WritePlan
from asyncckpt.io.sources import Source, SourceKind

__all__ = ["DeviceCaptureCache", "GuardLayout"]


@dataclass
class DeviceCaptureCache:
    """What capturing a structure's device arrays takes, worked out once (see :meth:`Snapshot.capture_device_values`)."""

    arrays: tuple[Any, ...]  # the live arrays of the layout's device items, compared by identity
    plan: Any  # a _cuda.CapturePlan over the captured items' arrays
    items: tuple[int, ...]  # the items it captures (device arrays among the device items)
    remaining: tuple[int, ...]  # pieces to guard per holder: none for the captured ones
    slots: dict[int, tuple[int, int]]  # item -> (capture index, byte offset), for the plan's usual slots

    def matches(self, arrays: Sequence[Any]) -> bool:
        return len(arrays) == len(self.arrays) and all(map(operator.is_, arrays, self.arrays))


class GuardLayout:
    """Which holder owns which pieces of a plan: derived once, reusable by every write of that plan.

    Parameters
    ----------
    sources, plan:
        From :func:`prepare_sources` and :func:`~asyncckpt.io.plan.plan_write` (one item per source).
    """

    def __init__(self, sources: Sequence[Source], plan: WritePlan) -> None:
        holder_index: dict[int, int] = {}
        holders: list[Any] = []
        item_holder = [-1] * len(sources)
        for item, source in enumerate(sources):
            if source.kind is SourceKind.HOLDER:
                index = holder_index.get(id(source.value))
                if index is None:
                    index = holder_index[id(source.value)] = len(holders)
                    holders.append(source.value)
                item_holder[item] = index
        #: Per source item: the holder it belongs to (-1 for none).
        self.item_holders: tuple[int, ...] = tuple(item_holder)
        #: Holders whose array was not a NumPy array when prepared: captured on the device.
        self.device_items: tuple[int, ...] = tuple(
            item for item, source in enumerate(sources) if source.off_host and source.nbytes
        )
        self.device_holders: tuple[Any, ...] = tuple(sources[item].value for item in self.device_items)
        #: The last save's :class:`DeviceCaptureCache`, reused while the arrays are the same objects.
        self.device_cache: DeviceCaptureCache | None = None
        pieces_by_holder: list[dict[int, list[int]]] = [{} for _ in holders]
        #: Per file, per piece: the holder it belongs to (-1 for none).
        self.piece_holders: tuple[tuple[int, ...], ...] = tuple(
            tuple(item_holder[piece.item] for piece in file.pieces) for file in plan.files
        )
        for file_index, owners in enumerate(self.piece_holders):
            for piece_index, owner in enumerate(owners):
                if owner >= 0:
                    pieces_by_holder[owner].setdefault(file_index, []).append(piece_index)
        #: The distinct holders, in order of first appearance.
        self.holders: tuple[Any, ...] = tuple(holders)
        #: Per holder: ``((file_index, piece_indices), ...)``.
        self.holder_pieces: tuple[tuple[tuple[int, tuple[int, ...]], ...], ...] = tuple(
            tuple((file_index, tuple(indices)) for file_index, indices in by_file.items())
            for by_file in pieces_by_holder
        )
        self.piece_counts: tuple[int, ...] = tuple(
            sum(len(indices) for _, indices in by_file) for by_file in self.holder_pieces
        )
        # Holders whose type registers hooks in bulk, grouped by that registration function.
        self.bulk_tables: list[tuple[Callable, dict[int, int]]] = []
        self.single: tuple[int, ...] = ()
        tables: dict[Any, tuple[Callable, dict[int, int]]] = {}
        single = []
        for index, holder in enumerate(holders):
            if not self.piece_counts[index]:
                continue  # an empty value: nothing to guard
            add_many = getattr(type(holder), "_add_mutation_hooks", None)
            if callable(add_many):
                group = tables.setdefault(getattr(add_many, "__func__", add_many), (add_many, {}))
                group[1][id(holder)] = index
            else:
                single.append(index)
        self.bulk_tables = list(tables.values())
        self.single = tuple(single)
