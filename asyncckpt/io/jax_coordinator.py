"""The coordinator over JAX's distributed runtime: its key-value store (multi-controller JAX).

After ``jax.distributed.initialize``, every process has a client of the coordination service's
key-value store; payloads travel as values under keys of this coordinator's namespace, and a rank
that never writes its key is named when the wait for it times out. The only module besides the
JAX adapter that imports jax, and only when one is built. JAX offers the client through
``jax._src.distributed.global_state`` only (as Orbax uses it).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

from asyncckpt.errors import CheckpointTimeoutError, CoordinationError
from asyncckpt.io.coordinator import CHIEF, Coordinator, check_timeout

__all__ = ["JaxDistributedCoordinator"]


class JaxDistributedCoordinator(Coordinator):
    """The processes of a multi-controller JAX program (``jax.process_index()`` of ``jax.process_count()``).

    Create one on every process, in the same order, after ``jax.distributed.initialize``: each
    gets the same namespace from ``name`` and the creation order.

    Parameters
    ----------
    name:
        Keeps the keys of several coordinators of one program apart.
    timeout_seconds:
        How long a collective waits for the slowest process.
    """

    _created = itertools.count()

    def __init__(self, name: str = "checkpoint", *, timeout_seconds: float = 600.0) -> None:
        import jax  # noqa: PLC0415
        from jax._src import distributed  # noqa: PLC0415

        client = distributed.global_state.client
        if client is None:
            raise RuntimeError("JaxDistributedCoordinator needs jax.distributed.initialize() first")
        self._client = client
        self.rank = jax.process_index()
        self.count = jax.process_count()
        self.timeout_seconds = check_timeout(timeout_seconds)
        self._namespace = f"asyncckpt/{name}/{next(self._created)}"
        self._calls = itertools.count(1)
        self._lock = threading.Lock()  # collectives in the order they are asked for
        self._last_broadcast: str | None = None

    def _key(self, call: int, what: str) -> str:
        return f"{self._namespace}/{call}/{what}"

    def _get(self, key: str, deadline: float, rank: int, what: str) -> bytes:
        left_ms = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            return self._client.blocking_key_value_get_bytes(key, left_ms)
        except Exception as exc:  # the runtime's own error type: a deadline, or the service gone
            if "DEADLINE_EXCEEDED" in str(exc) or "deadline" in str(exc).lower():
                raise CheckpointTimeoutError(
                    f"{what}: after {self.timeout_seconds:g} s rank {rank} of {self.count} had not arrived"
                ) from None
            raise CoordinationError(f"{what}: the JAX coordination service failed: {exc}") from exc

    def _gather(self, payload: bytes) -> list[bytes] | None:
        with self._lock:
            call = next(self._calls)
            self._client.key_value_set_bytes(self._key(call, f"gather/{self.rank}"), payload)
            if not self.is_chief:
                return None
            deadline = time.monotonic() + self.timeout_seconds
            gathered = [self._get(self._key(call, f"gather/{rank}"), deadline, rank, "gathering to the chief")
                        for rank in range(self.count)]
            for rank in range(self.count):
                self._client.key_value_delete(self._key(call, f"gather/{rank}"))
            if self._last_broadcast is not None:  # everyone gathered here has read it
                self._client.key_value_delete(self._last_broadcast)
                self._last_broadcast = None
            return gathered

    def _broadcast(self, payload: bytes | None) -> bytes:
        with self._lock:
            call = next(self._calls)
            key = self._key(call, "broadcast")
            if self.is_chief:
                self._client.key_value_set_bytes(key, payload)
                self._last_broadcast = key
                return payload
            # The chief may wait the whole timeout for a late rank before it can answer.
            deadline = time.monotonic() + 2 * self.timeout_seconds
            return self._get(key, deadline, CHIEF, "waiting for the chief (rank 0)")

    def _all_gather(self, payload: bytes) -> list[bytes]:
        with self._lock:
            call = next(self._calls)
            self._client.key_value_set_bytes(self._key(call, f"all/{self.rank}"), payload)
            deadline = time.monotonic() + self.timeout_seconds
            return [self._get(self._key(call, f"all/{rank}"), deadline, rank, "gathering on every rank")
                    for rank in range(self.count)]

    async def gather(self, payload: bytes) -> list[bytes] | None:
        return await asyncio.to_thread(self._gather, bytes(payload))

    async def broadcast(self, payload: bytes | None) -> bytes:
        if self.is_chief and payload is None:
            raise ValueError("the chief must give the payload it broadcasts")
        return await asyncio.to_thread(self._broadcast, None if payload is None else bytes(payload))

    async def all_gather(self, payload: bytes) -> list[bytes]:
        return await asyncio.to_thread(self._all_gather, bytes(payload))
