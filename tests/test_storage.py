"""One contract suite for every storage backend, plus the filesystem backend's own guarantees."""

from __future__ import annotations

import fcntl
import os

import numpy as np
import pytest

from asyncckpt._runtime import Runtime
from asyncckpt.errors import CorruptCheckpointError
from asyncckpt.io.storage import FileStorage, KvStoreStorage, StorageError, StreamedValue, TruncatedError


@pytest.fixture(scope="module")
def runtime():
    runtime = Runtime()
    yield runtime
    runtime.close()


@pytest.fixture(params=["file", "memory"])
def backend(request, tmp_path, runtime):
    if request.param == "file":
        storage = FileStorage()
        folder, _ = storage.split(str(tmp_path / "run" / "ckpt"))
    else:
        storage = KvStoreStorage({"driver": "memory"})
        folder, _ = storage.split("bucket/run/ckpt")
    backend = runtime.run(storage.open(folder))
    runtime.run(backend.prepare())
    return backend


def test_write_read_ranges_and_missing(backend, runtime):
    runtime.run(backend.create_data_dir("d"))
    runtime.run(backend.write("d/file", bytearray(b"0123456789")))
    assert runtime.run(backend.read("d/file")) == b"0123456789"
    assert runtime.run(backend.read("d/file", 2, 5)) == b"234"
    assert runtime.run(backend.read("d/file", 10, 10)) == b""
    assert runtime.run(backend.read("d/nothing")) is None
    with pytest.raises(TruncatedError):
        runtime.run(backend.read("d/file", 5, 11))
    assert isinstance(TruncatedError("x"), OSError)


def test_commit_replaces_atomically_and_leaves_no_temporary(backend, runtime):
    runtime.run(backend.commit("ckpt.index", "ckpt.index.tmp-0123456789abcdef", b"one"))
    runtime.run(backend.commit("ckpt.index", "ckpt.index.tmp-fedcba9876543210", b"two"))
    assert runtime.run(backend.read("ckpt.index")) == b"two"
    assert runtime.run(backend.list_names()) == {"ckpt.index"}


def test_list_and_delete(backend, runtime):
    runtime.run(backend.create_data_dir("ckpt.data-x"))
    runtime.run(backend.write("ckpt.data-x/a", b"1"))
    runtime.run(backend.write("ckpt.data-x/b", b"2"))
    runtime.run(backend.write("ckpt.data-xy/c", b"3"))  # shares a prefix, must survive delete_tree
    runtime.run(backend.commit("ckpt.index", "tmp", b"i"))
    assert runtime.run(backend.list_names()) == {"ckpt.data-x", "ckpt.data-xy", "ckpt.index"}
    runtime.run(backend.delete_tree("ckpt.data-x"))
    runtime.run(backend.delete_tree("ckpt.data-x"))  # already gone: fine
    runtime.run(backend.delete("ckpt.index"))
    runtime.run(backend.delete("ckpt.index"))
    assert runtime.run(backend.list_names()) == {"ckpt.data-xy"}
    assert runtime.run(backend.read("ckpt.data-xy/c")) == b"3"


def test_locks_exclude_each_other_and_vanish_on_release(backend, runtime):
    lock = runtime.run(backend.lock_new("ckpt.data-n.lock"))
    assert lock is not None
    assert "ckpt.data-n.lock" in runtime.run(backend.list_names())
    assert runtime.run(backend.try_lock("ckpt.data-n.lock")) is None  # held
    runtime.run(lock.release())
    runtime.run(lock.release())  # idempotent
    assert "ckpt.data-n.lock" not in runtime.run(backend.list_names())
    assert runtime.run(backend.try_lock("ckpt.data-n.lock")) is None  # missing marker: nothing to take


def test_describe_names_the_location(backend):
    assert backend.describe("ckpt.index").endswith("run/ckpt.index")


# ---------------------------------------------------------------------------------------------
# FileStorage specifics


def test_file_try_lock_takes_a_stale_marker(tmp_path, runtime):
    storage = FileStorage()
    backend = runtime.run(storage.open(str(tmp_path)))
    (tmp_path / "ckpt.data-n.lock").write_bytes(b"")
    lock = runtime.run(backend.try_lock("ckpt.data-n.lock"))
    assert lock is not None
    runtime.run(lock.release())
    assert not (tmp_path / "ckpt.data-n.lock").exists()


