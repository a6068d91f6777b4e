"""Reading captures back (asyncckpt._cuda.readback): by chunk, in any order, never waiting for a buffer."""

from __future__ import annotations

import gc
import math
import threading

import numpy as np
import pytest

from asyncckpt._cuda import DEVICE_COPY, STREAM_WAIT, DeviceCopyError, Stager

from _device import CHUNK, CopyGate, packing_stager, read_all, simulated_device, stager_for_policy


@pytest.fixture
def gate():
    return CopyGate()


@pytest.fixture
def backend(gate):
    yield from simulated_device(gate)


# ---------------------------------------------------------------------------------------------
# Chunks as they arrive


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
# Never waiting for a buffer


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


# ---------------------------------------------------------------------------------------------
# Giving resources back


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


# ---------------------------------------------------------------------------------------------
# Windows of a pack


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
