"""What a save structure's device arrays need, worked out once and reused at every save.

Grouping arrays by device and laying out each device's pack of small arrays costs a pass over every
array; a training loop saves the same variables again and again, so :class:`CapturePlan` does it
once and a repeat save costs a few calls whatever the number of variables.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from asyncckpt._cuda.backend import DeviceBackend
from asyncckpt._cuda.capture import PackPlan
from asyncckpt._cuda.cupy import backend_for
from asyncckpt._cuda.readback import DeviceCapture
from asyncckpt._cuda.stager import Stager, stager_for

__all__ = ["CapturePlan"]


class CapturePlan:
    """How the device arrays of one save structure are captured; reusable while they are the same objects.

    Small C-contiguous arrays of each device are gathered by one launch (a :class:`PackPlan`, whose
    table is made once); the others are staged one by one. So :meth:`capture`, run at every save,
    costs a few calls whatever the number of small arrays. ``backend`` overrides the CuPy backend
    of each array's device (tests pass a simulated one).
    """

    def __init__(self, arrays: Sequence[Any], labels: Sequence[str], backend: DeviceBackend | None = None) -> None:
        if len(labels) != len(arrays):
            raise ValueError(f"got {len(labels)} labels for {len(arrays)} arrays")
        self.arrays = tuple(arrays)
        groups: dict[int, tuple[DeviceBackend, list[int]]] = {}
        for index, array in enumerate(self.arrays):
            owner = backend if backend is not None else backend_for(array)
            groups.setdefault(id(owner), (owner, []))[1].append(index)
        # Per device: (stager, pack or None, packed indices, other indices, other arrays, their labels)
        self._groups: list[tuple[Stager, PackPlan | None, list[int], list[int], list[Any], list[str]]] = []
        for owner, indices in groups.values():
            stager = stager_for(owner)
            adopted = {i: owner.adopt(self.arrays[i]) for i in indices}
            small = [i for i in indices if 0 < int(adopted[i].nbytes) <= stager.pack_bytes
                     and owner.is_c_contiguous(adopted[i])]
            if len(small) < 2:
                small = []
            packed = set(small)
            others = [i for i in indices if i not in packed]
            pack = None
            if small:
                names = ", ".join(labels[i] for i in small[:3])
                pack = PackPlan([adopted[i] for i in small], label=f"{len(small)} packed arrays ({names}, ...)")
            self._groups.append((stager, pack, small, others, [adopted[i] for i in others], [labels[i] for i in others]))
        self._labels = tuple(labels)
        self.slots = self._slots([True] * len(self._groups))

    def matches(self, arrays: Sequence[Any]) -> bool:
        """Whether ``arrays`` are exactly the plan's array objects, in order."""
        return len(arrays) == len(self.arrays) and all(map(operator.is_, arrays, self.arrays))

    def _slots(self, packed_ok: Sequence[bool]) -> tuple[tuple[int, int], ...]:
        slots: list[tuple[int, int]] = [(0, 0)] * len(self.arrays)
        position = 0
        for (_, pack, small, others, _, _), ok in zip(self._groups, packed_ok):
            if pack is not None and ok:
                for index, offset in zip(small, pack.offsets):
                    slots[index] = (position, offset)
                position += 1
            else:
                for index in small:
                    slots[index] = (position, 0)
                    position += 1
            for index in others:
                slots[index] = (position, 0)
                position += 1
        return tuple(slots)

    def capture(self, pinned_bytes: int | None = None) -> tuple[list[DeviceCapture], tuple[tuple[int, int], ...]]:
        """Stage every array now: ``(captures, slots)``, array ``i`` at byte ``slots[i][1]`` of ``captures[slots[i][0]]``.

        Ordered like :meth:`Stager.stage`; ``pinned_bytes`` sets each stager's pool capacity.
        """
        captures: list[DeviceCapture] = []
        packed_ok = []
        try:
            for stager, pack, small, _, other_arrays, other_labels in self._groups:
                if pinned_bytes is not None:
                    stager.set_pinned_bytes(pinned_bytes)
                if pack is not None:
                    packed = stager.stage_pack(pack)
                    packed_ok.append(packed is not None)
                    if packed is not None:
                        captures.append(packed)
                    else:  # no device memory for the pack this time: the per-array policies
                        captures.extend(stager.stage(pack.arrays, labels=[self._labels[i] for i in small]))
                else:
                    packed_ok.append(True)
                if other_arrays:
                    captures.extend(stager.stage(other_arrays, labels=other_labels))
        except BaseException:
            for capture in captures:
                capture.close()
            raise
        slots = self.slots if all(packed_ok) else self._slots(packed_ok)
        return captures, slots
