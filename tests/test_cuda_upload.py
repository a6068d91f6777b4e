"""Restoring (asyncckpt._cuda.upload): uploads ordered on the current stream through a small pinned pool."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from asyncckpt import _cuda
from asyncckpt._cuda import DEVICE_COPY, STREAM_WAIT

from _device import CHUNK, CopyGate, read_all, simulated_device, stager_for_policy


@pytest.fixture
def gate():
    return CopyGate()


@pytest.fixture
def backend(gate):
    yield from simulated_device(gate)


def test_upload_is_ordered_after_pending_work_and_before_later_work(backend):
    target = backend.array(np.zeros(100, np.float32))
    kernel_gate = threading.Event()
    backend.launch(backend.default_stream, lambda data: (kernel_gate.wait(), data.fill(5)), target)
    seen = []
    stager = stager_for_policy(backend, DEVICE_COPY)
    with backend.forbid_host_sync():
        stager.upload(np.arange(100, dtype=np.float32), target)
    backend.launch(backend.default_stream, lambda data: seen.append(data.copy()), target)
    kernel_gate.set()
    np.testing.assert_array_equal(backend.peek(target), np.arange(100, dtype=np.float32))
    np.testing.assert_array_equal(seen[0], np.arange(100, dtype=np.float32))


def test_large_upload_through_a_small_pool_reuses_buffers(backend, gate):
    stager = stager_for_policy(backend, DEVICE_COPY, pinned_chunks=2)
    values = np.random.default_rng(3).standard_normal(50 * CHUNK // 8)
    target = backend.empty(values.shape, values.dtype)
    stager.upload(values, target)
    np.testing.assert_array_equal(backend.peek(target), values)
    assert gate.log.count("h2d") == 50
    assert backend.pinned_allocations == 2
    assert stager.stats["uploaded_chunks"] == 50


def test_upload_into_a_non_contiguous_view_leaves_the_rest_alone(backend):
    base = backend.array(np.zeros((8, 6), np.int32))
    column = base[:, 2]
    stager_for_policy(backend, STREAM_WAIT).upload(np.arange(8, dtype=np.int32), column)
    expected = np.zeros((8, 6), np.int32)
    expected[:, 2] = np.arange(8)
    np.testing.assert_array_equal(backend.peek(base), expected)


def test_upload_with_every_buffer_held_copies_from_a_private_buffer(backend):
    stager = stager_for_policy(backend, DEVICE_COPY, pinned_chunks=1)
    values = np.arange(3 * CHUNK // 8, dtype=np.int64)
    (capture,) = stager.stage([backend.array(values)])
    chunks = capture.chunks()
    next(chunks)  # a reader holds the only buffer
    target = backend.empty((8,), np.int64)  # one chunk
    stager.upload(np.full(8, 9, np.int64), target)
    np.testing.assert_array_equal(backend.peek(target), np.full(8, 9))
    assert stager.stats["direct_uploads"] == 1
    chunks.close()


def test_upload_refuses_a_value_of_another_size(backend):
    target = backend.empty((4,), np.float32)
    with pytest.raises(ValueError, match=r"shape \(5,\) into an array of shape \(4,\)"):
        stager_for_policy(backend, DEVICE_COPY).upload(np.zeros(5, np.float32), target)


def test_download_waits_for_pending_work(backend):
    x = backend.array(np.zeros(10, np.int16))
    backend.launch(backend.default_stream, lambda data: data.fill(8), x)
    np.testing.assert_array_equal(_cuda.download(backend, x), np.full(10, 8, np.int16))
    np.testing.assert_array_equal(_cuda.download(backend, x.T[::2]), np.full(5, 8, np.int16))


def test_every_dtype_round_trips_through_capture_and_upload(backend):
    stager = stager_for_policy(backend, STREAM_WAIT)
    rng = np.random.default_rng(0)
    for dtype in ("bool", "int8", "uint16", "int32", "uint64", "float16", "float32", "float64", "complex64", "complex128"):
        values = (rng.standard_normal(37) * 100).astype(dtype)
        x = backend.array(values)
        (capture,) = stager.stage([x])
        assert capture.dtype == np.dtype(dtype)
        restored = read_all(capture)
        np.testing.assert_array_equal(restored, values)
        target = backend.empty(values.shape, values.dtype)
        stager.upload(restored, target)
        np.testing.assert_array_equal(backend.peek(target), values)
