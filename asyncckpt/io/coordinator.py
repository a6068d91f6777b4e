"""The coordinator seam: the few collective operations a save of several ranks needs.

A save of ``count`` ranks needs: this rank's number and the count, a *gather* of small payloads
(each rank's section, or its error) to the chief, and a *broadcast* of the outcome from it.
Every rank enters every collective exactly once, in the same order, even after its own part
failed: that is what keeps any rank from hanging, and what carries a failure anywhere to every
rank's ``sync()``. A rank that never arrives fails the collective within ``timeout_seconds``
with :class:`~asyncckpt.errors.CheckpointTimeoutError`, naming it.

Implementations:

* :class:`~asyncckpt.io.torch_coordinator.TorchDistributedCoordinator` -- over ``torch.distributed``, on a gloo group of its own
  (so the checkpoint's collectives, run on a background thread, never interleave with the
  training's NCCL ones);
* :class:`InProcessCoordinator` -- ranks as threads of one process, for tests and for
  programs that run several "ranks" in one interpreter.

Payloads are bytes: nothing is pickled between ranks, and the chief parses what it gathers as
untrusted input, like any file it reads.
"""

from __future__ import annotations

import abc
import asyncio
import threading
import time
from typing import Any

from asyncckpt.errors import CheckpointTimeoutError

__all__ = ["CHIEF", "Coordinator", "InProcessCoordinator", "check_timeout"]

#: The chief: it gathers, merges, commits and broadcasts the outcome.
CHIEF = 0


class Coordinator(abc.ABC):
    """Collectives over ``count`` ranks; ``rank`` is this process's (0 is the chief)."""

    rank: int
    count: int
    timeout_seconds: float

    @property
    def is_chief(self) -> bool:
        return self.rank == CHIEF

    @abc.abstractmethod
    async def gather(self, payload: bytes) -> list[bytes] | None:
        """Every rank's ``payload`` on the chief, in rank order; ``None`` on the other ranks."""

    @abc.abstractmethod
    async def broadcast(self, payload: bytes | None) -> bytes:
        """The chief's ``payload`` on every rank (the others pass ``None``)."""

    @abc.abstractmethod
    async def all_gather(self, payload: bytes) -> list[bytes]:
        """Every rank's ``payload`` on every rank, in rank order."""

    async def abandon(self, outcome: bytes) -> None:
        """The chief's broadcast after its gather failed, where the others still wait for one.

        By default the outcome is broadcast; a coordinator whose failed collective already
        failed on every rank (a monitored barrier) sends nothing more.
        """
        await self.broadcast(outcome)


def _check_place(rank: Any, count: Any) -> None:
    if type(count) is not int or count < 1:
        raise ValueError(f"a coordinator's count must be a positive int, got {count!r}")
    if type(rank) is not int or not 0 <= rank < count:
        raise ValueError(f"a coordinator's rank must be an int in [0, {count}), got {rank!r}")


def check_timeout(timeout: Any, what: str = "timeout_seconds") -> float:
    """``timeout`` as a float; ``ValueError`` naming ``what`` unless it is a positive finite number."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"{what} must be a positive finite number, got {timeout!r}")
    return float(timeout)


# ---------------------------------------------------------------------------------------------
# In one process


class _Rendezvous:
    """What the ranks of one in-process group share: one slot table per collective call."""

    def __init__(self, count: int, timeout: float) -> None:
        self.count = count
        self.timeout = timeout
        self.changed = threading.Condition()
        self.slots: dict[int, dict[int, bytes]] = {}  # call number -> rank -> payload
        self.readers: dict[int, int] = {}  # call number -> how many ranks have taken its payloads

    def put(self, call: int, rank: int, payload: bytes) -> None:
        with self.changed:
            self.slots.setdefault(call, {})[rank] = payload
            self.changed.notify_all()

    def wait_for(self, call: int, ranks: range | tuple[int, ...], what: str, readers: int,
                 timeout: float | None = None) -> dict[int, bytes]:
        """The payloads of ``ranks`` for ``call`` once all are there; the last of ``readers`` drops them."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                slots = self.slots.get(call, {})
                missing = [rank for rank in ranks if rank not in slots]
                if not missing:
                    self.readers[call] = self.readers.get(call, 0) + 1
                    if self.readers[call] == readers:
                        del self.slots[call], self.readers[call]
                    return dict(slots)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CheckpointTimeoutError(
                        f"{what}: after {timeout:g} s rank(s) {', '.join(map(str, missing))} of "
                        f"{self.count} had not arrived"
                    )
                self.changed.wait(left)


class InProcessCoordinator(Coordinator):
    """One rank of a group whose ranks are threads (or event loops) of this process.

    Make the whole group at once with :meth:`group`; hand rank ``i``'s coordinator to the code
    that plays rank ``i``.
    """

    def __init__(self, rendezvous: _Rendezvous, rank: int) -> None:
        _check_place(rank, rendezvous.count)
        self._rendezvous = rendezvous
        self.rank = rank
        self.count = rendezvous.count
        self.timeout_seconds = rendezvous.timeout
        self._calls = 0

    @classmethod
    def group(cls, count: int, *, timeout_seconds: float = 60.0) -> list["InProcessCoordinator"]:
        """The ``count`` coordinators of one new group, rank by rank."""
        _check_place(0, count)
        rendezvous = _Rendezvous(count, check_timeout(timeout_seconds))
        return [cls(rendezvous, rank) for rank in range(count)]

    def _next_call(self) -> int:
        self._calls += 1
        return self._calls

    async def gather(self, payload: bytes) -> list[bytes] | None:
        call = self._next_call()
        self._rendezvous.put(call, self.rank, bytes(payload))
        if not self.is_chief:
            return None
        slots = await asyncio.to_thread(self._rendezvous.wait_for, call, range(self.count), "gathering to the chief", 1)
        return [slots[rank] for rank in range(self.count)]

    async def broadcast(self, payload: bytes | None) -> bytes:
        call = self._next_call()
        if self.is_chief:
            if payload is None:
                raise ValueError("the chief must give the payload it broadcasts")
            if self.count > 1:
                self._rendezvous.put(call, CHIEF, bytes(payload))
            return bytes(payload)
        # The chief may wait the whole timeout for a late rank before it can answer.
        slots = await asyncio.to_thread(self._rendezvous.wait_for, call, (CHIEF,), "waiting for the chief (rank 0)",
                                        self.count - 1, 2 * self.timeout_seconds)
        return slots[CHIEF]

    async def all_gather(self, payload: bytes) -> list[bytes]:
        call = self._next_call()
        self._rendezvous.put(call, self.rank, bytes(payload))
        slots = await asyncio.to_thread(self._rendezvous.wait_for, call, range(self.count), "gathering on every rank",
                                        self.count)
        return [slots[rank] for rank in range(self.count)]
