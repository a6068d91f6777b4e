"""FileStorage's own guarantees, beyond the backend contract (tests/test_storage_contract.py)."""

from __future__ import annotations

import fcntl
import os
import warnings

import numpy as np
import pytest

from asyncckpt._runtime import Runtime, process_state
from asyncckpt.errors import CorruptCheckpointError
from asyncckpt.io.storage import FileStorage, StorageError, default_storage
from asyncckpt.io.storage.file import BounceBuffers
from asyncckpt.testing.storage import BatchedValue


@pytest.fixture(scope="module")
def runtime():
    runtime = Runtime()
    yield runtime
    runtime.close()


def test_try_lock_takes_a_stale_marker(tmp_path, runtime):
    storage = FileStorage()
    backend = runtime.run(storage.open(str(tmp_path)))
    (tmp_path / "ckpt.data-n.lock").write_bytes(b"")
    lock = runtime.run(backend.try_lock("ckpt.data-n.lock"))
    assert lock is not None
    runtime.run(lock.release())
    assert not (tmp_path / "ckpt.data-n.lock").exists()


def test_a_lock_held_by_another_open_file_is_respected(tmp_path, runtime):
    backend = runtime.run(FileStorage().open(str(tmp_path)))
    marker = tmp_path / "ckpt.data-n.lock"
    marker.write_bytes(b"")
    with open(marker, "rb") as other:  # another process's (or open file description's) lock
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        assert runtime.run(backend.try_lock("ckpt.data-n.lock")) is None
        assert runtime.run(backend.lock_new("ckpt.data-n.lock")) is None  # exists already
    assert runtime.run(backend.try_lock("ckpt.data-n.lock")) is not None


def test_prepare_creates_missing_parents(tmp_path, runtime):
    folder = tmp_path / "a" / "b" / "c"
    backend = runtime.run(FileStorage().open(str(folder)))
    runtime.run(backend.prepare())
    assert folder.is_dir()
    runtime.run(backend.prepare())  # exists: fine


def test_a_data_dir_symlink_outside_the_folder_is_rejected(tmp_path, runtime):
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "ckpt.data-evil").symlink_to(outside)
    (folder / "ckpt.data-fine").symlink_to(folder / "real")
    (folder / "real").mkdir()
    backend = runtime.run(FileStorage().open(str(folder)))
    with pytest.raises(CorruptCheckpointError, match="outside"):
        runtime.run(backend.check_data_dir("ckpt.data-evil"))
    runtime.run(backend.check_data_dir("ckpt.data-fine"))
    runtime.run(backend.delete_tree("ckpt.data-evil"))  # removes the link, not what it points to
    assert outside.is_dir() and not (folder / "ckpt.data-evil").exists()


def test_a_checkpoint_file_that_is_a_symlink_is_refused(tmp_path, runtime):
    (tmp_path / "elsewhere").write_bytes(b"secret")
    (tmp_path / "ckpt.index").symlink_to(tmp_path / "elsewhere")
    backend = runtime.run(FileStorage().open(str(tmp_path)))
    with pytest.raises(CorruptCheckpointError, match="symbolic link"):
        runtime.run(backend.read("ckpt.index"))


def test_storage_errors_carry_errno(tmp_path, runtime):
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")
    backend = runtime.run(FileStorage().open(str(blocker)))  # "folder" is a file
    with pytest.raises(StorageError) as info:
        runtime.run(backend.write("x/y", b"1"))
    assert info.value.errno == 20  # ENOTDIR


def test_split_rejects_folders_and_canonicalises(tmp_path, monkeypatch):
    storage = FileStorage()
    assert storage.split(str(tmp_path / "ckpt")) == (str(tmp_path), "ckpt")
    assert storage.split(tmp_path / "x" / ".." / "ckpt") == (str(tmp_path), "ckpt")
    for bad in ["", str(tmp_path) + "/", "a\x00b"]:
        with pytest.raises(ValueError):
            storage.split(bad)
    monkeypatch.chdir(tmp_path)
    assert storage.canonical("ckpt") == str(tmp_path / "ckpt")


@pytest.mark.parametrize("direct_io", [True, False])
@pytest.mark.parametrize("size", [4 << 20, (4 << 20) + 4096, (9 << 20) + 123])
def test_large_streamed_values_round_trip_with_and_without_direct_io(tmp_path, runtime, direct_io, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    parts = [data[start : start + 777_777].tobytes() for start in range(0, size, 777_777)]  # unaligned pieces
    backend = runtime.run(FileStorage(direct_io=direct_io).open(str(tmp_path)))
    runtime.run(backend.create_data_dir("d"))
    runtime.run(backend.write("d/file", BatchedValue(*[parts[i : i + 3] for i in range(0, len(parts), 3)])))
    assert (tmp_path / "d" / "file").read_bytes() == data.tobytes()
    runtime.run(backend.write("d/file", BatchedValue(parts[:1])))  # replacing: truncated to the new size
    assert (tmp_path / "d" / "file").read_bytes() == parts[0]


def test_bounce_buffers_keep_four_for_reuse_and_close_the_rest():
    buffers = BounceBuffers()
    taken = [buffers.take() for _ in range(5)]
    for buffer in taken:
        buffer[0] = 1  # usable
        buffers.give(buffer)
    assert taken[4].closed and not any(buffer.closed for buffer in taken[:4])
    assert {id(buffers.take()) for _ in range(4)} == {id(buffer) for buffer in taken[:4]}


def test_the_default_storage_and_bounce_buffers_belong_to_the_process_and_a_child_gets_its_own():
    storage, buffers = default_storage(), process_state().owned(BounceBuffers)
    assert isinstance(storage, FileStorage)
    assert default_storage() is storage and process_state().owned(FileStorage) is storage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # forking a process that runs threads
        child = os.fork()
    if child == 0:
        code = 2
        try:
            fresh = default_storage() is not storage and process_state().owned(BounceBuffers) is not buffers
            code = 0 if fresh and default_storage() is default_storage() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("sizes", [[10_000], [3000, 5000, 1, 9000], [4096] * 7])
def test_reads_larger_than_one_call_land_in_place_split_into_bounded_calls(tmp_path, runtime, monkeypatch, sizes):
    from asyncckpt.io.storage import file as file_module

    calls = []
    real_preadv = os.preadv

    def preadv(fd, buffers, offset):
        calls.append(sum(memoryview(buffer).nbytes for buffer in buffers))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(file_module, "READ_CALL_BYTES", 4096)
    monkeypatch.setattr(file_module.os, "preadv", preadv)
    data = np.random.default_rng(0).integers(0, 256, sum(sizes) + 100, dtype=np.uint8)
    (tmp_path / "blob").write_bytes(data.tobytes())
    backend = runtime.run(FileStorage().open(str(tmp_path)))
    buffers = [bytearray(size) for size in sizes]
    assert runtime.run(backend.read_into("blob", 100, buffers))
    assert b"".join(buffers) == data[100:].tobytes()
    assert calls and max(calls) <= 4096 and sum(calls) == sum(sizes)
