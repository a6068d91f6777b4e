"""A device's stager (asyncckpt._cuda.stager): settings, entry points, one per backend per process."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest

from asyncckpt import _cuda
from asyncckpt._cuda import DEVICE_COPY, Stager
from asyncckpt.testing.fake_device import FakeDeviceBackend

from _device import CHUNK, read_all, stager_for_policy


@pytest.fixture
def backend():
    device = FakeDeviceBackend(memory_bytes=1 << 20)
    yield device
    device.close()


def test_module_entry_points_share_one_stager_per_backend(backend):
    x = backend.array(np.arange(30, dtype=np.int32))
    (capture,) = _cuda.stage_device_arrays(backend, [x], labels=["x"], pinned_bytes=4 * CHUNK)
    assert _cuda.stager_for(backend) is _cuda.stager_for(backend)
    assert _cuda.stager_for(backend).pool.capacity_bytes == 4 * CHUNK
    np.testing.assert_array_equal(read_all(capture), np.arange(30))
    target = backend.empty((30,), np.int32)
    _cuda.upload(backend, np.arange(30)[::-1], target)
    np.testing.assert_array_equal(backend.peek(target), np.arange(30)[::-1])


def test_stager_rejects_bad_settings_and_inputs(backend):
    with pytest.raises(ValueError, match="chunk_bytes"):
        Stager(backend, chunk_bytes=0)
    with pytest.raises(ValueError, match="pinned_bytes"):
        Stager(backend, pinned_bytes=-1)
    with pytest.raises(ValueError, match="safety_factor"):
        Stager(backend, safety_factor=0.5)
    with pytest.raises(ValueError, match="pack_bytes"):
        Stager(backend, pack_bytes=-1)
    stager = stager_for_policy(backend, DEVICE_COPY)
    with pytest.raises(ValueError, match="2 labels for 1 arrays"):
        stager.stage([backend.array([1])], labels=["a", "b"])
    with pytest.raises(TypeError, match="ndarray is not an array of"):
        stager.stage([np.zeros(3)])
    other = FakeDeviceBackend()
    try:
        with pytest.raises(TypeError, match="FakeDeviceArray is not an array of"):
            stager.stage([other.array([1.0])])
    finally:
        other.close()
    stager.close()
    with pytest.raises(RuntimeError, match="closed"):
        stager.stage([backend.array([1])])


def test_each_backend_has_one_stager_made_on_first_use(backend):
    other = FakeDeviceBackend()
    try:
        assert _cuda.stager_for(backend) is _cuda.stager_for(backend)
        assert _cuda.stager_for(other) is not _cuda.stager_for(backend)
        assert _cuda.stager_for(backend).backend is backend
        assert _cuda.stager_for(backend).chunk_bytes == _cuda.DEFAULT_CHUNK_BYTES
    finally:
        other.close()


def test_configure_gives_the_backend_a_new_stager_with_those_settings(backend):
    default = _cuda.stager_for(backend)
    configured = _cuda.stagers().configure(backend, chunk_bytes=64, pinned_bytes=256, pack_bytes=0)
    assert configured is not default and _cuda.stager_for(backend) is configured
    assert (configured.chunk_bytes, configured.pool.capacity_bytes, configured.pack_bytes) == (64, 256, 0)
    target = backend.empty((32,), np.int64)
    _cuda.upload(backend, np.arange(32), target)  # the entry points use the configured stager
    assert configured.stats["uploaded_chunks"] == 4 and default.stats["uploaded_chunks"] == 0


def test_a_dropped_backend_goes_with_its_stager_and_pinned_pool():
    device = FakeDeviceBackend(memory_bytes=1 << 20)
    stager = _cuda.stagers().configure(device, chunk_bytes=64, pinned_bytes=4 * 64)
    target = device.empty((40,), np.int64)
    _cuda.upload(device, np.arange(40), target)  # pinned buffers allocated and pooled
    read, unread = stager.stage([target, device.array(np.arange(30.0))])
    read.read_into(0, bytearray(read.nbytes))  # a device copy retired, waiting for its last copy
    device_ref, stager_ref = weakref.ref(device), weakref.ref(stager)
    count = len(_cuda.stagers())
    del device, stager, target, read
    gc.collect()
    assert device_ref() is not None, "an unread capture keeps its device alive"
    del unread
    gc.collect()
    assert device_ref() is None and stager_ref() is None
    assert len(_cuda.stagers()) == count - 1


def test_a_forked_child_starts_with_new_stagers():
    script = textwrap.dedent(
        """
        import os
        from asyncckpt import _cuda
        from asyncckpt.testing.fake_device import FakeDeviceBackend

        backend = FakeDeviceBackend()
        parent = _cuda.stager_for(backend)
        child = os.fork()
        if child == 0:
            fresh = _cuda.stager_for(backend)
            os._exit(0 if fresh is not parent and fresh is _cuda.stager_for(backend) else 1)
        _, status = os.waitpid(child, 0)
        backend.close()
        raise SystemExit(os.waitstatus_to_exitcode(status))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
