"""Saving (asyncckpt._cuda.capture): what a capture holds, which policy it takes, the packed copy.

Every claim about ordering is checked on the simulated device with gates and events, never with
sleeps: a kernel "still running" at save time is an operation blocked on a gate.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from asyncckpt._cuda import DEVICE_COPY, HOST_COPY, STREAM_WAIT, DeviceCopyError, HostSyncError, Stager
from asyncckpt.testing.fake_device import FakeDeviceBackend

from _device import CHUNK, CopyGate, packing_stager, read_all, simulated_device, small_values, stager_for_policy


@pytest.fixture
def gate():
    return CopyGate()


@pytest.fixture
def backend(gate):
    yield from simulated_device(gate)


# ---------------------------------------------------------------------------------------------
# Ordering


@pytest.mark.parametrize("policy", [DEVICE_COPY, STREAM_WAIT])
def test_a_kernel_running_at_save_time_is_captured_after_it_finishes(backend, policy):
    n = 100
    x = backend.array(np.zeros(n, np.int64))
    kernel_gate = threading.Event()

    def slow_kernel(data):  # writes half, stalls, writes the rest: a capture "during" it is torn
        data[: n // 2] = 1
        kernel_gate.wait()
        data[n // 2 :] = 1

    backend.launch(backend.default_stream, slow_kernel, x)
    stager = stager_for_policy(backend, policy)
    with backend.forbid_host_sync():
        (capture,) = stager.stage([x], labels=["x"])
    assert capture.policy == policy
    backend.launch(backend.default_stream, lambda data: data.fill(2), x)  # training goes on
    stager.copy_stream.settle()  # copies not ordered after the kernel would have run by now
    kernel_gate.set()
    np.testing.assert_array_equal(read_all(capture), np.ones(n, np.int64))
    np.testing.assert_array_equal(backend.peek(x), np.full(n, 2))


@pytest.mark.parametrize("policy", [DEVICE_COPY, STREAM_WAIT])
def test_work_enqueued_after_save_is_not_captured_even_while_copies_are_held(backend, gate, policy):
    x = backend.array(np.arange(100, dtype=np.int64))
    gate.hold_at = 1  # the first device-to-host copy stalls
    stager = stager_for_policy(backend, policy)
    (capture,) = stager.stage([x])
    backend.launch(backend.default_stream, lambda data: data.__imul__(-1), x)
    backend.default_stream.settle()  # work not held back by the save would have run by now
    gate.opened.set()
    np.testing.assert_array_equal(read_all(capture), np.arange(100))
    np.testing.assert_array_equal(backend.peek(x), -np.arange(100))


def test_stream_wait_holds_later_training_work_on_the_device_until_the_copies_are_done(backend, gate):
    x = backend.array(np.arange(100, dtype=np.int64))
    gate.hold_at = 1
    stager = stager_for_policy(backend, STREAM_WAIT)
    with backend.forbid_host_sync():
        (capture,) = stager.stage([x])
    ran = []
    backend.launch(backend.default_stream, lambda data: ran.append(True), x)
    backend.default_stream.settle()  # idle, or blocked in a device-side event wait
    assert ran == [], "training work ran before the snapshot copies finished"
    gate.opened.set()
    backend.synchronize()
    assert ran == [True]
    assert gate.log.count("d2h") == capture.num_chunks
    np.testing.assert_array_equal(read_all(capture), np.arange(100))


def test_device_copy_leaves_the_training_stream_free_while_copies_to_the_host_are_held(backend, gate):
    x = backend.array(np.arange(100, dtype=np.int64))
    gate.hold_at = 1
    stager = stager_for_policy(backend, DEVICE_COPY)
    (capture,) = stager.stage([x])
    assert gate.log.count("d2h") == 0  # the copies to the host start at the first read, or:
    stager.prefetch()
    ran = []
    backend.launch(backend.default_stream, lambda data: ran.append(data.sum()), x)
    backend.default_stream.settle()
    assert ran == [sum(range(100))], "the training stream must only pay for the device-to-device copy"
    assert gate.held.wait() and not capture.chunk_ready(0)
    gate.opened.set()
    np.testing.assert_array_equal(read_all(capture), np.arange(100))


def test_work_on_another_stream_made_current_is_ordered_too(backend):
    training = backend.new_stream("training")
    x = backend.array(np.zeros(16, np.float32))
    kernel_gate = threading.Event()
    backend.launch(training, lambda data: (kernel_gate.wait(), data.fill(7)), x)
    stager = stager_for_policy(backend, STREAM_WAIT)
    with backend.use_stream(training):
        (capture,) = stager.stage([x])
    kernel_gate.set()
    np.testing.assert_array_equal(read_all(capture), np.full(16, 7, np.float32))


def test_save_does_not_wait_for_the_device_but_host_copy_does(backend):
    x = backend.array(np.arange(40, dtype=np.int32))
    for policy in (DEVICE_COPY, STREAM_WAIT):
        with backend.forbid_host_sync():
            (capture,) = stager_for_policy(backend, policy).stage([x])
        assert capture.policy == policy
        capture.close()
    with backend.forbid_host_sync(), pytest.raises(DeviceCopyError) as waited:
        stager_for_policy(backend, HOST_COPY).stage([x])
    assert isinstance(waited.value.__cause__, HostSyncError)


# ---------------------------------------------------------------------------------------------
# Policies


def test_device_copy_is_chosen_while_free_memory_covers_the_safety_factor(gate):
    nbytes = 800
    for memory, expected in ((10_000, DEVICE_COPY), (nbytes + 2 * nbytes, DEVICE_COPY), (nbytes + 2 * nbytes - 1, STREAM_WAIT)):
        device = FakeDeviceBackend(memory_bytes=memory, copy_hook=gate)
        try:
            x = device.array(np.arange(nbytes // 8, dtype=np.int64))  # free afterwards: memory - 800
            stager = Stager(device, pinned_bytes=16 * CHUNK, chunk_bytes=CHUNK, safety_factor=2.0)
            (capture,) = stager.stage([x])
            assert capture.policy == expected, memory
            np.testing.assert_array_equal(read_all(capture), np.arange(100))
        finally:
            device.close()


def test_policies_are_chosen_per_array_in_order_within_one_save(gate):
    device = FakeDeviceBackend(memory_bytes=3200, copy_hook=gate)
    try:
        arrays = [device.array(np.full(50, i, np.int64)) for i in range(4)]  # 4 x 400 bytes; 1600 free
        stager = Stager(device, pinned_bytes=8 * CHUNK, chunk_bytes=CHUNK, safety_factor=2.0, pack_bytes=0)
        captures = stager.stage(arrays)
        # 2 x (400 copied) <= 1600, then 2 x 800 > 1600; 7 chunks of pinned memory fit one array, not two.
        assert [c.policy for c in captures] == [DEVICE_COPY, DEVICE_COPY, STREAM_WAIT, HOST_COPY]
        for i, capture in enumerate(captures):
            np.testing.assert_array_equal(read_all(capture), np.full(50, i))
    finally:
        device.close()


def test_device_copies_are_freed_once_read(backend):
    x = backend.array(np.arange(100, dtype=np.int64))
    baseline = backend.allocated_bytes
    stager = stager_for_policy(backend, DEVICE_COPY)
    (capture,) = stager.stage([x])
    assert backend.allocated_bytes == baseline + x.nbytes
    read_all(capture)
    backend.synchronize()
    stager.collect()
    assert backend.allocated_bytes == baseline


def test_out_of_memory_during_the_device_copy_falls_back_to_stream_wait(gate):
    class ShrinkingBackend(FakeDeviceBackend):
        def mem_info(self):  # reports memory that another process grabs before we allocate
            return 1 << 30, 1 << 30

    device = ShrinkingBackend(memory_bytes=2000, copy_hook=gate)
    try:
        x = device.array(np.arange(200, dtype=np.int64))  # 1600 of 2000 bytes: no room for a copy
        stager = Stager(device, pinned_bytes=32 * CHUNK, chunk_bytes=CHUNK)
        (capture,) = stager.stage([x])
        assert capture.policy == STREAM_WAIT
        np.testing.assert_array_equal(read_all(capture), np.arange(200))
    finally:
        device.close()


def test_host_copy_is_the_last_resort_and_still_captures_the_pending_work(backend):
    x = backend.array(np.zeros(40, np.int32))
    backend.launch(backend.default_stream, lambda data: data.fill(3), x)
    stager = stager_for_policy(backend, HOST_COPY)
    syncs = backend.host_syncs
    (capture,) = stager.stage([x])
    assert capture.policy == HOST_COPY
    assert backend.host_syncs == syncs + 1
    backend.launch(backend.default_stream, lambda data: data.fill(4), x)
    np.testing.assert_array_equal(read_all(capture), np.full(40, 3, np.int32))


def test_a_failed_host_copy_fails_the_save(backend, gate):
    gate.fail_at = 1
    x = backend.array(np.arange(16, dtype=np.int64))
    with pytest.raises(DeviceCopyError, match="simulated DMA fault"):
        stager_for_policy(backend, HOST_COPY).stage([x])


def test_stream_wait_reserves_only_what_the_pool_holds(backend):
    stager = stager_for_policy(backend, STREAM_WAIT, pinned_chunks=4)
    small = backend.array(np.arange(3 * CHUNK // 8, dtype=np.int64))  # 3 chunks: fits
    big = backend.array(np.arange(5 * CHUNK // 8, dtype=np.int64))  # 5 chunks: never fits
    captures = stager.stage([small, big, small])
    assert [c.policy for c in captures] == [STREAM_WAIT, HOST_COPY, HOST_COPY]
    assert backend.pinned_peak_bytes <= 4 * CHUNK
    for capture, values in zip(captures, (small, big, small)):
        np.testing.assert_array_equal(read_all(capture), backend.peek(values))
    assert stager.pool.free_buffers == 4


@pytest.mark.parametrize("policy", [DEVICE_COPY, STREAM_WAIT, HOST_COPY])
def test_non_contiguous_arrays_are_captured_in_c_order(backend, policy):
    base = np.arange(60, dtype=np.float64).reshape(6, 10)
    x = backend.array(base)
    view = x.T[::2]  # non-contiguous view: shape (5, 6)
    (capture,) = stager_for_policy(backend, policy).stage([view])
    assert capture.shape == (5, 6)
    np.testing.assert_array_equal(read_all(capture), base.T[::2])


def test_non_contiguous_array_without_memory_for_a_copy_is_refused_by_name(gate):
    device = FakeDeviceBackend(memory_bytes=800, copy_hook=gate)
    try:
        x = device.array(np.zeros((10, 10), np.int64))
        with pytest.raises(DeviceCopyError, match="cannot capture 'w': it is not C-contiguous"):
            Stager(device, pinned_bytes=32 * CHUNK, chunk_bytes=CHUNK).stage([x.T], labels=["w"])
    finally:
        device.close()


def test_empty_and_zero_dimensional_arrays(backend):
    empty = backend.array(np.zeros((0, 3), np.float32))
    scalar = backend.array(np.float64(2.5))
    for policy in (DEVICE_COPY, STREAM_WAIT):
        captures = stager_for_policy(backend, policy).stage([empty, scalar])
        assert captures[0].nbytes == 0 and list(captures[0].chunks()) == []
        assert captures[0].consumed
        assert read_all(captures[1]) == 2.5 and captures[1].shape == ()


# ---------------------------------------------------------------------------------------------
# Packing small arrays into one device copy


def test_small_arrays_are_gathered_by_one_launch_and_read_back_exactly(backend, gate):
    values = small_values()
    stager = packing_stager(backend)
    with backend.forbid_host_sync():
        captures = stager.stage([backend.array(v) for v in values], labels=[f"v{i}" for i in range(40)])
    backend.default_stream.settle()
    assert gate.log.count("gather") == 1 and gate.log.count("d2d") == 0
    assert stager.stats["packed_arrays"] == 40 and stager.stats["device_copies"] == 1
    assert [c.label for c in captures[:2]] == ["v0", "v1"] and captures[0].policy == DEVICE_COPY
    for capture, value in zip(captures, values):  # odd sizes: windows straddle chunk boundaries
        assert (capture.dtype, capture.shape, capture.nbytes) == (value.dtype, value.shape, value.nbytes)
        np.testing.assert_array_equal(read_all(capture), value)
        assert capture.consumed
    assert stager.pool.free_buffers == stager.pool.max_buffers


def test_a_kernel_pending_at_save_is_in_the_pack_and_later_work_is_not(backend):
    arrays = [backend.array(np.zeros(10, np.int32)) for _ in range(5)]
    kernel_gate = threading.Event()

    def slow_kernel(*data):
        data[0][:] = 1
        kernel_gate.wait()
        for d in data:
            d[:] = 1

    backend.launch(backend.default_stream, slow_kernel, *arrays)
    stager = packing_stager(backend)
    with backend.forbid_host_sync():
        captures = stager.stage(arrays)
    for array in arrays:
        backend.launch(backend.default_stream, lambda d: d.fill(9), array)
    stager.copy_stream.settle()
    kernel_gate.set()
    for capture in captures:
        np.testing.assert_array_equal(read_all(capture), np.ones(10, np.int32))


def test_without_memory_for_the_pack_small_arrays_take_the_per_array_policies(gate):
    device = FakeDeviceBackend(memory_bytes=2000, copy_hook=gate)
    try:
        arrays = [device.array(np.full(25, i, np.int64)) for i in range(4)]  # 800 of 2000 bytes used
        stager = Stager(device, pinned_bytes=32 * CHUNK, chunk_bytes=CHUNK, pack_bytes=4 * CHUNK)
        captures = stager.stage(arrays)  # a pack of 800 needs 1600 free (factor 2): 1200 is free
        assert stager.stats["packed_arrays"] == 0 and gate.log.count("gather") == 0
        for i, capture in enumerate(captures):
            np.testing.assert_array_equal(read_all(capture), np.full(25, i))
    finally:
        device.close()


def test_large_and_non_contiguous_arrays_stay_out_of_the_pack(backend):
    small = [np.arange(8, dtype=np.int64) + i for i in range(3)]
    large = np.arange(6 * CHUNK // 8, dtype=np.int64)  # above pack_bytes
    strided = backend.array(np.arange(40, dtype=np.float64).reshape(4, 10))[:, ::3]
    arrays = [backend.array(small[0]), backend.array(large), strided, backend.array(small[1]), backend.array(small[2])]
    stager = packing_stager(backend)
    captures = stager.stage(arrays)
    assert stager.stats["packed_arrays"] == 3 and stager.stats["device_copies"] == 3
    expected = [small[0], large, np.arange(40, dtype=np.float64).reshape(4, 10)[:, ::3], small[1], small[2]]
    for capture, value in zip(captures, expected):
        np.testing.assert_array_equal(read_all(capture), value)


def test_packed_arrays_start_on_eight_byte_boundaries_and_read_back_whole(backend, gate):
    values = [np.arange(3, dtype=np.int8), np.arange(5, dtype=np.float64), np.arange(7, dtype=np.int16),
              np.arange(2, dtype=np.complex64)]
    stager = Stager(backend, chunk_bytes=CHUNK, pinned_bytes=8 * CHUNK, pack_bytes=1024)
    captures = stager.stage([backend.array(v) for v in values])
    assert [c._base % 8 for c in captures] == [0, 0, 0, 0]
    for capture, value in zip(captures, values):
        np.testing.assert_array_equal(read_all(capture), value)
    assert stager.pool.free_buffers == stager.pool.max_buffers  # padding counted as read: chunks recycled


def test_a_stage_failing_after_the_pack_frees_the_packed_copy(gate):
    device = FakeDeviceBackend(memory_bytes=6820, copy_hook=gate)
    try:
        stager = Stager(device, chunk_bytes=CHUNK, pinned_bytes=8 * CHUNK, pack_bytes=1024)
        small = [device.array(np.full(100, i, np.float64)) for i in range(2)]  # packed: 1,600 bytes
        strided = device.array(np.zeros((20, 12))).T  # no memory left for its contiguous copy
        baseline = device.allocated_bytes
        with pytest.raises(DeviceCopyError, match="strided"):
            stager.stage(small + [strided], labels=["a", "b", "strided"])
        device.synchronize()
        stager.collect()
        assert device.allocated_bytes == baseline
        stager.prefetch()
        assert stager.pool.free_buffers == stager.pool.max_buffers  # nothing prefetched for nobody
    finally:
        device.close()
