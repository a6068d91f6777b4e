"""Reading a checkpoint into device arrays through pinned buffers, on the CPU fake backend.

``CheckpointReader.read_many(out={key: device_array}, stager=...)`` reads each window of a device
destination straight into a pinned buffer of the stager's pool, verifies it and uploads it on the
upload stream while the next window is read. Small data files and a 48-byte stager chunk make one
value span several data files and each extent span several windows (48 does not divide the
200-byte extents, so windows also end inside extents and packed values). Ordering is checked with
gated kernels and a copy hook, never with sleeps.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from asyncckpt import _cuda
from asyncckpt import io as ckio
from asyncckpt._cuda import Stager
from asyncckpt.testing.fake_device import FakeDeviceBackend
from asyncckpt._runtime import get_runtime
from asyncckpt.errors import CorruptCheckpointError
from asyncckpt.format import seal_manifest
from asyncckpt.io import ReadSettings, SaveEntry, WriteSettings

from _fakes import CopyGate
from _samples import DTYPES, sample

WINDOW = 48  # the stager's chunk: bytes per pinned buffer and per upload
SMALL_FILES = WriteSettings(chunk_bytes=200, pack_bytes=128, small_array_bytes=128, staging_budget_bytes=1024)

@pytest.fixture
def gate():
    return CopyGate("h2d")


@pytest.fixture
def backend(gate):
    device = FakeDeviceBackend(memory_bytes=1 << 20, copy_hook=gate)
    yield device
    gate.opened.set()  # never leave a stream worker blocked
    device.close()


def make_stager(backend, buffers: int = 16) -> Stager:
    return Stager(backend, pinned_bytes=buffers * WINDOW, chunk_bytes=WINDOW)


def write(path, values: dict[str, np.ndarray], settings: WriteSettings = SMALL_FILES) -> str:
    entries = [SaveEntry(key, value) for key, value in values.items()]
    return ckio.start_write(path, entries, {"nodes": []}, settings=settings).result()


def extents(path, key: str) -> list[dict]:
    return json.loads(Path(f"{path}.index").read_text())["tensors"][key]["extents"]


def windows_of(path, keys) -> int:
    """How many windows a restore of ``keys`` alone uploads (one read at a time)."""
    return sum(-(-extent["length"] // WINDOW) for key in keys for extent in extents(path, key))


@pytest.fixture
def big(tmp_path):
    """A 1,000-byte value in five 200-byte data files: 25 windows of at most 48 bytes."""
    value = np.arange(125, dtype=np.float64) * 1.5
    path = write(tmp_path / "ckpt", {"big": value})
    assert len({extent["file"] for extent in extents(path, "big")}) == 5
    return path, value


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_and_shape_round_trips_bit_exact(tmp_path, backend, dtype):
    values = {
        "scalar": sample(dtype, (), 1),
        "empty": sample(dtype, (0, 3), 2),
        "vector": sample(dtype, (7,), 3),
        "cube": sample(dtype, (3, 4, 5), 4),
        "long": sample(dtype, (70, 5), 5),  # 350 to 5,600 bytes: several chunk files for wide dtypes
    }
    path = write(tmp_path / "ckpt", values)
    stager = make_stager(backend)
    out = {key: backend.empty(value.shape, value.dtype) for key, value in values.items()}
    result = ckio.open_reader(path).read_many(values, out=out, stager=stager)
    for key, value in values.items():
        assert result[key] is out[key]
        restored = backend.peek(out[key])
        assert restored.dtype == value.dtype and restored.shape == value.shape
        assert restored.tobytes() == value.tobytes(), key  # bit-exact, NaN payloads included
    assert stager.stats["uploaded_chunks"] > 0


def test_a_value_across_data_files_and_windows_round_trips(big, backend, gate):
    path, value = big
    stager = make_stager(backend)
    target = backend.empty(value.shape, value.dtype)
    reader = ckio.open_reader(path, ReadSettings(max_concurrent_reads=1))
    reader.read_many(["big"], out={"big": target}, stager=stager)
    np.testing.assert_array_equal(backend.peek(target), value)
    assert stager.stats["uploaded_chunks"] == windows_of(path, ["big"]) == 25
    assert gate.log.count("h2d") == 25
    assert stager.stats["direct_uploads"] == 0


def test_host_and_device_destinations_share_packed_files(tmp_path, backend):
    values = {f"v{i}": sample("int32", (5 + i,), i) for i in range(8)}  # 20-48 bytes: packed together
    path = write(tmp_path / "ckpt", values)
    stager = make_stager(backend)
    out = {key: (backend.empty(v.shape, v.dtype) if i % 2 else np.zeros_like(v)) for i, (key, v) in enumerate(values.items())}
    result = ckio.open_reader(path).read_many(values, out=out, stager=stager)
    for i, (key, value) in enumerate(values.items()):
        assert result[key] is out[key]
        got = backend.peek(out[key]) if i % 2 else out[key]
        np.testing.assert_array_equal(got, value)


def test_keys_without_a_destination_are_still_read_to_the_host(big, backend):
    path, value = big
    target = backend.empty(value.shape, value.dtype)
    reader = ckio.open_reader(path)
    result = reader.read_many(["big"], out={"big": target}, stager=make_stager(backend))
    assert result["big"] is target
    np.testing.assert_array_equal(reader.read("big"), value)


def test_aread_many_uploads_too(big, backend):
    path, value = big
    target = backend.empty(value.shape, value.dtype)

    async def restore():
        reader = await ckio.aopen_reader(path)
        return await reader.aread_many(["big"], out={"big": target}, stager=make_stager(backend))

    assert asyncio.run(restore())["big"] is target
    np.testing.assert_array_equal(backend.peek(target), value)


def test_the_default_stager_is_the_backends(big, backend):
    path, value = big
    target = backend.empty(value.shape, value.dtype)
    stager = _cuda.stager_for(backend)
    ckio.open_reader(path).read_many(["big"], out={"big": target}, stager=stager)
    np.testing.assert_array_equal(backend.peek(target), value)
    assert stager.stats["uploaded_chunks"] > 0


def test_overlapping_extents_of_a_crafted_manifest_are_uploaded_correctly(tmp_path, backend):
    value = np.arange(4.0)
    path = write(tmp_path / "ckpt", {"a": value, "b": value})
    index = Path(f"{path}.index")
    document = json.loads(index.read_text())
    document["tensors"]["b"]["extents"] = document["tensors"]["a"]["extents"]  # both read the same bytes
    index.write_bytes(seal_manifest(document))
    out = {"a": backend.empty((4,), np.float64), "b": np.zeros(4)}
    ckio.open_reader(path).read_many(["a", "b"], out=out, stager=make_stager(backend))
    np.testing.assert_array_equal(backend.peek(out["a"]), value)
    np.testing.assert_array_equal(out["b"], value)


# ---------------------------------------------------------------------------------------------
# Ordering


def test_uploads_run_after_pending_work_and_later_work_waits_for_them(big, backend, gate):
    path, value = big
    target = backend.array(np.zeros_like(value))
    kernel_gate = threading.Event()
    backend.launch(backend.default_stream, lambda data: (kernel_gate.wait(), data.fill(5.0)), target)
    stager = make_stager(backend, buffers=32)  # every window fits: the restore never waits for a buffer
    with backend.forbid_host_sync():  # the calling thread never waits for the device
        ckio.open_reader(path).read_many(["big"], out={"big": target}, stager=stager)
    stager.upload_stream.settle()  # idle, or held in its device-side wait for the kernel
    assert gate.log.count("h2d") == 0, "an upload ran before the work pending when the restore started"
    seen = []
    backend.launch(backend.default_stream, lambda data: seen.append(data.copy()), target)
    gate.hold_at = 1  # the first upload stalls once it runs
    kernel_gate.set()
    assert gate.held.wait(timeout=60)
    backend.default_stream.settle()
    assert seen == [], "work enqueued after the restore ran before its uploads"
    gate.opened.set()
    np.testing.assert_array_equal(backend.peek(target), value)  # the kernel's 5.0 is overwritten
    np.testing.assert_array_equal(seen[0], value)


def test_the_current_stream_of_the_calling_thread_orders_the_uploads(big, backend, gate):
    path, value = big
    target = backend.array(np.zeros_like(value))
    training = backend.new_stream("training")
    kernel_gate = threading.Event()
    backend.launch(training, lambda data: (kernel_gate.wait(), data.fill(5.0)), target)
    stager = make_stager(backend, buffers=32)
    with backend.use_stream(training):
        ckio.open_reader(path).read_many(["big"], out={"big": target}, stager=stager)
    stager.upload_stream.settle()
    assert gate.log.count("h2d") == 0
    kernel_gate.set()
    np.testing.assert_array_equal(backend.peek(target), value)


def test_reading_goes_on_while_earlier_windows_are_still_uploading(big, backend, gate):
    path, value = big
    target = backend.empty(value.shape, value.dtype)
    gate.hold_at = 1  # the first window's upload stalls until the read is over
    stager = make_stager(backend, buffers=32)
    reader = ckio.open_reader(path, ReadSettings(max_concurrent_reads=1))
    reader.read_many(["big"], out={"big": target}, stager=stager)  # returns with uploads in flight
    assert gate.held.is_set() and gate.log.count("h2d") == 1
    assert stager.stats["uploaded_chunks"] == 25  # every window was read and enqueued meanwhile
    gate.opened.set()
    np.testing.assert_array_equal(backend.peek(target), value)


def test_waiting_for_a_busy_pinned_buffer_leaves_the_event_loop_free(big, backend, gate):
    path, value = big
    target = backend.empty(value.shape, value.dtype)
    gate.hold_at = 1  # the first upload stalls: the third window must wait for its buffer
    stager = make_stager(backend, buffers=2)
    reader = ckio.open_reader(path, ReadSettings(max_concurrent_reads=1))
    errors = []

    def restore():
        try:
            reader.read_many(["big"], out={"big": target}, stager=stager)
        except BaseException as exc:  # reported below
            errors.append(exc)

    worker = threading.Thread(target=restore)
    worker.start()
    assert gate.held.wait(timeout=60)

    async def on_the_loop():
        return "free"

    assert get_runtime().run(on_the_loop()) == "free"  # would hang if the loop waited for the device
    assert worker.is_alive()  # the restore itself is still waiting for the buffer
    gate.opened.set()
    worker.join()
    assert errors == []
    np.testing.assert_array_equal(backend.peek(target), value)
    assert backend.pinned_allocations <= 2


# ---------------------------------------------------------------------------------------------
# The pinned pool


def test_pinned_memory_stays_within_the_pool_and_buffers_are_reused(big, backend):
    path, value = big
    stager = make_stager(backend, buffers=3)
    target = backend.empty(value.shape, value.dtype)
    reader = ckio.open_reader(path, ReadSettings(max_concurrent_reads=1))
    reader.read_many(["big"], out={"big": target}, stager=stager)
    np.testing.assert_array_equal(backend.peek(target), value)
    assert backend.pinned_peak_bytes <= stager.pool.capacity_bytes == 3 * WINDOW
    assert backend.pinned_allocations <= 3
    assert stager.stats["uploaded_chunks"] == 25 and stager.stats["direct_uploads"] == 0
    assert stager.pool.free_buffers == stager.pool.max_buffers  # every buffer came back


def test_concurrent_reads_through_a_small_pool_stay_within_it(tmp_path, backend):
    values = {f"v{i}": sample("float64", (40,), i) for i in range(6)}  # six values, two files each
    path = write(tmp_path / "ckpt", values)
    stager = make_stager(backend, buffers=2)
    out = {key: backend.empty(v.shape, v.dtype) for key, v in values.items()}
    ckio.open_reader(path).read_many(values, out=out, stager=stager)
    for key, value in values.items():
        np.testing.assert_array_equal(backend.peek(out[key]), value)
    assert backend.pinned_peak_bytes <= 2 * WINDOW
    assert stager.stats["uploaded_chunks"] + stager.stats["direct_uploads"] == windows_of(path, values)


def test_with_every_pinned_buffer_held_windows_go_through_private_buffers(big, backend):
    path, value = big
    stager = make_stager(backend, buffers=2)
    held = [stager.take_upload_buffer(), stager.take_upload_buffer()]
    assert None not in held and stager.take_upload_buffer() is None
    target = backend.empty(value.shape, value.dtype)
    ckio.open_reader(path).read_many(["big"], out={"big": target}, stager=stager)
    np.testing.assert_array_equal(backend.peek(target), value)
    assert stager.stats["direct_uploads"] == 25 and stager.stats["uploaded_chunks"] == 0
    for buffer in held:
        stager.upload_window(buffer, ())
    assert stager.pool.free_buffers == 2


# ---------------------------------------------------------------------------------------------
# Checksums and bad destinations


@pytest.mark.parametrize("where", ["first window", "middle window", "last window"])
def test_a_corrupted_byte_raises_naming_the_key(big, backend, where):
    path, value = big
    extent = extents(path, "big")[2]
    offset = {"first window": 3, "middle window": WINDOW + 7, "last window": extent["length"] - 1}[where]
    data_file = Path(path).parent / ckio.open_reader(path).data_dir / extent["file"]
    raw = bytearray(data_file.read_bytes())
    raw[extent["offset"] + offset] ^= 0x10
    data_file.write_bytes(bytes(raw))
    stager = make_stager(backend, buffers=4)
    target = backend.empty(value.shape, value.dtype)
    with pytest.raises(CorruptCheckpointError, match=rf"key 'big'.*{extent['file']}.*fails its checksum"):
        ckio.open_reader(path).read_many(["big"], out={"big": target}, stager=stager)
    backend.synchronize()
    assert stager.pool.free_buffers == stager.pool.max_buffers  # no buffer is lost to the error
    with pytest.raises(CorruptCheckpointError, match="key 'big'"):  # the host path says the same
        ckio.open_reader(path).read("big")


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda b: b.empty((125,), np.float32), r"into a <f4\[125\] device array"),
        (lambda b: b.empty((5, 25), np.float64), r"into a <f8\[5, 25\] device array"),
        (lambda b: b.empty((125, 2), np.float64)[:, 0], r"into a non-contiguous <f8\[125\] device array"),
    ],
    ids=["dtype", "shape", "non-contiguous"],
)
def test_a_destination_that_does_not_fit_is_refused_before_reading(tmp_path, backend, gate, make, problem):
    value = np.arange(125, dtype=np.float64)
    path = write(tmp_path / "ckpt", {"big": value, "small": np.arange(4.0)})
    host = np.full(4, -1.0)  # a fitting host destination in the same call
    with pytest.raises(ValueError, match=rf"cannot read key 'big' \(<f8\[125\]\) {problem}"):
        ckio.open_reader(path).read_many(
            ["small", "big"], out={"small": host, "big": make(backend)}, stager=make_stager(backend)
        )
    backend.synchronize()
    assert gate.log.count("h2d") == 0
    np.testing.assert_array_equal(host, np.full(4, -1.0))


def test_a_byte_string_cannot_be_read_into_a_device_array(tmp_path, backend):
    path = ckio.start_write(tmp_path / "ckpt", [SaveEntry("s", b"hello")], {"nodes": []}).result()
    with pytest.raises(ValueError, match="key 's' holds a byte string"):
        ckio.open_reader(path).read_many(["s"], out={"s": backend.empty((5,), np.uint8)}, stager=make_stager(backend))


def test_a_cancelled_window_read_finishes_before_its_buffer_can_be_reused():
    async def scenario():
        release = asyncio.Event()
        order = []

        async def read_into_pinned_buffer():
            await release.wait()  # a worker thread still filling the buffer
            order.append("read finished")

        async def window():
            try:
                await ckio.tasks.finish_even_if_cancelled(read_into_pinned_buffer())
            finally:
                order.append("buffer released")

        task = asyncio.ensure_future(window())
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0)
        assert order == []  # cancelled, but still waiting for the read
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        return order

    assert asyncio.run(scenario()) == ["read finished", "buffer released"]
