"""Shared pieces of the device engine tests (``tests/test_cuda_*.py``), on the simulated device.

The simulated device runs each stream's operations in order on a worker thread, so "a kernel still
running when save() is called" is a kernel blocked on a test gate, and every ordering claim is
checked with events and gates, never with sleeps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from asyncckpt._cuda import DEVICE_COPY, STREAM_WAIT, CapturePolicy, Stager
from asyncckpt.testing.fake_device import FakeDeviceBackend

from _fakes import CopyGate

__all__ = ["CHUNK", "CopyGate", "DeviceHolder", "simulated_device", "stager_for_policy", "packing_stager", "read_all", "small_values"]

CHUNK = 64  # bytes per pinned buffer in these tests: arrays of a few hundred bytes span several chunks


class DeviceHolder:
    """A snapshot source holding a device array (as a device ``Variable`` is to the writer), counting its hooks."""

    def __init__(self, array) -> None:
        self.array = array
        self.hooks: list = []
        self.hooks_added = 0

    def _snapshot_array(self):
        return self.array

    def _add_mutation_hook(self, hook) -> None:
        self.hooks.append(hook)
        self.hooks_added += 1

    def _remove_mutation_hook(self, hook) -> None:
        self.hooks.remove(hook)


def simulated_device(gate: CopyGate) -> Iterator[FakeDeviceBackend]:
    """A simulated device of 1 MiB whose copies go through ``gate``, closed afterwards (a fixture's body)."""
    device = FakeDeviceBackend(memory_bytes=1 << 20, copy_hook=gate)
    yield device
    gate.opened.set()  # never leave a stream worker blocked
    device.close()


def stager_for_policy(backend, policy: CapturePolicy, *, pinned_chunks: int = 16) -> Stager:
    """A stager whose automatic choice lands on ``policy`` for arrays of a few hundred bytes.

    Small arrays are not packed here (``pack_bytes=0``): these tests are about one array's policy.
    """
    if policy == DEVICE_COPY:
        return Stager(backend, pinned_bytes=pinned_chunks * CHUNK, chunk_bytes=CHUNK, pack_bytes=0)
    if policy == STREAM_WAIT:
        return Stager(backend, pinned_bytes=pinned_chunks * CHUNK, chunk_bytes=CHUNK, safety_factor=math.inf,
                      pack_bytes=0)
    return Stager(backend, pinned_bytes=CHUNK, chunk_bytes=CHUNK, safety_factor=math.inf, pack_bytes=0)


def packing_stager(backend, *, pinned_chunks: int = 16) -> Stager:
    """A stager that packs arrays of up to four chunks into one device copy."""
    return Stager(backend, pinned_bytes=pinned_chunks * CHUNK, chunk_bytes=CHUNK, pack_bytes=4 * CHUNK)


def read_all(capture) -> np.ndarray:
    """The captured value, read whole through ``read_into``."""
    out = np.empty(capture.shape, dtype=capture.dtype)
    capture.read_into(0, out.reshape(-1).view(np.uint8))
    return out


def small_values(count: int = 40) -> list[np.ndarray]:
    """``count`` small arrays of mixed dtypes and odd sizes (their packed windows straddle chunks)."""
    dtypes = [np.int8, np.float32, np.int64, np.float16, np.complex64]
    return [np.arange(i, i + 1 + (7 * i) % 23, dtype=dtypes[i % len(dtypes)]) for i in range(count)]
