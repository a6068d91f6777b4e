"""The device staging engine (asyncckpt._cuda) on the CPU fake backend: ordering, policies, pooling.

The fake runs each stream's operations in order on a worker thread, so "a kernel still running when
save() is called" is a kernel blocked on a test gate, and every ordering claim is checked with
events and gates, never with sleeps.
"""

from __future__ import annotations

import gc
import math
import threading

import numpy as np
import pytest

from asyncckpt import _cuda
from asyncckpt._cuda import (
    DEVICE_COPY,
    HOST_COPY,
    STREAM_WAIT,
    DeviceBackend,
    DeviceCopyError,
    HostSyncError,
    Stager,
)
from asyncckpt.testing.fake_device import FakeDeviceBackend

from _fakes import CopyGate  # noqa: E402

CHUNK = 64  # bytes per pinned buffer in these tests: arrays of a few hundred bytes span several chunks


@pytest.fixture
def gate():
    return CopyGate()


@pytest.fixture
def backend(gate):
    device = FakeDeviceBackend(memory_bytes=1 << 20, copy_hook=gate)
    yield device
    gate.opened.set()  # never leave a stream worker blocked
    device.close()


def stager_for_policy(backend, policy: str, *, pinned_chunks: int = 16) -> Stager:
    """A stager whose automatic choice lands on ``policy`` for arrays of a few hundred bytes.

    Small arrays are not packed here (``pack_bytes=0``): these tests are about one array's policy.
    """
    if policy == DEVICE_COPY:
        return Stager(backend, pinned_bytes=pinned_chunks * CHUNK, chunk_bytes=CHUNK, pack_bytes=0)
    if policy == STREAM_WAIT:
        return Stager(backend, pinned_bytes=pinned_chunks * CHUNK, chunk_bytes=CHUNK, safety_factor=math.inf,
                      pack_bytes=0)
    return Stager(backend, pinned_bytes=CHUNK, chunk_bytes=CHUNK, safety_factor=math.inf, pack_bytes=0)


def read_all(capture) -> np.ndarray:
    out = np.empty(capture.shape, dtype=capture.dtype)
    capture.read_into(0, out.reshape(-1).view(np.uint8))
    return out


def test_backends_satisfy_the_protocol(backend):
    assert isinstance(backend, DeviceBackend)
    assert not isinstance(object(), DeviceBackend)


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


# ---------------------------------------------------------------------------------------------
# Chunks, pool and errors


