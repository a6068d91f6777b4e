"""The simulated device (asyncckpt.testing.fake_device): bounded memory, sticky stream errors, no leaks."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from asyncckpt.testing.fake_device import FakeDeviceBackend

from _device import CopyGate, simulated_device


@pytest.fixture
def gate():
    return CopyGate()


@pytest.fixture
def backend(gate):
    yield from simulated_device(gate)


def test_fake_device_memory_is_bounded_and_accounted(backend):
    before = backend.allocated_bytes
    x = backend.empty((1000,), np.int64)
    assert backend.allocated_bytes == before + 8000
    assert backend.mem_info() == ((1 << 20) - before - 8000, 1 << 20)
    del x
    gc.collect()
    assert backend.allocated_bytes == before
    with pytest.raises(MemoryError, match="out of fake device memory"):
        backend.empty((1 << 20,), np.int64)


def test_a_failed_fake_stream_skips_later_copies_and_fails_later_events(backend):
    stream = backend.new_stream("s")
    x = backend.array(np.zeros(4))

    def bad_kernel(data):
        raise ValueError("kernel fault")

    backend.launch(stream, bad_kernel, x)
    backend.launch(stream, lambda data: data.fill(1), x)
    with pytest.raises(ValueError, match="kernel fault"):
        backend.synchronize_event(backend.record_event(stream))
    np.testing.assert_array_equal(backend.peek(x), np.zeros(4))


def test_a_dropped_device_is_collected_and_stops_its_stream_workers():
    device = FakeDeviceBackend(memory_bytes=1 << 20)
    stream = device.new_stream("s")
    x = device.array(np.arange(8.0))  # arrays and pinned buffers outliving the device
    pinned = device.alloc_pinned(64)
    device.d2h_async(x, 0, pinned, stream)  # the stream's last operation refers to the device
    device.synchronize()
    reference = weakref.ref(device)
    del device
    gc.collect()
    assert reference() is None and x.backend is None
    stream._thread.join(30)
    assert not stream._thread.is_alive()
    np.testing.assert_array_equal(pinned.view(np.float64), np.arange(8.0))
