"""The coordinator over ``torch.distributed``: a gloo group of the checkpoint's own.

The only module besides the torch adapter that imports torch, and only when one is built.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import threading
import time

from asyncckpt.errors import CheckpointTimeoutError, CoordinationError
from asyncckpt.io.coordinator import CHIEF, Coordinator, check_timeout

__all__ = ["TorchDistributedCoordinator"]

#: How long, after a failed barrier, live ranks wait for each other to answer a roll call.
ROLL_CALL_SECONDS = 5.0



class TorchDistributedCoordinator(Coordinator):
    """The ranks of a ``torch.distributed`` process group, through a gloo group of the checkpoint's own.

    Create it on every rank at the same point of the program (``new_group`` is itself a
    collective), after ``torch.distributed.init_process_group``. Each collective is preceded by
    a ``monitored_barrier``, so a rank that died or never arrives is named in the error instead of
    leaving the others waiting.

    Parameters
    ----------
    ranks:
        The global ranks that save together (default: every rank).
    timeout_seconds:
        How long a collective waits for the slowest rank.
    """

    _created = itertools.count()

    def __init__(self, ranks: list[int] | None = None, *, timeout_seconds: float = 600.0) -> None:
        import torch.distributed as dist  # noqa: PLC0415

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchDistributedCoordinator needs torch.distributed.init_process_group() first")
        self.timeout_seconds = check_timeout(timeout_seconds)
        self._dist = dist
        self._timeout = datetime.timedelta(seconds=self.timeout_seconds)
        self._group = dist.new_group(ranks=ranks, backend="gloo", timeout=self._timeout)
        self.rank = dist.get_rank(self._group)
        self.count = dist.get_world_size(self._group)
        self._chief_global = dist.get_global_rank(self._group, CHIEF) if ranks is not None else CHIEF
        self._lock = threading.Lock()  # one collective at a time, in the order they are asked for
        self._name = next(self._created)  # the same on every rank: created in the same order
        self._failures = 0

    def close(self) -> None:
        """Destroy the checkpoint's gloo group (on every rank, before the default group goes)."""
        with self._lock:
            if self._group is not None:
                self._dist.destroy_process_group(self._group)
                self._group = None

    # Each method runs its blocking collectives on a worker thread.
    async def gather(self, payload: bytes) -> list[bytes] | None:
        return await asyncio.to_thread(self._locked, self._gather, bytes(payload))

    async def broadcast(self, payload: bytes | None) -> bytes:
        if self.is_chief and payload is None:
            raise ValueError("the chief must give the payload it broadcasts")
        return await asyncio.to_thread(self._locked, self._broadcast, payload)

    async def all_gather(self, payload: bytes) -> list[bytes]:
        return await asyncio.to_thread(self._locked, self._all_gather, bytes(payload))

    async def abandon(self, outcome: bytes) -> None:
        """Nothing: the monitored barrier that failed on the chief failed on every rank."""

    def _locked(self, function, payload):
        with self._lock:
            self._barrier()
            try:
                return function(payload)
            except RuntimeError as exc:
                raise CoordinationError(f"a checkpoint collective of rank {self.rank} of {self.count} failed: {exc}") from exc

    def _barrier(self) -> None:
        try:
            self._dist.monitored_barrier(group=self._group, timeout=self._timeout, wait_all_ranks=True)
        except RuntimeError as exc:
            absent = self._absent_ranks()
            named = f"rank(s) {', '.join(map(str, absent))} of {self.count}" if absent else "a rank"
            raise CheckpointTimeoutError(
                f"rank {self.rank} of {self.count}: {named} did not reach the checkpoint's collective within "
                f"{self.timeout_seconds:g} s: {exc}"
            ) from exc

    def _absent_ranks(self) -> list[int]:
        """After a failed barrier: the ranks that do not answer a roll call in the group's store.

        Gloo reports a rank whose process exited as a closed connection, without its rank; every
        live rank meets the same failure and answers here, so the silent ones are named.
        """
        from torch.distributed import distributed_c10d  # noqa: PLC0415

        self._failures += 1
        prefix = f"asyncckpt/{self._name}/roll-call/{self._failures}"
        try:
            store = distributed_c10d._get_default_store()
            store.set(f"{prefix}/{self.rank}", "here")
        except Exception:  # noqa: BLE001 - naming the rank is a courtesy; the save fails either way
            return []
        deadline = time.monotonic() + min(ROLL_CALL_SECONDS, self.timeout_seconds)
        absent = []
        for rank in range(self.count):
            left = max(0.001, deadline - time.monotonic())
            try:
                store.wait([f"{prefix}/{rank}"], datetime.timedelta(seconds=left))
            except Exception:  # noqa: BLE001 - the store's timeout error
                absent.append(rank)
        return absent

    def _tensor(self, payload: bytes):
        import torch  # noqa: PLC0415

        return torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)

    def _sizes(self, size: int) -> list[int]:
        import torch  # noqa: PLC0415

        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.count)]
        self._dist.all_gather(sizes, torch.tensor([size], dtype=torch.int64), group=self._group)
        return [int(tensor.item()) for tensor in sizes]

    def _padded(self, payload: bytes, length: int):
        import torch  # noqa: PLC0415

        tensor = torch.zeros(length, dtype=torch.uint8)
        if payload:
            tensor[: len(payload)] = self._tensor(payload)
        return tensor

    def _gather(self, payload: bytes) -> list[bytes] | None:
        import torch  # noqa: PLC0415

        sizes = self._sizes(len(payload))
        longest = max(max(sizes), 1)
        mine = self._padded(payload, longest)
        received = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.count)] if self.is_chief else None
        self._dist.gather(mine, gather_list=received, dst=self._chief_global, group=self._group)
        if received is None:
            return None
        return [received[rank][: sizes[rank]].numpy().tobytes() for rank in range(self.count)]

    def _broadcast(self, payload: bytes | None) -> bytes:
        import torch  # noqa: PLC0415

        size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64)
        self._dist.broadcast(size, src=self._chief_global, group=self._group)
        data = self._padded(payload or b"", max(int(size.item()), 1))
        self._dist.broadcast(data, src=self._chief_global, group=self._group)
        return data[: int(size.item())].numpy().tobytes()

    def _all_gather(self, payload: bytes) -> list[bytes]:
        import torch  # noqa: PLC0415

        sizes = self._sizes(len(payload))
        longest = max(max(sizes), 1)
        received = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.count)]
        self._dist.all_gather(received, self._padded(payload, longest), group=self._group)
        return [received[rank][: sizes[rank]].numpy().tobytes() for rank in range(self.count)]
