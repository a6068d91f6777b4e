"""One stager per device backend, owned by the process state: shared, replaceable, never leaked."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest

from asyncckpt import _cuda
from asyncckpt.testing.fake_device import FakeDeviceBackend


@pytest.fixture
def backend():
    device = FakeDeviceBackend(memory_bytes=1 << 20)
    yield device
    device.close()


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