def test_file_lock_held_by_another_open_file_is_respected(tmp_path, runtime):
    backend = runtime.run(FileStorage().open(str(tmp_path)))
    marker = tmp_path / "ckpt.data-n.lock"
    marker.write_bytes(b"")
    with open(marker, "rb") as other:  # another process's (or open file description's) lock
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        assert runtime.run(backend.try_lock("ckpt.data-n.lock")) is None
        assert runtime.run(backend.lock_new("ckpt.data-n.lock")) is None  # exists already
    assert runtime.run(backend.try_lock("ckpt.data-n.lock")) is not None


def test_file_prepare_creates_missing_parents(tmp_path, runtime):
    folder = tmp_path / "a" / "b" / "c"
    backend = runtime.run(FileStorage().open(str(folder)))
    runtime.run(backend.prepare())
    assert folder.is_dir()
    runtime.run(backend.prepare())  # exists: fine


def test_file_data_dir_symlink_outside_the_folder_is_rejected(tmp_path, runtime):
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


def test_file_storage_errors_carry_errno(tmp_path, runtime):
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
    monkeypatch.chdir(tmp_path)  # restored afterwards: later tests keep their working directory
    assert storage.canonical("ckpt") == str(tmp_path / "ckpt")
    memory = KvStoreStorage({"driver": "memory"})
    assert memory.split("/b/run/ckpt") == ("b/run", "ckpt")
    with pytest.raises(ValueError):
        memory.split("b/run/")
    with pytest.raises(ValueError, match="driver"):
        KvStoreStorage({"path": "x"})


class _Chunks(StreamedValue):
    """A value produced in batches, the way the write pipeline produces a data file."""

    def __init__(self, *batches: bytes) -> None:
        self._batches = batches
        self.size = sum(len(part) for batch in batches for part in batch)
        self.served = 0

    def segments(self):
        for batch in self._batches:
            self.served += 1
            yield [memoryview(part) for part in batch]


def test_a_streamed_value_is_written_batch_by_batch(backend, runtime):
    runtime.run(backend.create_data_dir("d"))
    value = _Chunks((b"01", b"234"), (b"", b"56789"))
    runtime.run(backend.write("d/file", value))
    assert value.served == 2
    assert runtime.run(backend.read("d/file")) == b"0123456789"


def test_read_into_scatters_a_range_over_several_buffers(backend, runtime):
    runtime.run(backend.create_data_dir("d"))
    runtime.run(backend.write("d/file", b"0123456789"))
    first, gap, second = bytearray(3), bytearray(2), np.zeros(4, np.uint8)
    assert runtime.run(backend.read_into("d/file", 1, [first, gap, memoryview(second)])) is True
    assert (bytes(first), bytes(gap), second.tobytes()) == (b"123", b"45", b"6789")
    assert runtime.run(backend.read_into("d/nothing", 0, [bytearray(1)])) is False
    with pytest.raises(TruncatedError):
        runtime.run(backend.read_into("d/file", 8, [bytearray(3)]))


def test_holds_tells_missing_short_and_long_enough_apart(backend, runtime):
    runtime.run(backend.create_data_dir("d"))
    runtime.run(backend.write("d/file", b"0123456789"))
    assert runtime.run(backend.holds("d/file", 10)) is True
    assert runtime.run(backend.holds("d/file", 11)) is False
    assert runtime.run(backend.holds("d/nothing", 1)) is None


@pytest.mark.parametrize("direct_io", [True, False])
@pytest.mark.parametrize("size", [4 << 20, (4 << 20) + 4096, (9 << 20) + 123])
def test_large_streamed_values_round_trip_with_and_without_direct_io(tmp_path, runtime, direct_io, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    parts = [data[start : start + 777_777].tobytes() for start in range(0, size, 777_777)]  # unaligned pieces
    backend = runtime.run(FileStorage(direct_io=direct_io).open(str(tmp_path)))
    runtime.run(backend.create_data_dir("d"))
    runtime.run(backend.write("d/file", _Chunks(*[parts[i : i + 3] for i in range(0, len(parts), 3)])))
    assert (tmp_path / "d" / "file").read_bytes() == data.tobytes()
    runtime.run(backend.write("d/file", _Chunks(parts[:1])))  # replacing: truncated to the new size
    assert (tmp_path / "d" / "file").read_bytes() == parts[0]


def test_a_streamed_value_can_be_read_into_buffers_of_any_size():
    value = _Chunks((b"012", b"3"), (b"456789",))
    buffer = bytearray(4)
    parts = []
    while got := value.readinto(buffer):
        parts.append(bytes(buffer[:got]))
    assert parts == [b"0123", b"4567", b"89"]
