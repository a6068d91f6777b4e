"""The pinned pool (asyncckpt._cuda.pinned): buffers reused, bounded by the budget, freed as it shrinks."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from asyncckpt._cuda import DEVICE_COPY, Stager
from asyncckpt.testing.fake_device import FakeDeviceBackend

from _device import CHUNK, CopyGate, read_all, simulated_device, stager_for_policy


@pytest.fixture
def gate():
    return CopyGate()


@pytest.fixture
def backend(gate):
    yield from simulated_device(gate)


def test_pinned_buffers_are_reused_across_saves_and_never_exceed_the_budget(backend):
    stager = stager_for_policy(backend, DEVICE_COPY, pinned_chunks=4)
    arrays = [backend.array(np.full(10 * CHUNK // 8, i, np.int64)) for i in range(3)]
    for save in range(3):
        captures = stager.stage(arrays)
        for i, capture in enumerate(captures):
            np.testing.assert_array_equal(read_all(capture), np.full(10 * CHUNK // 8, i))
        assert stager.pool.allocated_bytes <= 4 * CHUNK
    assert backend.pinned_allocations == 4, "buffers must be allocated once and reused"
    assert backend.pinned_peak_bytes <= 4 * CHUNK
    assert stager.stats["prefetched"] > 0


def test_lowering_the_pinned_budget_frees_buffers(backend):
    stager = stager_for_policy(backend, DEVICE_COPY, pinned_chunks=4)
    stager.warm_up()
    assert stager.pool.allocated_bytes == 4 * CHUNK
    stager.set_pinned_bytes(2 * CHUNK)
    assert stager.pool.allocated_bytes == 2 * CHUNK
    gc.collect()
    assert backend.pinned_live_bytes == 2 * CHUNK


def test_a_budget_below_one_chunk_shrinks_the_chunks_to_stay_within_it(backend):
    stager = stager_for_policy(backend, DEVICE_COPY, pinned_chunks=4)
    values = np.arange(3 * CHUNK // 8, dtype=np.int64)
    (before,) = stager.stage([backend.array(values)])  # holds 64-byte buffers of the old pool
    stager.set_pinned_bytes(CHUNK // 2)
    assert stager.chunk_bytes == CHUNK // 2 and stager.pool.capacity_bytes == CHUNK // 2
    (after,) = stager.stage([backend.array(values)])
    assert after.num_chunks == 6
    np.testing.assert_array_equal(read_all(before), values)
    np.testing.assert_array_equal(read_all(after), values)
    before.close()
    after.close()
    stager.collect()
    gc.collect()
    assert backend.pinned_live_bytes <= CHUNK // 2
    stager.set_pinned_bytes(8 * CHUNK)  # back above the configured chunk: full-size chunks again
    assert stager.chunk_bytes == CHUNK


def test_a_pinned_buffer_dropped_while_a_copy_uses_it_is_kept_until_the_copy_ends():
    uploads = threading.Event()
    held = FakeDeviceBackend(memory_bytes=1 << 20, copy_hook=lambda kind, n: kind != "h2d" or uploads.wait())
    try:
        stager = Stager(held, chunk_bytes=CHUNK, pinned_bytes=4 * CHUNK)
        target = held.array(np.zeros(CHUNK // 8))
        stager.begin_uploads()
        buffer = stager.take_upload_buffer(CHUNK)
        stager.upload_window(buffer, [(0, CHUNK, target, 0)])  # back in the pool, its copy held
        stager.set_pinned_bytes(CHUNK // 2)  # a smaller budget: a new pool, the old one retired
        graveyard = [memory for pool in (stager.pool, *stager.staging.old_pools) for _, memory in pool.graveyard]
        assert any(memory is buffer.array for memory in graveyard)
        uploads.set()
        held.synchronize()
        stager.collect()
        assert not [entry for pool in (stager.pool, *stager.staging.old_pools) for entry in pool.graveyard]
    finally:
        uploads.set()
        held.close()
