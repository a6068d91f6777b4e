"""End-to-end tests of the write and read executors (start_write -> open_reader)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from _fakes import FailingStorage, FakeVariable, GatedStorage, WrappingStorage

from asyncckpt import io as ckio
from asyncckpt._runtime import Runtime
from asyncckpt.errors import CorruptCheckpointError, NotFoundError, UnsupportedFormatError
from asyncckpt.format import OBJECT_GRAPH_KEY, seal_manifest
from asyncckpt.io import SaveEntry, TensorSpec
from asyncckpt.io.storage import BackendWrapper, FileStorage, KvStoreStorage

ALL_DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128,
]


def _sample(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype) == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.dtype(dtype).kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def _write(path, values, graph=None, **kwargs):
    entries = [SaveEntry(key, value) for key, value in values.items()]
    handle = ckio.start_write(path, entries, graph if graph is not None else {"nodes": []}, **kwargs)
    assert handle.result() == str(path)
    return handle


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_every_dtype(tmp_path, dtype):
    values = {"v": _sample(dtype, (3, 5)), "scalar": _sample(dtype, ()), "empty": _sample(dtype, (0, 3))}
    _write(tmp_path / "ckpt", values)
    reader = ckio.open_reader(tmp_path / "ckpt")
    out = reader.read_many(values)
    for key, value in values.items():
        assert out[key].dtype == np.dtype(dtype)
        assert out[key].shape == value.shape
        np.testing.assert_array_equal(out[key], value)
        assert out[key].flags.writeable
        assert reader.spec(key) == TensorSpec(np.dtype(dtype).newbyteorder("<"), value.shape)


def test_bytes_values_and_object_graph(tmp_path):
    graph = {"nodes": [{"children": [], "attributes": []}]}
    _write(tmp_path / "ckpt", {"state": b"\x00hello\xff", "empty": b""}, graph)
    reader = ckio.open_reader(tmp_path / "ckpt")
    assert reader.keys() == sorted([OBJECT_GRAPH_KEY, "empty", "state"])
    assert reader.read("state") == b"\x00hello\xff"
    assert reader.read("empty") == b""
    assert reader.spec("state") == TensorSpec("bytes", ())
    assert reader.spec(OBJECT_GRAPH_KEY) == TensorSpec("bytes", ())
    assert reader.object_graph == graph
    assert json.loads(reader.read(OBJECT_GRAPH_KEY).decode("utf-8")) == graph


def test_missing_checkpoint_raises_not_found_naming_path(tmp_path):
    with pytest.raises(NotFoundError, match="nope") as info:
        ckio.open_reader(tmp_path / "nope")
    assert isinstance(info.value, FileNotFoundError)
    assert not ckio.checkpoint_exists(tmp_path / "nope")


def test_unknown_key_raises_key_error_naming_key(tmp_path):
    _write(tmp_path / "ckpt", {"a": np.ones(2)})
    reader = ckio.open_reader(tmp_path / "ckpt")
    with pytest.raises(KeyError, match="no_such_key"):
        reader.read("no_such_key")
    with pytest.raises(KeyError, match="no_such_key"):
        reader.spec("no_such_key")


# ---------------------------------------------------------------------------------------------
# Layout: packing and chunking


def _data_files(path):
    reader = ckio.open_reader(path)
    data_dir = path.parent / reader.data_dir
    return sorted(p.name for p in data_dir.iterdir())


def test_many_small_arrays_are_packed_into_few_files(tmp_path):
    values = {f"layer{i}/w": np.full(100, i, dtype=np.float32) for i in range(2000)}  # 400 bytes each
    settings = ckio.WriteSettings(pack_bytes=256 * 1024, staging_budget_bytes=1 << 20, chunk_bytes=1 << 20,
                                      small_array_bytes=64 * 1024)
    _write(tmp_path / "ckpt", values, settings=settings)
    per_pack = (256 * 1024) // 400
    assert _data_files(tmp_path / "ckpt") == [f"pack-{i:05d}" for i in range(-(-2000 // per_pack))]
    out = ckio.open_reader(tmp_path / "ckpt").read_many(values)
    for key, value in values.items():
        np.testing.assert_array_equal(out[key], value)


def test_array_larger_than_chunk_is_split_across_chunk_files(tmp_path):
    value = np.arange(2503, dtype=np.int32)  # 10012 bytes
    settings = ckio.WriteSettings(chunk_bytes=1000, pack_bytes=1000, small_array_bytes=1000,
                                      staging_budget_bytes=2000)
    _write(tmp_path / "ckpt", {"big": value, "small": np.int8(7)}, settings=settings)
    assert _data_files(tmp_path / "ckpt") == [f"chunk-{i:05d}" for i in range(11)] + ["pack-00000"]
    reader = ckio.open_reader(tmp_path / "ckpt")
    np.testing.assert_array_equal(reader.read("big"), value)
    assert reader.read("small") == 7
    # Reading with tiny coalesced ranges exercises many concurrent range reads.
    small_reads = ckio.ReadSettings(max_concurrent_reads=2, coalesce_gap_bytes=0, max_read_bytes=1)
    np.testing.assert_array_equal(ckio.open_reader(tmp_path / "ckpt", small_reads).read("big"), value)


def test_non_contiguous_and_big_endian_sources(tmp_path):
    base = np.arange(60, dtype=np.float64).reshape(6, 10)
    values = {
        "strided": base[::2, ::-3],
        "fortran": np.asfortranarray(base),
        "big_endian": base.astype(">f8"),
        "transposed_int": np.arange(12, dtype=">i2").reshape(3, 4).T,
    }
    settings = ckio.WriteSettings(chunk_bytes=64, pack_bytes=64, small_array_bytes=32, staging_budget_bytes=128)
    _write(tmp_path / "ckpt", values, settings=settings)
    out = ckio.open_reader(tmp_path / "ckpt").read_many(values)
    for key, value in values.items():
        np.testing.assert_array_equal(out[key], value)
        assert out[key].dtype == value.dtype.newbyteorder("<")


def test_round_trip_through_memory_kvstore():
    storage = KvStoreStorage({"driver": "memory"})
    values = {"a": np.arange(5.0), "b": b"state"}
    _write("mem/run/ckpt-1", values, settings=ckio.WriteSettings(storage=storage))
    assert ckio.checkpoint_exists("mem/run/ckpt-1", storage=storage)
    reader = ckio.open_reader("mem/run/ckpt-1", ckio.ReadSettings(storage=storage))
    np.testing.assert_array_equal(reader.read("a"), values["a"])
    assert reader.read("b") == b"state"
    ckio.delete_checkpoint("mem/run/ckpt-1", storage=storage)
    assert not ckio.checkpoint_exists("mem/run/ckpt-1", storage=storage)


def test_rewriting_a_path_replaces_the_data_directory(tmp_path):
    _write(tmp_path / "ckpt", {"v": np.zeros(3)})
    first = ckio.open_reader(tmp_path / "ckpt").data_dir
    _write(tmp_path / "ckpt", {"v": np.ones(3)})
    reader = ckio.open_reader(tmp_path / "ckpt")
    assert reader.data_dir != first
    np.testing.assert_array_equal(reader.read("v"), np.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt.index", reader.data_dir])


def test_bad_entries_are_rejected_before_anything_is_written(tmp_path):
    cases = [
        ([SaveEntry("a", np.ones(1)), SaveEntry("a", np.ones(1))], ValueError, "duplicate.*'a'"),
        ([SaveEntry(OBJECT_GRAPH_KEY, b"x")], ValueError, "reserved"),
        ([SaveEntry("", b"x")], ValueError, "non-empty"),
        ([SaveEntry("s", "text")], TypeError, "'s'.*encode"),
        ([SaveEntry("o", np.array([object()]))], TypeError, "'o'"),
        ([SaveEntry("q", np.zeros(2, dtype=np.float128 if hasattr(np, "float128") else "M8[s]"))], TypeError, "'q'"),
        ([SaveEntry("l", [1, 2])], TypeError, "'l'"),
    ]
    for entries, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            ckio.start_write(tmp_path / "ckpt", entries, {})
    with pytest.raises(TypeError, match="JSON"):
        ckio.start_write(tmp_path / "ckpt", [], {"x": object()})
    with pytest.raises(ValueError, match="directory"):
        ckio.start_write(str(tmp_path) + "/", [], {})
    assert list(tmp_path.iterdir()) == []


def test_settings_are_validated():
    with pytest.raises(ValueError, match="staging_budget_bytes"):
        ckio.WriteSettings(staging_budget_bytes=10, chunk_bytes=100, pack_bytes=10, small_array_bytes=10)
    with pytest.raises(ValueError, match="pack_bytes"):
        ckio.WriteSettings(staging_budget_bytes=100, chunk_bytes=100, pack_bytes=100, small_array_bytes=200)
    with pytest.raises(ValueError, match="max_concurrent_writes"):
        ckio.WriteSettings(max_concurrent_writes=0)
    with pytest.raises(ValueError, match="max_concurrent_reads"):
        ckio.ReadSettings(max_concurrent_reads=True)


# ---------------------------------------------------------------------------------------------
# Snapshot consistency: what is written is the value at start_write time


@pytest.fixture
def runtime():
    runtime = Runtime(name="test-runtime")
    yield runtime
    runtime.close()


def _tiny(storage=None, runtime=None, **overrides):
    """Settings where every small array gets its own pack and one file fills the budget."""
    options = dict(chunk_bytes=64, pack_bytes=64, small_array_bytes=64, staging_budget_bytes=64,
                   storage=storage, runtime=runtime)
    options.update(overrides)
    return ckio.WriteSettings(**options)


def test_mutation_after_start_write_does_not_change_what_is_written(tmp_path, runtime):
    gated = GatedStorage(FileStorage(), runtime)
    variables = [FakeVariable(np.full(8, i, dtype=np.float64)) for i in range(6)]  # 64 bytes: one file each
    entries = [SaveEntry(f"v{i}", v) for i, v in enumerate(variables)]
    handle = ckio.start_write(tmp_path / "ckpt", entries, {}, settings=_tiny(gated, runtime))
    assert all(v.hook_count == 1 for v in variables)
    assert gated.reached.wait(10)  # the first file is staged and its write is stuck at the gate
    # The budget (one file) is held by the stuck write, so the copier cannot stage more; mutating
    # a variable must stage its old value first, which needs budget: the mutation waits.
    mutated = threading.Event()

    def mutate_all():
        for v in reversed(variables):
            v.assign(-1.0)
        mutated.set()

    mutator = threading.Thread(target=mutate_all)
    mutator.start()
    assert not mutated.wait(0.2)
    assert not handle.done()
    gated.open_gate()
    mutator.join(30)
    assert mutated.is_set()
    handle.result(30)
    out = ckio.open_reader(tmp_path / "ckpt").read_many([e.key for e in entries])
    for i in range(6):
        np.testing.assert_array_equal(out[f"v{i}"], np.full(8, i, dtype=np.float64))
        np.testing.assert_array_equal(variables[i].numpy(), np.full(8, -1.0))
        assert variables[i].hook_count == 0
    assert handle.metrics.files_staged_by_hooks >= 1


def test_mutation_of_a_chunked_source_stages_all_its_chunks(tmp_path, runtime):
    gated = GatedStorage(FileStorage(), runtime)
    big = FakeVariable(np.arange(64, dtype=np.int64))  # 512 bytes -> 8 chunks of 64
    handle = ckio.start_write(tmp_path / "ckpt", [SaveEntry("big", big)], {}, settings=_tiny(gated, runtime))
    assert gated.reached.wait(10)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (big.assign(0), done.set()))
    thread.start()
    assert not done.wait(0.2)
    gated.open_gate()
    thread.join(30)
    handle.result(30)
    np.testing.assert_array_equal(ckio.open_reader(tmp_path / "ckpt").read("big"), np.arange(64))
    assert big.hook_count == 0


def test_mutation_with_ample_budget_does_not_wait_for_the_writer(tmp_path, runtime):
    gated = GatedStorage(FileStorage(), runtime)
    variables = [FakeVariable(np.full(8, i, dtype=np.float64)) for i in range(4)]
    entries = [SaveEntry(f"v{i}", v) for i, v in enumerate(variables)]
    settings = _tiny(gated, runtime, staging_budget_bytes=64 * 8)
    handle = ckio.start_write(tmp_path / "ckpt", entries, {}, settings=settings)
    for v in variables:
        v.assign(42.0)  # returns although no write can finish: the budget holds every file
    assert not handle.done()
    gated.open_gate()
    handle.result(30)
    out = ckio.open_reader(tmp_path / "ckpt").read_many([e.key for e in entries])
    for i in range(4):
        np.testing.assert_array_equal(out[f"v{i}"], np.full(8, i, dtype=np.float64))


def test_plain_arrays_are_copied_at_start_write(tmp_path, runtime):
    gated = GatedStorage(FileStorage(), runtime)
    array = np.arange(10.0)
    handle = ckio.start_write(tmp_path / "ckpt", [SaveEntry("a", array)], {},
                                  settings=ckio.WriteSettings(storage=gated, runtime=runtime))
    array[:] = -1
    gated.open_gate()
    handle.result(30)
    np.testing.assert_array_equal(ckio.open_reader(tmp_path / "ckpt").read("a"), np.arange(10.0))


class _ExplodingVariable(FakeVariable):
    def __init__(self, value, fail_after):
        super().__init__(value)
        self._fail_after = fail_after

    def _snapshot_array(self):
        if self.snapshot_calls >= self._fail_after:
            raise RuntimeError("device lost while copying")
        return super()._snapshot_array()


def test_background_staging_error_surfaces_through_the_handle(tmp_path):
    bad = _ExplodingVariable(np.ones(4), fail_after=1)  # start_write's inspection is the 1st call
    handle = ckio.start_write(tmp_path / "ckpt", [SaveEntry("bad", bad)], {})
    with pytest.raises(RuntimeError, match="device lost"):
        handle.result(30)
    assert isinstance(handle.exception(), RuntimeError)
    assert not ckio.checkpoint_exists(tmp_path / "ckpt")
    assert bad.hook_count == 0
    assert list(tmp_path.iterdir()) == []  # the partial data directory was removed


def test_disk_full_keeps_the_earlier_checkpoint_and_leaves_nothing_half_written(tmp_path):
    original = {f"v{i}": np.full(8, i, dtype=np.float64) for i in range(5)}
    _write(tmp_path / "ckpt", original)
    before = sorted(p.name for p in tmp_path.iterdir())
    failing = FailingStorage(FileStorage(), fail_on=3)
    replacement = {key: value + 100 for key, value in original.items()}
    handle = ckio.start_write(tmp_path / "ckpt", [SaveEntry(k, v) for k, v in replacement.items()], {},
                                  settings=_tiny(failing, staging_budget_bytes=128))
    with pytest.raises(OSError) as info:
        handle.result(30)
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    out = ckio.open_reader(tmp_path / "ckpt").read_many(original)
    for key, value in original.items():
        np.testing.assert_array_equal(out[key], value)


class _FsyncFailsAfterRename(BackendWrapper):
    async def commit(self, name, tmp_name, value):
        await super().commit(name, tmp_name, value)
        raise OSError(errno.EIO, "fsync of the folder failed (injected)")


def test_commit_failing_after_its_rename_keeps_the_new_data(tmp_path):
    _write(tmp_path / "ckpt", {"v": np.zeros(3)})
    storage = WrappingStorage(FileStorage(), _FsyncFailsAfterRename)
    handle = ckio.start_write(tmp_path / "ckpt", [SaveEntry("v", np.ones(3))], {},
                                  settings=ckio.WriteSettings(storage=storage))
    with pytest.raises(OSError, match="injected"):
        handle.result(30)
    np.testing.assert_array_equal(ckio.open_reader(tmp_path / "ckpt").read("v"), np.ones(3))


def test_callbacks_run_in_order_after_commit_off_the_loop(tmp_path, runtime):
    seen = []

    def first():
        seen.append(("first", ckio.checkpoint_exists(tmp_path / "ckpt"), runtime.in_loop_thread()))

    def second():
        seen.append(("second",))

    handle = ckio.start_write(tmp_path / "ckpt", [SaveEntry("a", np.ones(1))], {},
                                  settings=ckio.WriteSettings(runtime=runtime), on_commit=[first, second])
    handle.result(30)
    assert seen == [("first", True, False), ("second",)]


def test_callback_error_fails_the_handle_but_keeps_the_checkpoint(tmp_path):
    def broken():
        raise LookupError("state file update failed")

    handle = ckio.start_write(tmp_path / "ckpt", [SaveEntry("a", np.ones(1))], {}, on_commit=[broken])
    with pytest.raises(LookupError, match="state file"):
        handle.result(30)
    assert ckio.checkpoint_exists(tmp_path / "ckpt")


def test_writes_to_one_path_commit_in_start_order(tmp_path, runtime):
    gated = GatedStorage(FileStorage(), runtime)
    first = ckio.start_write(tmp_path / "ckpt", [SaveEntry("v", np.zeros(4))], {"n": 1},
                                 settings=ckio.WriteSettings(storage=gated, runtime=runtime))
    assert gated.reached.wait(10)
    second = ckio.start_write(tmp_path / "ckpt", [SaveEntry("v", np.ones(4))], {"n": 2},
                                  settings=ckio.WriteSettings(runtime=runtime))
    # Once the second write's data is durable it must still not commit before the first one has.
    while second.metrics.files_written < 1:
        threading.Event().wait(0.01)
    assert not second.done()
    assert not ckio.checkpoint_exists(tmp_path / "ckpt")
    gated.open_gate()
    second.result(30)
    assert first.done()
    reader = ckio.open_reader(tmp_path / "ckpt")
    assert reader.object_graph == {"n": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt.index", reader.data_dir])


def test_wait_for_pending_writes_blocks_until_done_and_swallows_errors(tmp_path, runtime):
    gated = GatedStorage(FileStorage(), runtime)
    handle = ckio.start_write(tmp_path / "run" / "ckpt-1", [SaveEntry("v", np.zeros(4))], {},
                                  settings=ckio.WriteSettings(storage=gated, runtime=runtime))
    failing = ckio.start_write(tmp_path / "run" / "ckpt-2", [SaveEntry("v", np.zeros(4))], {},
                                   settings=ckio.WriteSettings(storage=FailingStorage(FileStorage(), 1)))
    assert ckio.has_pending_writes(tmp_path / "run")
    assert ckio.has_pending_writes(tmp_path / "run" / "ckpt-1")
    assert not ckio.has_pending_writes(tmp_path / "run" / "ckpt")
    waited = threading.Event()
    waiter = threading.Thread(target=lambda: (ckio.wait_for_pending_writes(tmp_path / "run"), waited.set()))
    waiter.start()
    assert not waited.wait(0.2)
    gated.open_gate()
    waiter.join(30)
    assert waited.is_set() and handle.done() and failing.done()
    assert isinstance(failing.exception(), OSError)
    assert not ckio.has_pending_writes(tmp_path / "run")


def test_wait_for_pending_writes_inside_a_callback_does_not_deadlock(tmp_path):
    calls = []

    def callback():
        ckio.wait_for_pending_writes(tmp_path)  # the write running this callback is skipped
        calls.append(True)

    ckio.start_write(tmp_path / "ckpt", [SaveEntry("v", np.zeros(1))], {}, on_commit=[callback]).result(30)
    assert calls == [True]


def test_wait_from_a_user_event_loop_does_not_block_it(tmp_path, runtime):
    gated = GatedStorage(FileStorage(), runtime)

    async def main():
        ticks = 0
        stop = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        tick_task = asyncio.create_task(ticker())
        handle = ckio.start_write(tmp_path / "ckpt", [SaveEntry("v", np.arange(3))], {},
                                      settings=ckio.WriteSettings(storage=gated, runtime=runtime))
        waiting = asyncio.create_task(handle.wait())
        await asyncio.sleep(0.1)
        assert not waiting.done()
        ticks_while_waiting = ticks
        gated.open_gate()
        path = await waiting
        reader = await ckio.aopen_reader(tmp_path / "ckpt", ckio.ReadSettings(runtime=runtime))
        values = await reader.aread_many(["v"])
        stop.set()
        await tick_task
        return path, ticks_while_waiting, values

    path, ticks, values = asyncio.run(main())
    assert path == str(tmp_path / "ckpt")
    assert ticks >= 5  # the user's loop kept running while the write was stuck
    np.testing.assert_array_equal(values["v"], np.arange(3))


def test_cancelling_a_waiter_does_not_cancel_the_write(tmp_path, runtime):
    gated = GatedStorage(FileStorage(), runtime)
    handle = ckio.start_write(tmp_path / "ckpt", [SaveEntry("v", np.arange(3))], {},
                                  settings=ckio.WriteSettings(storage=gated, runtime=runtime))

    async def main():
        waiting = asyncio.create_task(handle.wait())
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())
    gated.open_gate()
    assert handle.result(30) == str(tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------------
# Corruption: every read verifies, and errors name the key and the file


@pytest.fixture
def committed(tmp_path):
    """A checkpoint with one chunked array and a pack of two small values."""
    values = {"big": np.arange(40, dtype=np.int64), "small": np.arange(3, dtype=np.int16), "state": b"abc"}
    settings = ckio.WriteSettings(chunk_bytes=128, pack_bytes=128, small_array_bytes=64, staging_budget_bytes=256)
    _write(tmp_path / "ckpt", values, settings=settings)
    data_dir = tmp_path / ckio.open_reader(tmp_path / "ckpt").data_dir
    return tmp_path / "ckpt", data_dir, values


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_intact_checkpoint_verifies(committed):
    path, _, values = committed
    report = ckio.open_reader(path).verify()
    assert report.tensors == 3
    assert report.bytes == sum(v.nbytes if isinstance(v, np.ndarray) else len(v) for v in values.values())


def test_flipped_data_byte_is_detected_by_read_and_verify(committed):
    path, data_dir, _ = committed
    _flip_byte(data_dir / "chunk-00001", 5)
    reader = ckio.open_reader(path)
    for action in (lambda: reader.read("big"), reader.verify):
        with pytest.raises(CorruptCheckpointError, match="checksum") as info:
            action()
        assert "'big'" in str(info.value) and "chunk-00001" in str(info.value)
    assert reader.read("small").tolist() == [0, 1, 2]  # other keys stay readable


def test_flipped_byte_in_a_pack_names_the_key_it_belongs_to(committed):
    path, data_dir, _ = committed
    _flip_byte(data_dir / "pack-00000", 7)  # "small" is bytes 0..5, "state" bytes 6..8
    with pytest.raises(CorruptCheckpointError, match="'state'.*pack-00000"):
        ckio.open_reader(path).read_many(["small", "state"])


def test_truncated_data_file_is_detected(committed):
    path, data_dir, _ = committed
    chunk = data_dir / "chunk-00002"
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(CorruptCheckpointError, match="'big'.*chunk-00002.*truncated"):
        ckio.open_reader(path).read("big")


def test_deleted_data_file_is_detected(committed):
    path, data_dir, _ = committed
    (data_dir / "pack-00000").unlink()
    with pytest.raises(CorruptCheckpointError, match="'small'.*pack-00000.*missing"):
        ckio.open_reader(path).read("small")
    with pytest.raises(CorruptCheckpointError, match="pack-00000"):
        ckio.open_reader(path).verify()


def test_corrupted_manifest_is_detected(committed):
    path, _, _ = committed
    index = path.parent / "ckpt.index"
    text = index.read_text()
    index.write_bytes(seal_manifest(json.loads(text.replace('"nbytes":320', '"nbytes":321'))))
    with pytest.raises(CorruptCheckpointError, match="ckpt.index.*'big'.*nbytes 321"):
        ckio.open_reader(path)
    index.write_text(text[: len(text) // 2])
    with pytest.raises(CorruptCheckpointError, match="ckpt.index"):
        ckio.open_reader(path)
    assert not ckio.checkpoint_exists(path)


def test_manifest_checksum_edit_is_detected_on_read(committed):
    path, _, _ = committed
    index = path.parent / "ckpt.index"
    document = json.loads(index.read_text())
    document["tensors"]["big"]["crc32c"] ^= 1
    index.write_bytes(seal_manifest(document))
    with pytest.raises(CorruptCheckpointError, match="'big'.*combined crc32c"):
        ckio.open_reader(path).read("big")


def test_unknown_format_version_is_unsupported(committed):
    path, _, _ = committed
    index = path.parent / "ckpt.index"
    document = json.loads(index.read_text())
    document["format_version"] = 99
    index.write_text(json.dumps(document))
    with pytest.raises(UnsupportedFormatError, match="99"):
        ckio.open_reader(path)
    assert ckio.checkpoint_exists(path)  # it is committed; this release just cannot read it


def test_data_dir_symlink_escaping_the_folder_is_rejected(committed, tmp_path_factory):
    path, data_dir, _ = committed
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "data"
    data_dir.rename(elsewhere)
    data_dir.symlink_to(elsewhere)
    with pytest.raises(CorruptCheckpointError, match="outside"):
        ckio.open_reader(path)


# ---------------------------------------------------------------------------------------------
# Debris left by crashed writes


NONCE = "00000000deadbeef"


def test_unreferenced_data_directory_is_removed_by_the_next_write(tmp_path):
    _write(tmp_path / "keep", {"v": np.ones(2)})
    debris = tmp_path / f"ckpt.data-{NONCE}"
    debris.mkdir()
    (debris / "pack-00000").write_bytes(b"partial")
    (tmp_path / f"ckpt.data-{NONCE}.lock").write_bytes(b"")  # its writer died holding nothing
    (tmp_path / f"ckpt.index.tmp-{NONCE}").write_bytes(b"{")
    orphan_tmp = tmp_path / "other.index.tmp-0000000000000001"
    orphan_tmp.write_bytes(b"{")
    lockless = tmp_path / "gone.data-0000000000000002"  # index deleted, data left (crashed delete)
    lockless.mkdir()
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("user file")
    _write(tmp_path / "next", {"v": np.zeros(2)})
    names = sorted(p.name for p in tmp_path.iterdir())
    keep, nxt = ckio.open_reader(tmp_path / "keep"), ckio.open_reader(tmp_path / "next")
    assert names == sorted(["keep.index", keep.data_dir, "next.index", nxt.data_dir, "notes.txt"])


def test_data_directory_of_a_write_in_progress_is_not_removed(tmp_path):
    in_progress = tmp_path / f"ckpt.data-{NONCE}"
    in_progress.mkdir()
    marker = tmp_path / f"ckpt.data-{NONCE}.lock"
    marker.write_bytes(b"")
    with open(marker, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a live writer in another process would
        _write(tmp_path / "other", {"v": np.zeros(2)})
        assert in_progress.is_dir() and marker.exists()
    _write(tmp_path / "third", {"v": np.zeros(2)})  # the "writer" is gone now
    assert not in_progress.exists() and not marker.exists()


def test_data_directory_named_by_a_renamed_manifest_is_kept(tmp_path):
    """A renamed manifest is refused on open, but cleanup keeps what it names: moved back, it reads."""
    _write(tmp_path / "orig", {"v": np.arange(3)})
    (tmp_path / "orig.index").rename(tmp_path / "renamed.index")
    _write(tmp_path / "next", {"v": np.zeros(2)})
    with pytest.raises(CorruptCheckpointError, match="manifest of checkpoint .*orig found at .*renamed.index"):
        ckio.open_reader(tmp_path / "renamed")
    (tmp_path / "renamed.index").rename(tmp_path / "orig.index")
    np.testing.assert_array_equal(ckio.open_reader(tmp_path / "orig").read("v"), np.arange(3))


def test_concurrent_in_process_write_is_not_mistaken_for_debris(tmp_path, runtime):
    gated = GatedStorage(FileStorage(), runtime)
    slow = ckio.start_write(tmp_path / "slow", [SaveEntry("v", np.arange(3))], {},
                                settings=ckio.WriteSettings(storage=gated, runtime=runtime))
    assert gated.reached.wait(10)
    _write(tmp_path / "fast", {"v": np.zeros(2)})
    gated.open_gate()
    slow.result(30)
    np.testing.assert_array_equal(ckio.open_reader(tmp_path / "slow").read("v"), np.arange(3))


def test_delete_checkpoint_uncommits_then_removes_data(tmp_path):
    _write(tmp_path / "ckpt", {"v": np.ones(2)})
    _write(tmp_path / "other", {"v": np.ones(2)})
    ckio.delete_checkpoint(tmp_path / "ckpt")
    ckio.delete_checkpoint(tmp_path / "ckpt")  # already gone: fine
    ckio.delete_checkpoint(tmp_path / "never")
    other = ckio.open_reader(tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["other.index", other.data_dir])


# ---------------------------------------------------------------------------------------------
# Process lifetime: interpreter exit and fork


def _python(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          env=env, check=False)


def test_a_write_pending_at_interpreter_exit_is_finished(tmp_path):
    result = _python(
        """
        import sys
        import numpy as np
        from asyncckpt import io as ckio
        ckio.start_write(sys.argv[1], [ckio.SaveEntry("v", np.arange(1_000_000.0))], {})
        """,
        str(tmp_path / "ckpt"),
    )
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(ckio.open_reader(tmp_path / "ckpt").read("v"), np.arange(1_000_000.0))


def test_a_forked_child_does_not_inherit_pending_writes(tmp_path):
    result = _python(
        """
        import os, sys
        import numpy as np
        from _fakes import GatedStorage
        from asyncckpt import io as ckio
        from asyncckpt._runtime import get_runtime
        from asyncckpt.io.storage import FileStorage

        gated = GatedStorage(FileStorage(), get_runtime())
        handle = ckio.start_write(sys.argv[1], [ckio.SaveEntry("v", np.zeros(3))], {},
                                      settings=ckio.WriteSettings(storage=gated))
        assert ckio.has_pending_writes(sys.argv[1])
        child = os.fork()
        if child == 0:
            os._exit(1 if ckio.has_pending_writes(sys.argv[1]) else 0)
        _, status = os.waitpid(child, 0)
        gated.open_gate()
        handle.result()
        raise SystemExit(os.waitstatus_to_exitcode(status))
        """,
        str(tmp_path / "ckpt"),
    )
    assert result.returncode == 0, result.stderr


def test_a_write_pending_at_exit_is_finished_without_starting_threads(tmp_path):
    # What Python 3.12 does at exit (it refuses new threads), simulated on any version: nothing
    # the pending write still has to do may need a new thread.
    result = _python(
        """
        import sys, threading
        import numpy as np
        from asyncckpt import io as ckio

        def refuse(self):
            raise RuntimeError("can't create new thread at interpreter shutdown")

        handle = ckio.start_write(sys.argv[1], [ckio.SaveEntry("v", np.arange(1_000_000.0))], {})
        threading.Thread.start = refuse
        """,
        str(tmp_path / "ckpt"),
    )
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(ckio.open_reader(tmp_path / "ckpt").read("v"), np.arange(1_000_000.0))


# ---------------------------------------------------------------------------------------------
# Reading into destinations


def test_read_many_fills_the_given_arrays_in_place(committed):
    path, _, values = committed
    big, small = np.zeros(40, np.int64), np.full(3, -1, np.int16)
    out = ckio.open_reader(path).read_many(["big", "small", "state"], out={"big": big, "small": small})
    assert out["big"] is big and out["small"] is small and out["state"] == b"abc"
    np.testing.assert_array_equal(big, values["big"])
    np.testing.assert_array_equal(small, values["small"])


def _read_only(array):
    array.setflags(write=False)
    return array


@pytest.mark.parametrize(
    ("key", "make", "pattern"),
    [
        ("big", lambda: np.zeros(40, np.int32), "dtype and shape"),
        ("big", lambda: np.zeros((4, 10), np.int64), "dtype and shape"),
        ("big", lambda: np.zeros(80, np.int64)[::2], "C-contiguous"),
        ("big", lambda: _read_only(np.zeros(40, np.int64)), "writable"),
        ("state", lambda: bytearray(3), "byte string"),
        ("big", lambda: [0] * 40, "a list"),
    ],
)
def test_a_destination_that_does_not_fit_is_refused_before_anything_is_read(committed, key, make, pattern):
    path, _, _ = committed
    destination = make()
    with pytest.raises(ValueError, match=pattern):
        ckio.open_reader(path).read_many([key], out={key: destination})
    if isinstance(destination, np.ndarray):
        assert not destination.any()  # untouched


def test_a_destination_for_a_key_not_being_read_is_refused(committed):
    path, _, _ = committed
    with pytest.raises(KeyError, match="big"):
        ckio.open_reader(path).read_many(["small"], out={"big": np.zeros(40, np.int64)})


def test_values_sharing_bytes_are_read_once_and_copied_to_each_destination(committed):
    """Overlapping extents (only a crafted manifest has them) still read and verify correctly."""
    path, _, values = committed
    index = path.parent / "ckpt.index"
    document = json.loads(index.read_text())
    document["tensors"]["twin"] = document["tensors"]["small"]
    index.write_bytes(seal_manifest(document))
    twin = np.zeros(3, np.int16)
    out = ckio.open_reader(path).read_many(["small", "twin"], out={"twin": twin})
    assert out["twin"] is twin
    np.testing.assert_array_equal(twin, values["small"])
    np.testing.assert_array_equal(out["small"], values["small"])


def test_a_destination_is_filled_from_a_storage_that_only_reads_bytes(tmp_path):
    storage = WrappingStorage(FileStorage(), BackendWrapper)  # read_into falls back to read + copy
    values = {"a": np.arange(1000, dtype=np.float32), "b": np.arange(5, dtype=np.uint8)}
    _write(tmp_path / "ckpt", values, settings=ckio.WriteSettings(storage=storage))
    destination = np.zeros(1000, np.float32)
    reader = ckio.open_reader(tmp_path / "ckpt", ckio.ReadSettings(storage=storage))
    out = reader.read_many(["a", "b"], out={"a": destination})
    assert out["a"] is destination
    np.testing.assert_array_equal(destination, values["a"])
    np.testing.assert_array_equal(out["b"], values["b"])


# ---------------------------------------------------------------------------------------------
# Prepared writes and statistics


def test_a_prepared_write_is_reused_with_new_values_and_writes_what_start_write_would(tmp_path):
    variable = FakeVariable(np.arange(6, dtype=np.float64))
    entries = [SaveEntry("v", variable), SaveEntry("state", b"one"), SaveEntry("a", np.ones(3))]
    prepared = ckio.prepare_write(entries, {"n": 1})
    first = ckio.start_write(tmp_path / "first", prepared)
    first.result()
    again = prepared.with_values({1: b"three", 2: np.zeros(3)})  # "state" changes size: re-planned
    assert again.plan is not prepared.plan and again.layout is not prepared.layout
    same_size = prepared.with_values({1: b"two"})
    assert same_size.plan is prepared.plan and same_size.layout is prepared.layout
    ckio.start_write(tmp_path / "second", again).result()
    _write(tmp_path / "plain", {"v": variable, "state": b"three", "a": np.zeros(3)}, graph={"n": 1})
    second, plain = ckio.open_reader(tmp_path / "second"), ckio.open_reader(tmp_path / "plain")
    assert second.object_graph == plain.object_graph == {"n": 1}
    for key in ("v", "state", "a"):
        assert second._record(key) == plain._record(key)
    with pytest.raises(TypeError, match="prepare_write"):
        ckio.start_write(tmp_path / "third", prepared, {"n": 2})


def test_start_write_reports_statistics_once_the_write_has_ended(tmp_path):
    received = []
    handle = ckio.start_write(tmp_path / "ckpt", [SaveEntry("v", np.ones(1000))], {}, on_stats=received.append)
    handle.result()
    (stats,) = received
    assert stats.path == str(tmp_path / "ckpt") and stats.bytes_written == 8000 and stats.error is None
    assert stats.write_bandwidth > 0
    assert handle.metrics.bytes_written == 8000 and handle.metrics.snapshot_seconds == stats.snapshot_seconds