@pytest.mark.parametrize("policy", [DEVICE_COPY, STREAM_WAIT])
def test_first_chunk_is_readable_before_the_last_is_copied(backend, gate, policy):
    values = np.arange(4 * CHUNK // 8, dtype=np.int64)  # exactly 4 chunks
    x = backend.array(values)
    gate.hold_at = 4
    (capture,) = stager_for_policy(backend, policy).stage([x])
    assert capture.num_chunks == 4
    chunks = capture.chunks()
    offset, first = next(chunks)
    assert offset == 0
    assert bytes(first) == values.tobytes()[:CHUNK]
    assert gate.held.is_set() and not capture.chunk_ready(3), "the last chunk must still be in flight"
    gate.opened.set()
    rest = b"".join(bytes(view) for _, view in chunks)
    assert bytes(first[:0]) + values.tobytes()[:CHUNK] + rest == values.tobytes()
    assert capture.consumed


@pytest.mark.parametrize("policy", [DEVICE_COPY, STREAM_WAIT])
def test_a_failed_copy_surfaces_as_device_copy_error_naming_the_array_and_bytes(backend, gate, policy):
    values = np.arange(3 * CHUNK // 8, dtype=np.int64)
    x = backend.array(values)
    gate.fail_at = 2
    (capture,) = stager_for_policy(backend, policy).stage([x], labels=["model/kernel"])
    out = bytearray(CHUNK)
    capture.read_into(0, out)  # the first chunk made it
    assert bytes(out) == values.tobytes()[:CHUNK]
    with pytest.raises(DeviceCopyError, match=rf"bytes \[{CHUNK}, {2 * CHUNK}\) of 'model/kernel'") as failure:
        capture.read_into(CHUNK, bytearray(CHUNK))
    assert isinstance(failure.value.__cause__, RuntimeError)
    assert "simulated DMA fault" in str(failure.value)
    capture.close()


def test_a_failed_host_copy_fails_the_save(backend, gate):
    gate.fail_at = 1
    x = backend.array(np.arange(16, dtype=np.int64))
    with pytest.raises(DeviceCopyError, match="simulated DMA fault"):
        stager_for_policy(backend, HOST_COPY).stage([x])


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


def test_reads_in_any_order_work_with_a_tiny_pool_without_waiting_for_buffers(backend):
    stager = stager_for_policy(backend, DEVICE_COPY, pinned_chunks=2)
    values = [np.arange(i * 100, i * 100 + 3 * CHUNK // 8, dtype=np.int64) for i in range(3)]
    captures = stager.stage([backend.array(v) for v in values])
    outs = [bytearray(v.nbytes) for v in values]
    order = [(2, 2), (0, 1), (1, 0), (2, 0), (0, 0), (1, 2), (2, 1), (0, 2), (1, 1)]
    for array_index, chunk_index in order:
        start = chunk_index * CHUNK
        captures[array_index].read_into(start, memoryview(outs[array_index])[start : start + CHUNK])
    for out, v in zip(outs, values):
        assert bytes(out) == v.tobytes()
    assert stager.stats["evictions"] > 0
    assert backend.pinned_peak_bytes <= 2 * CHUNK


def test_a_read_with_every_buffer_in_use_copies_directly_instead_of_waiting(backend):
    stager = stager_for_policy(backend, DEVICE_COPY, pinned_chunks=1)
    a = np.arange(2 * CHUNK // 8, dtype=np.int64)
    b = -a
    first, second = stager.stage([backend.array(a), backend.array(b)])
    chunks = first.chunks()
    _, held = next(chunks)  # holds the only pinned buffer
    np.testing.assert_array_equal(read_all(second), b)
    assert stager.stats["direct_reads"] == 2
    assert bytes(held) == a.tobytes()[:CHUNK]
    assert b"".join(bytes(v) for _, v in chunks) == a.tobytes()[CHUNK:]


def test_pieces_spanning_chunks_and_partial_chunks_read_once(backend):
    values = np.arange(5 * CHUNK // 8, dtype=np.int64)
    (capture,) = stager_for_policy(backend, DEVICE_COPY).stage([backend.array(values)])
    out = bytearray(values.nbytes)
    for start, stop in ((0, 10), (10, 150), (150, 151), (151, values.nbytes)):
        capture.read_into(start, memoryview(out)[start:stop])
    assert bytes(out) == values.tobytes()
    assert capture.consumed
    with pytest.raises(RuntimeError, match="already read"):
        capture.read_into(0, bytearray(8))


def test_read_into_checks_its_arguments(backend):
    (capture,) = stager_for_policy(backend, DEVICE_COPY).stage([backend.array(np.zeros(4, np.int64))], labels=["v"])
    with pytest.raises(ValueError, match=r"bytes \[30, 40\) are outside 'v' of 32 bytes"):
        capture.read_into(30, bytearray(10))
    with pytest.raises(ValueError, match="writable"):
        capture.read_into(0, b"12345678")
    assert capture.host_bytes(0, 32).tobytes() == bytes(32)


def test_closing_or_dropping_unread_captures_returns_their_buffers(backend):
    stager = stager_for_policy(backend, STREAM_WAIT, pinned_chunks=4)
    x = backend.array(np.arange(4 * CHUNK // 8, dtype=np.int64))
    (capture,) = stager.stage([x])
    assert stager.pool.free_buffers == 0
    capture.close()
    assert stager.pool.free_buffers == 4
    with pytest.raises(RuntimeError, match="closed"):
        capture.read_into(0, bytearray(8))
    (capture,) = stager.stage([x])
    assert stager.pool.free_buffers == 0
    del capture
    gc.collect()
    assert stager.pool.free_buffers == 4
    (capture,) = stager.stage([x])  # the returned buffers serve the next save
    np.testing.assert_array_equal(read_all(capture), backend.peek(x))
    assert backend.pinned_allocations == 4


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


def test_concurrent_readers_of_different_captures(backend):
    stager = stager_for_policy(backend, DEVICE_COPY, pinned_chunks=3)
    values = [np.arange(i, i + 20 * CHUNK // 8, dtype=np.int64) for i in range(4)]
    captures = stager.stage([backend.array(v) for v in values])
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def reader(index: int) -> None:
        try:
            results[index] = read_all(captures[index])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for i, v in enumerate(values):
        np.testing.assert_array_equal(results[i], v)
    assert backend.pinned_peak_bytes <= 3 * CHUNK


def test_the_snapshot_read_pattern_of_a_write_plan(backend):
    """Files in plan order, pieces in segments: packs of small arrays read ahead of capture order."""
    from asyncckpt.io.plan import PlanItem, plan_write

    rng = np.random.default_rng(5)
    values = [rng.integers(0, 1000, size, dtype=np.int64) for size in (5, 300, 7, 90, 2, 260, 11)]
    stager = stager_for_policy(backend, DEVICE_COPY, pinned_chunks=3)
    captures = stager.stage([backend.array(v) for v in values], labels=[f"k{i}" for i in range(len(values))])
    plan = plan_write(
        [PlanItem(c.label, c.nbytes) for c in captures], small_array_bytes=100, pack_bytes=256, chunk_bytes=500
    )
    segment = 96
    for file in plan.files:
        content = bytearray()
        for piece in file.pieces:
            for start in range(0, piece.length, segment):
                stop = min(piece.length, start + segment)
                content += captures[piece.item].host_bytes(piece.item_offset + start, piece.item_offset + stop)
        expected = b"".join(
            values[piece.item].tobytes()[piece.item_offset : piece.item_offset + piece.length] for piece in file.pieces
        )
        assert bytes(content) == expected, file.name
    assert all(capture.consumed for capture in captures)
    assert backend.pinned_peak_bytes <= 3 * CHUNK


# ---------------------------------------------------------------------------------------------
# Uploads


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


# ---------------------------------------------------------------------------------------------
# Entry points and validation


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


# ---------------------------------------------------------------------------------------------
# Packing small arrays into one device copy


def packing_stager(backend, *, pinned_chunks: int = 16) -> Stager:
    return Stager(backend, pinned_bytes=pinned_chunks * CHUNK, chunk_bytes=CHUNK, pack_bytes=4 * CHUNK)


def small_values(count: int = 40) -> list[np.ndarray]:
    dtypes = [np.int8, np.float32, np.int64, np.float16, np.complex64]
    return [np.arange(i, i + 1 + (7 * i) % 23, dtype=dtypes[i % len(dtypes)]) for i in range(count)]


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


def test_packed_windows_read_through_acquire_and_chunks_in_any_order(backend):
    values = [np.arange(30, dtype=np.int64) * (i + 1) for i in range(6)]  # 240 bytes each, CHUNK 64
    captures = packing_stager(backend, pinned_chunks=2).stage([backend.array(v) for v in values])
    order = [5, 0, 3, 1, 4, 2]
    for index in order:
        capture = captures[index]
        if index % 2:
            got = b"".join(bytes(view) for _, view in capture.chunks())
        else:
            parts, offset = [], 0
            while offset < capture.nbytes:
                view = capture.acquire(offset, capture.nbytes - offset)
                parts.append(bytes(view))
                capture.release(offset, len(view))
                offset += len(view)
            got = b"".join(parts)
        assert got == values[index].tobytes()
    assert backend.pinned_peak_bytes <= 2 * CHUNK


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


def test_a_failed_copy_of_the_pack_names_the_array_being_read(backend, gate):
    gate.fail_at = 1
    captures = packing_stager(backend).stage([backend.array(np.arange(4.0)) for _ in range(3)],
                                             labels=["layer0/kernel", "layer0/bias", "step"])
    with pytest.raises(DeviceCopyError, match="layer0/bias"):
        read_all(captures[1])


def test_the_pack_and_its_buffers_go_back_only_when_every_window_is_closed(backend):
    arrays = [backend.array(np.arange(20, dtype=np.int64)) for _ in range(4)]
    baseline = backend.allocated_bytes
    stager = packing_stager(backend)
    captures = stager.stage(arrays)
    assert backend.allocated_bytes == baseline + 4 * 160
    read_all(captures[0])
    for capture in captures[:3]:
        capture.close()
    backend.synchronize()
    stager.collect()
    assert backend.allocated_bytes == baseline + 4 * 160  # the last window still reads the pack
    np.testing.assert_array_equal(read_all(captures[3]), np.arange(20))
    captures[3].close()
    backend.synchronize()
    stager.collect()
    assert backend.allocated_bytes == baseline
    assert stager.pool.free_buffers == stager.pool.max_buffers


# ---------------------------------------------------------------------------------------------
# Resources on error paths and when the pool changes


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


def test_a_read_failing_while_its_capture_is_closed_returns_the_buffer(backend, gate):
    gate.hold_at = gate.fail_at = 1
    stager = Stager(backend, chunk_bytes=CHUNK, pinned_bytes=4 * CHUNK, safety_factor=math.inf, pack_bytes=0)
    (capture,) = stager.stage([backend.array(np.arange(8.0))], labels=["x"])  # stream_wait: buffer taken now
    errors = []
    reader = threading.Thread(target=lambda: errors.append(pytest.raises(DeviceCopyError, capture.acquire, 0, 64)))
    reader.start()
    assert gate.held.wait(30)
    while backend.host_syncs == 0:  # the reader is waiting for the copy
        threading.Event().wait(0.001)
    capture.close()  # an aborted write, while the read still waits
    gate.opened.set()
    reader.join()
    assert errors and stager.pool.free_buffers == stager.pool.max_buffers


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


def test_captures_made_after_the_chunks_shrank_are_still_prefetched(backend):
    stager = Stager(backend, chunk_bytes=CHUNK, pinned_bytes=2 * CHUNK, pack_bytes=0)
    old = stager.stage([backend.array(np.arange(4 * CHUNK // 8, dtype=np.float64))])  # 4 chunks, 2 buffers
    stager.prefetch()
    stager.set_pinned_bytes(CHUNK // 2)
    (new,) = stager.stage([backend.array(np.arange(CHUNK // 16, dtype=np.float64))])
    stager.prefetch()
    backend.synchronize()
    assert new.chunk_ready(0)
    np.testing.assert_array_equal(read_all(new), np.arange(CHUNK // 16, dtype=np.float64))
    np.testing.assert_array_equal(read_all(old[0]), np.arange(4 * CHUNK // 8, dtype=np.float64))


def test_the_prefetch_record_stays_bounded_over_many_saves(backend):
    stager = Stager(backend, chunk_bytes=CHUNK, pinned_bytes=8 * CHUNK, pack_bytes=0)
    array = backend.array(np.arange(4 * CHUNK // 8, dtype=np.float64))
    for _ in range(100):
        (capture,) = stager.stage([array])
        read_all(capture)
        capture.close()
    assert len(stager.capturer.reader._prefetched) <= 2 * stager.pool.max_buffers + 16


def test_packed_arrays_start_on_eight_byte_boundaries_and_read_back_whole(backend, gate):
    values = [np.arange(3, dtype=np.int8), np.arange(5, dtype=np.float64), np.arange(7, dtype=np.int16),
              np.arange(2, dtype=np.complex64)]
    stager = Stager(backend, chunk_bytes=CHUNK, pinned_bytes=8 * CHUNK, pack_bytes=1024)
    captures = stager.stage([backend.array(v) for v in values])
    assert [c._base % 8 for c in captures] == [0, 0, 0, 0]
    for capture, value in zip(captures, values):
        np.testing.assert_array_equal(read_all(capture), value)
    assert stager.pool.free_buffers == stager.pool.max_buffers  # padding counted as read: chunks recycled
