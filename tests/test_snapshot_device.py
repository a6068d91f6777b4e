"""Writes of values that live on a GPU, on the CPU fake device: captured at ``start_write``, streamed
from pinned buffers, never guarded by mutation hooks.

The simulated device (``asyncckpt.testing.fake_device.FakeDeviceBackend``) runs each stream on a
worker thread, so a kernel "still running" at save time is a kernel blocked on a test gate, and
ordering is checked with gates and events, never with sleeps.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from asyncckpt import _arrays, _cuda
from asyncckpt import io as ckio
from asyncckpt._cuda import DeviceCopyError
from asyncckpt.io import SaveEntry, WriteSettings
from asyncckpt.testing.fake_device import FakeDeviceBackend

from _device import DeviceHolder
from _fakes import CopyGate

CHUNK = 256  # pinned buffer size in these tests: values of a few KiB span many buffers


class HostHolder(DeviceHolder):
    """The same protocol over a NumPy array: guarded by a hook while the write runs."""


@pytest.fixture
def hook():
    return CopyGate("d2h")


@pytest.fixture
def device(hook):
    backend = FakeDeviceBackend(memory_bytes=1 << 24, copy_hook=hook)
    _cuda.stagers().configure(backend, chunk_bytes=CHUNK, pinned_bytes=8 * CHUNK)
    yield backend
    hook.opened.set()
    backend.close()


def settings(device, **overrides) -> WriteSettings:
    base = dict(staging_budget_bytes=4096, chunk_bytes=1024, pack_bytes=512, small_array_bytes=256,
                max_concurrent_writes=2, device_backend=device)
    base.update(overrides)
    return WriteSettings(**base)


def values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "big": rng.standard_normal(700),  # 5,600 bytes: several data files and pinned chunks
        "ints": np.arange(300, dtype=np.int32).reshape(20, 15),
        "small": rng.integers(0, 255, size=33, dtype=np.uint8),  # packed with others
        "half": rng.standard_normal(17).astype(np.float16),
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 4), np.float32),
    }


def read_back(path, keys) -> dict[str, np.ndarray]:
    return ckio.open_reader(path).read_many(list(keys))


@pytest.mark.parametrize("pack_bytes", [0, 4096], ids=["one-copy-each", "small-ones-packed"])
def test_device_values_round_trip_bit_exact_through_pinned_chunks(tmp_path, device, pack_bytes):
    _cuda.stagers().configure(device, chunk_bytes=CHUNK, pinned_bytes=8 * CHUNK, pack_bytes=pack_bytes)
    expected = values()
    holders = {key: DeviceHolder(device.array(value)) for key, value in expected.items()}
    handle = ckio.start_write(tmp_path / "ckpt", [SaveEntry(k, h) for k, h in holders.items()], {},
                                  settings=settings(device))
    handle.result(30)
    out = read_back(tmp_path / "ckpt", expected)
    for key, value in expected.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape
        np.testing.assert_array_equal(out[key], value)
    stager = _cuda.stager_for(device)
    if pack_bytes:  # all but "big" (5,600 bytes) gathered by one launch; big copied on its own
        assert (stager.stats["device_copies"], stager.stats["packed_arrays"]) == (2, 4)
    else:  # every non-empty value, captured on the device
        assert (stager.stats["device_copies"], stager.stats["packed_arrays"]) == (5, 0)
    assert stager.pool.free_buffers == stager.pool.max_buffers  # every pinned buffer came back
    assert 0 < device.pinned_peak_bytes <= settings(device).staging_budget_bytes


def test_captured_values_get_no_mutation_hook_while_host_values_do(tmp_path, device):
    on_device = DeviceHolder(device.array(np.arange(64.0)))
    on_host = HostHolder(np.arange(64.0))
    handle = ckio.start_write(tmp_path / "ckpt", [SaveEntry("d", on_device), SaveEntry("h", on_host)], {},
                                  settings=settings(device))
    handle.result(30)
    assert (on_device.hooks_added, on_host.hooks_added) == (0, 1)
    assert on_host.hooks == []  # removed once its bytes were out


def test_a_kernel_pending_at_save_is_captured_after_it_and_later_work_is_not(tmp_path, device):
    n = 600
    array = device.array(np.zeros(n))
    kernel_gate = threading.Event()

    def slow_kernel(data):  # writes half, stalls, writes the rest: a capture "during" it is torn
        data[: n // 2] = 1
        kernel_gate.wait()
        data[n // 2 :] = 1

    device.launch(device.default_stream, slow_kernel, array)
    with device.forbid_host_sync():  # start_write must not wait for the device
        handle = ckio.start_write(tmp_path / "ckpt", [SaveEntry("x", DeviceHolder(array))], {},
                                      settings=settings(device))
    device.launch(device.default_stream, lambda data: data.fill(7), array)  # training goes on
    kernel_gate.set()
    handle.result(30)
    np.testing.assert_array_equal(read_back(tmp_path / "ckpt", ["x"])["x"], np.ones(n))
    np.testing.assert_array_equal(device.peek(array), np.full(n, 7.0))


@pytest.mark.parametrize("policy_stager", ["device_copy", "stream_wait", "host_copy"])
def test_every_capture_policy_writes_the_value_at_save_time(tmp_path, hook, policy_stager):
    device = FakeDeviceBackend(memory_bytes=1 << 24, copy_hook=hook)
    factor = 2.0 if policy_stager == "device_copy" else math.inf
    pinned = 8 * CHUNK if policy_stager != "host_copy" else CHUNK  # host_copy: the pool cannot take it
    _cuda.stagers().configure(device, chunk_bytes=CHUNK, pinned_bytes=pinned, safety_factor=factor)
    try:
        value = np.arange(150, dtype=np.float64)  # 1,200 bytes: 5 chunks
        array = device.array(value)
        handle = ckio.start_write(tmp_path / "ckpt", [SaveEntry("x", DeviceHolder(array))], {},
                                      settings=settings(device, staging_budget_bytes=max(pinned, 1024)))
        device.launch(device.default_stream, lambda data: data.__imul__(-1), array)
        handle.result(30)
        np.testing.assert_array_equal(read_back(tmp_path / "ckpt", ["x"])["x"], value)
        counter = {"device_copy": "device_copies", "stream_wait": "stream_waits", "host_copy": "host_copies"}
        assert _cuda.stager_for(device).stats[counter[policy_stager]] == 1
    finally:
        device.close()


def test_the_staging_budget_caps_the_pinned_pool(tmp_path, device):
    _cuda.stagers().configure(device, chunk_bytes=CHUNK, pinned_bytes=1 << 20)
    holder = DeviceHolder(device.array(np.arange(2000.0)))  # 16,000 bytes, far above the budget
    ckio.start_write(tmp_path / "ckpt", [SaveEntry("x", holder)], {},
                         settings=settings(device, staging_budget_bytes=2048)).result(30)
    assert _cuda.stager_for(device).pool.capacity_bytes == 2048
    assert device.pinned_peak_bytes <= 2048
    np.testing.assert_array_equal(read_back(tmp_path / "ckpt", ["x"])["x"], np.arange(2000.0))


def test_a_failed_device_copy_fails_the_write_naming_the_key_and_keeps_the_last_checkpoint(tmp_path, device, hook):
    path = tmp_path / "ckpt"
    ckio.start_write(path, [SaveEntry("weights", DeviceHolder(device.array(np.ones(500))))], {},
                         settings=settings(device)).result(30)
    hook.fail_at = hook.calls + 3
    handle = ckio.start_write(path, [SaveEntry("weights", DeviceHolder(device.array(np.zeros(500))))], {},
                                  settings=settings(device))
    with pytest.raises(DeviceCopyError, match="weights"):
        handle.result(30)
    np.testing.assert_array_equal(read_back(path, ["weights"])["weights"], np.ones(500))
    stager = _cuda.stager_for(device)
    assert stager.pool.free_buffers == stager.pool.max_buffers  # nothing leaked by the failed write


def test_a_write_failing_in_storage_returns_every_pinned_buffer(tmp_path, device):
    (tmp_path / "ckpt.index").mkdir()  # the commit cannot replace a folder: the write fails late
    holder = DeviceHolder(device.array(np.arange(900.0)))
    handle = ckio.start_write(tmp_path / "ckpt", [SaveEntry("x", holder)], {}, settings=settings(device))
    with pytest.raises(Exception):
        handle.result(30)
    stager = _cuda.stager_for(device)
    device.synchronize()
    assert stager.pool.free_buffers == stager.pool.max_buffers


def test_a_holder_whose_array_moved_to_the_host_after_preparation_is_still_written(tmp_path, device):
    holder = DeviceHolder(device.array(np.arange(10.0)))
    prepared = ckio.prepare_write([SaveEntry("x", holder)], {}, settings=settings(device))
    holder.array = np.arange(10.0) * 2  # same dtype and shape, now a host array
    ckio.start_write(tmp_path / "ckpt", prepared, settings=settings(device)).result(30)
    np.testing.assert_array_equal(read_back(tmp_path / "ckpt", ["x"])["x"], np.arange(10.0) * 2)


def test_acquired_views_stop_at_chunk_ends_and_count_as_read_once_released(device):
    array = device.array(np.arange(200, dtype=np.int16))  # 400 bytes: chunks [0, 256) and [256, 400)
    (capture,) = _arrays.capture_device_arrays([array], ["a"], 4 * CHUNK, device)
    head = capture.acquire(0, 100)
    middle = capture.acquire(100, 300)
    assert (len(head), len(middle)) == (100, 156)  # the second view stops at the first chunk's end
    tail = capture.acquire(256, 144)
    got = np.frombuffer(bytes(head) + bytes(middle) + bytes(tail), np.int16)
    np.testing.assert_array_equal(got, np.arange(200))
    for offset, view in ((0, head), (100, middle), (256, tail)):
        capture.release(offset, len(view))
    assert capture.consumed
    with pytest.raises(ValueError, match="outside"):
        capture.acquire(390, 20)


class CountingBackend(FakeDeviceBackend):
    """Counts gather tables made: a repeat save of the same arrays must reuse its table."""

    tables = 0

    def gather_table(self, arrays, offsets, stream):
        self.tables += 1
        return super().gather_table(arrays, offsets, stream)


def test_repeat_saves_of_one_structure_reuse_the_capture_plan_and_write_each_saves_values(tmp_path, hook):
    device = CountingBackend(memory_bytes=1 << 24, copy_hook=hook)
    _cuda.stagers().configure(device, chunk_bytes=CHUNK, pinned_bytes=8 * CHUNK, pack_bytes=1024)
    try:
        holders = [DeviceHolder(device.array(np.full(40, i, np.float32))) for i in range(30)]
        holders.append(DeviceHolder(device.array(np.arange(400.0))))  # 3,200 bytes: staged on its own
        prepared = ckio.prepare_write([SaveEntry(f"v{i}", h) for i, h in enumerate(holders)], {},
                                          settings=settings(device))
        for step in range(3):
            ckio.start_write(tmp_path / f"ckpt-{step}", prepared, settings=settings(device)).result(30)
            for holder in holders:  # a training step between saves, on the device only
                device.launch(device.default_stream, lambda data: data.__iadd__(100), holder.array)
        assert device.tables == 1
        assert _cuda.stager_for(device).stats["packed_arrays"] == 90
        for step in range(3):
            out = read_back(tmp_path / f"ckpt-{step}", [f"v{i}" for i in range(31)])
            for i in range(30):
                np.testing.assert_array_equal(out[f"v{i}"], np.full(40, i + 100 * step, np.float32))
            np.testing.assert_array_equal(out["v30"], np.arange(400.0) + 100 * step)
    finally:
        device.close()


def test_a_holder_given_a_new_array_gets_a_new_plan(tmp_path, device):
    holders = [DeviceHolder(device.array(np.full(8, i, np.int64))) for i in range(4)]
    prepared = ckio.prepare_write([SaveEntry(f"v{i}", h) for i, h in enumerate(holders)], {},
                                      settings=settings(device))
    ckio.start_write(tmp_path / "a", prepared, settings=settings(device)).result(30)
    holders[2].array = device.array(np.full(8, -5, np.int64))  # same dtype and shape, new memory
    ckio.start_write(tmp_path / "b", prepared, settings=settings(device)).result(30)
    out = read_back(tmp_path / "b", ["v1", "v2"])
    np.testing.assert_array_equal(out["v2"], np.full(8, -5))
    np.testing.assert_array_equal(out["v1"], np.full(8, 1))


def test_without_memory_for_the_pack_the_values_are_staged_one_by_one_and_still_correct(tmp_path, hook):
    device = FakeDeviceBackend(memory_bytes=3000, copy_hook=hook)
    _cuda.stagers().configure(device, chunk_bytes=CHUNK, pinned_bytes=16 * CHUNK)
    try:
        values = [np.arange(60, dtype=np.int32) * (i + 1) for i in range(6)]  # 1,440 of 3,000 bytes
        holders = [DeviceHolder(device.array(v)) for v in values]
        ckio.start_write(tmp_path / "ckpt", [SaveEntry(f"v{i}", h) for i, h in enumerate(holders)], {},
                             settings=settings(device)).result(30)
        stats = _cuda.stager_for(device).stats
        assert stats["packed_arrays"] == 0 and stats["stream_waits"] + stats["device_copies"] == 6
        out = read_back(tmp_path / "ckpt", [f"v{i}" for i in range(6)])
        for i, value in enumerate(values):
            np.testing.assert_array_equal(out[f"v{i}"], value)
    finally:
        device.close()


class MutatingHost(HostHolder):
    """A host holder whose in-place change runs its hooks first, like Variable.assign."""

    def mutate(self) -> None:
        for hook in list(self.hooks):
            hook(self)
        self.array += 1


def test_a_host_value_changing_while_device_bytes_of_its_file_are_awaited_does_not_wait_for_the_gpu(tmp_path, device):
    gpu_busy = threading.Event()
    device.launch(device.default_stream, lambda *_: gpu_busy.wait())  # a training step still running
    host = MutatingHost(np.arange(16.0))
    on_device = DeviceHolder(device.array(np.arange(16.0)))
    try:
        handle = ckio.start_write(tmp_path / "ckpt", [SaveEntry("a", host), SaveEntry("b", on_device)], {},
                                      settings=settings(device))
        while device.host_syncs == 0:  # the writer is waiting for the device bytes of the file
            threading.Event().wait(0.001)
        mutated = threading.Event()
        threading.Thread(target=lambda: (host.mutate(), mutated.set())).start()
        assert mutated.wait(30), "the host value's change waited for the GPU"
    finally:
        gpu_busy.set()
    handle.result(30)
    np.testing.assert_array_equal(read_back(tmp_path / "ckpt", ["a"])["a"], np.arange(16.0))


def test_a_failed_copy_of_a_packed_chunk_names_the_key_being_written(tmp_path, hook):
    device = FakeDeviceBackend(memory_bytes=1 << 24, copy_hook=hook)
    _cuda.stagers().configure(device, chunk_bytes=CHUNK, pinned_bytes=8 * CHUNK, pack_bytes=1024)
    try:
        hook.fail_at = 4  # the fourth chunk of the pack: values v6 and v7 (128 bytes each)
        holders = [DeviceHolder(device.array(np.full(16, i, np.float64))) for i in range(10)]
        handle = ckio.start_write(tmp_path / "ckpt", [SaveEntry(f"v{i}", h) for i, h in enumerate(holders)], {},
                                      settings=settings(device, max_concurrent_writes=1))
        with pytest.raises(DeviceCopyError, match=r"^copying 'v6' from the device failed"):
            handle.result(30)
    finally:
        device.close()
