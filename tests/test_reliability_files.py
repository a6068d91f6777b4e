"""Checkpoint files on a file system that someone else also touches.

* A manifest is bound to its path: one copied or renamed to another checkpoint's name is refused
  on open, and deleting or replacing a checkpoint never deletes data another manifest names.
* Anything that is not a regular file (FIFOs, directories, links) where a checkpoint file, the
  state file or a lock should be gets a clear error, never a hang.
* Verification reads in bounded windows: a sparse data file claiming gigabytes costs no memory.
* Files this library creates are never created or opened through a planted symbolic link.
* A full disk names the file it could not write.

Every test works on real files: real FIFOs (``os.mkfifo``), sparse files, symbolic links and,
where mounting is permitted, a real full tmpfs. Tests touching a FIFO carry a timeout: a guard
against a hang, not a measure of speed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import tracemalloc
from pathlib import Path

import crc32c
import numpy as np
import pytest
from _fakes import mounted_tmpfs

import asyncckpt as ac
from asyncckpt import cli
from asyncckpt import io as ckio
from asyncckpt._runtime import get_runtime
from asyncckpt.errors import CorruptCheckpointError
from asyncckpt.checksums import crc32c_combine
from asyncckpt.format import seal_manifest
from asyncckpt.naming import index_path
from asyncckpt.io.storage import FileStorage, StorageError

MiB = 1 << 20
V = "v/.ATTRIBUTES/VARIABLE_VALUE"


def _checkpoint(value) -> tuple[ac.Checkpoint, ac.Variable]:
    variable = ac.Variable(np.asarray(value, dtype=np.float32))
    return ac.Checkpoint(v=variable), variable


def _value_at(prefix) -> np.ndarray:
    return ckio.open_reader(prefix).read(V)


def _manifest(prefix) -> dict:
    return json.loads(Path(index_path(str(prefix))).read_bytes())


def _only_data_file(prefix) -> Path:
    data_dir = Path(prefix).parent / _manifest(prefix)["data_dir"]
    (data_file,) = data_dir.iterdir()
    return data_file


def _backend(folder):
    return get_runtime().run(FileStorage().open(str(folder)))


# ---------------------------------------------------------------------------------------------
# 1. A manifest is bound to its path


@pytest.fixture
def three(tmp_path):
    """``ckpt-1``..``ckpt-3`` saved by a manager keeping every one, valued 1, 2 and 3."""
    checkpoint, variable = _checkpoint([0.0, 0.0])
    manager = ac.CheckpointManager(checkpoint, tmp_path, max_to_keep=3)
    for step in (1, 2, 3):
        variable.assign(np.full(2, step, np.float32))
        manager.save()
    return tmp_path, manager, variable


def test_a_manifest_copied_over_another_checkpoint_is_refused_naming_both_paths(three, capsys):
    folder, _, _ = three
    shutil.copyfile(folder / "ckpt-3.index", folder / "ckpt-1.index")
    copied = str(folder / "ckpt-1")
    pattern = f"manifest of checkpoint {folder / 'ckpt-3'} found at {folder / 'ckpt-1.index'}"
    with pytest.raises(CorruptCheckpointError, match=pattern):
        _checkpoint([0.0, 0.0])[0].restore(copied)
    with pytest.raises(CorruptCheckpointError, match=pattern):
        ckio.open_reader(copied).verify()
    assert cli.main(["verify", copied]) == 1
    assert "manifest of checkpoint" in capsys.readouterr().err
    np.testing.assert_array_equal(_value_at(folder / "ckpt-3"), [3, 3])  # the original still reads


def test_a_manifest_copied_to_a_new_name_is_refused_and_moving_it_back_reads(three):
    folder, _, _ = three
    shutil.copyfile(folder / "ckpt-3.index", folder / "best.index")
    with pytest.raises(CorruptCheckpointError, match="Checkpoint.restore, then Checkpoint.write"):
        ckio.open_reader(folder / "best")
    (folder / "ckpt-3.index").unlink()
    (folder / "best.index").rename(folder / "ckpt-3.index")
    np.testing.assert_array_equal(_value_at(folder / "ckpt-3"), [3, 3])


def test_a_manifest_naming_a_directory_not_named_after_its_checkpoint_is_refused(tmp_path):
    checkpoint, _ = _checkpoint([1.0, 2.0])
    prefix = checkpoint.write(str(tmp_path / "ckpt"))
    document = _manifest(prefix)
    (tmp_path / document["data_dir"]).rename(tmp_path / "moved")
    document["data_dir"] = "moved"
    Path(index_path(prefix)).write_bytes(seal_manifest(document))  # sealed, as someone editing it would
    with pytest.raises(CorruptCheckpointError, match=r"'moved', which is not a data directory of checkpoint 'ckpt'"):
        ckio.open_reader(prefix)


def test_expiring_a_checkpoint_whose_manifest_is_a_copy_keeps_the_copied_checkpoint(three):
    folder, manager, variable = three
    shutil.copyfile(folder / "ckpt-3.index", folder / "ckpt-1.index")
    variable.assign(np.full(2, 4, np.float32))
    manager.save()  # ckpt-4: expires ckpt-1, whose manifest names ckpt-3's data
    assert not (folder / "ckpt-1.index").exists()
    ckio.open_reader(folder / "ckpt-3").verify()
    np.testing.assert_array_equal(_value_at(folder / "ckpt-3"), [3, 3])
    assert manager.checkpoints == [str(folder / f"ckpt-{n}") for n in (2, 3, 4)]


def test_deleting_a_checkpoint_keeps_data_another_manifest_names(three):
    folder, _, _ = three
    shutil.copyfile(folder / "ckpt-3.index", folder / "best.index")
    data_dir = folder / _manifest(folder / "ckpt-3")["data_dir"]
    ckio.delete_checkpoint(folder / "ckpt-3")
    assert not (folder / "ckpt-3.index").exists()
    assert data_dir.is_dir(), "deleted data that best.index still names"
    (folder / "best.index").rename(folder / "ckpt-3.index")
    np.testing.assert_array_equal(_value_at(folder / "ckpt-3"), [3, 3])


def test_replacing_a_checkpoint_whose_manifest_is_a_copy_keeps_the_other_data(three):
    folder, _, _ = three
    shutil.copyfile(folder / "ckpt-3.index", folder / "ckpt-1.index")
    _checkpoint([7.0, 7.0])[0].write(str(folder / "ckpt-1"))  # replaces the copied manifest
    np.testing.assert_array_equal(_value_at(folder / "ckpt-1"), [7, 7])
    ckio.open_reader(folder / "ckpt-3").verify()
    np.testing.assert_array_equal(_value_at(folder / "ckpt-3"), [3, 3])


# ---------------------------------------------------------------------------------------------
# 2. FIFOs and other files that are not regular files


@pytest.fixture
def fifo():
    """``make(path)``: a real FIFO at ``path``. Afterwards each is opened at both ends without
    blocking and closed, so a reader or writer a failing test left stuck on it returns."""
    made: list[Path] = []

    def make(path) -> Path:
        os.mkfifo(path)
        made.append(Path(path))
        return Path(path)

    yield make
    for path in made:
        fds = []
        for flags in (os.O_RDONLY, os.O_WRONLY):
            try:
                fds.append(os.open(path, flags | os.O_NONBLOCK))
            except OSError:
                pass
        for fd in fds:
            os.close(fd)


@pytest.mark.timeout(30)
def test_a_data_file_that_is_a_fifo_is_refused_by_every_reader(tmp_path, fifo, capsys):
    checkpoint, _ = _checkpoint([1.0, 2.0])
    prefix = checkpoint.write(str(tmp_path / "ckpt"))
    data_file = _only_data_file(prefix)
    data_file.unlink()
    fifo(data_file)
    for action in (lambda: _checkpoint([0.0, 0.0])[0].read(prefix), lambda: ckio.open_reader(prefix).verify()):
        with pytest.raises(CorruptCheckpointError, match="FIFO") as raised:
            action()
        assert repr(V) in str(raised.value) and str(data_file) in str(raised.value)
    assert cli.main(["verify", prefix]) == 1
    assert "FIFO" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_an_index_that_is_a_fifo_is_refused(tmp_path, fifo, capsys):
    prefix = str(tmp_path / "ckpt")
    fifo(index_path(prefix))
    with pytest.raises(CorruptCheckpointError, match=r"ckpt\.index is a FIFO"):
        _checkpoint([0.0, 0.0])[0].restore(prefix)
    assert cli.main(["verify", prefix]) == 1
    assert "FIFO" in capsys.readouterr().err
    assert not ckio.checkpoint_exists(prefix)


@pytest.mark.timeout(30)
def test_a_state_file_that_is_a_fifo_reads_as_unreadable(tmp_path, fifo, caplog, capsys):
    checkpoint, _ = _checkpoint([1.0, 2.0])
    fifo(tmp_path / "checkpoint")
    fifo(tmp_path / ".checkpoint.deleting")
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        assert ac.latest_checkpoint(tmp_path) is None
    assert "FIFO" in caplog.text
    assert cli.main(["verify", str(tmp_path)]) == 1
    capsys.readouterr()
    manager = ac.CheckpointManager(checkpoint, tmp_path, max_to_keep=1)
    assert manager.latest_checkpoint is None
    path = manager.save()  # replaces the FIFO with a state file
    assert ac.latest_checkpoint(tmp_path) == path


@pytest.mark.timeout(30)
def test_a_fifo_named_like_a_manifest_stops_neither_saves_nor_cleanup(tmp_path, fifo):
    checkpoint, _ = _checkpoint([1.0, 2.0])
    checkpoint.write(str(tmp_path / "ckpt"))
    debris = tmp_path / "lost.data-0123456789abcdef"  # left by a crashed write
    debris.mkdir()
    (debris / "pack-00000").write_bytes(b"x")
    fifo(tmp_path / "other.index")
    checkpoint.write(str(tmp_path / "ckpt"))  # cleanup reads every *.index
    assert not debris.exists()
    ckio.open_reader(tmp_path / "ckpt").verify()


# ---------------------------------------------------------------------------------------------
# 3. Sparse files and the memory bound


def _crc_of_zeros(nbytes: int) -> int:
    """CRC-32C of ``nbytes`` zero bytes (a power of two times 1 MiB), without making them."""
    crc, length = crc32c.crc32c(bytes(MiB)), MiB
    while length < nbytes:
        crc, length = crc32c_combine(crc, crc, length), length * 2
    assert length == nbytes
    return crc


@pytest.mark.parametrize("checksum", ["matching", "wrong"])
def test_verify_of_a_sparse_value_allocates_a_window_not_its_size(tmp_path, checksum):
    """1 GiB claimed over a sparse file (no disk): ``verify()`` stays within a few read windows."""
    checkpoint, _ = _checkpoint([1.0, 2.0])
    prefix = checkpoint.write(str(tmp_path / "ckpt"))
    document = _manifest(prefix)
    nbytes = 1 << 30
    with open(tmp_path / document["data_dir"] / "sparse", "wb") as sparse:
        sparse.truncate(nbytes)
    crc = _crc_of_zeros(nbytes) ^ (0 if checksum == "matching" else 1)
    document["tensors"]["big"] = {
        "dtype": "|u1", "shape": [nbytes], "nbytes": nbytes, "crc32c": crc,
        "extents": [{"file": "sparse", "offset": 0, "length": nbytes, "crc32c": crc}],
    }
    Path(index_path(prefix)).write_bytes(seal_manifest(document))
    assert os.stat(tmp_path / document["data_dir"] / "sparse").st_blocks == 0
    reader = ckio.open_reader(prefix)
    bound = 2 * ckio.ReadSettings().max_read_bytes
    tracemalloc.start()
    try:
        if checksum == "matching":
            assert reader.verify().bytes >= nbytes
        else:
            with pytest.raises(CorruptCheckpointError, match="'big'.*fails its checksum"):
                reader.verify()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < bound, f"verify allocated {peak} bytes for a value it does not keep (bound {bound})"


# ---------------------------------------------------------------------------------------------
# 5. Files this library writes, and planted symbolic links


def test_a_symbolic_link_planted_as_the_state_file_lock_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / ".checkpoint.lock").symlink_to(outside / "created")
    checkpoint, _ = _checkpoint([1.0, 2.0])
    with pytest.raises(StorageError, match=r"\.checkpoint\.lock is a symbolic link.*state-file lock") as raised:
        checkpoint.save(str(run / "ckpt"))
    assert raised.value.errno == errno.ELOOP
    with pytest.raises(StorageError, match="symbolic link"):
        ac.CheckpointManager(checkpoint, run, max_to_keep=1).save()
    assert list(outside.iterdir()) == [], "a save created a file outside its folder"
    (run / ".checkpoint.lock").unlink()  # as the message says: the next save makes a fresh one
    path = checkpoint.save(str(run / "ckpt"))
    assert ac.latest_checkpoint(run) == path


def test_a_lock_marker_planted_as_a_symbolic_link_is_never_locked(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"")
    folder = tmp_path / "run"
    folder.mkdir()
    marker = folder / "ckpt.data-0123456789abcdef.lock"
    marker.symlink_to(outside)
    backend = _backend(folder)
    lock = get_runtime().run(backend.try_lock(marker.name))
    try:
        with open(outside, "rb") as probe:  # another open file description: excluded by a flock on it
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        if lock is not None:
            get_runtime().run(lock.release())
    assert lock is None
    assert marker.is_symlink()
    assert get_runtime().run(backend.lock_new("ckpt.data-fedcba9876543210.lock")) is not None


def test_a_new_lock_marker_is_never_created_through_a_planted_link(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "ckpt.data-0123456789abcdef.lock").symlink_to(tmp_path / "created")
    assert get_runtime().run(_backend(folder).lock_new("ckpt.data-0123456789abcdef.lock")) is None
    assert not (tmp_path / "created").exists()


def test_a_data_file_is_never_written_through_a_planted_link(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"precious")
    folder = tmp_path / "run"
    (folder / "ckpt.data-0123456789abcdef").mkdir(parents=True)
    planted = folder / "ckpt.data-0123456789abcdef" / "pack-00000"
    planted.symlink_to(secret)
    with pytest.raises(StorageError, match="symbolic link") as raised:
        get_runtime().run(_backend(folder).write("ckpt.data-0123456789abcdef/pack-00000", b"overwritten"))
    assert str(planted) in str(raised.value)
    assert secret.read_bytes() == b"precious"


def test_a_temporary_manifest_is_never_written_through_a_planted_link(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "ckpt.index.tmp-0123456789abcdef").symlink_to(tmp_path / "created")
    with pytest.raises(StorageError, match=r"committing .*ckpt\.index"):
        get_runtime().run(_backend(folder).commit("ckpt.index", "ckpt.index.tmp-0123456789abcdef", b"{}"))
    assert not (tmp_path / "created").exists()
    assert not (folder / "ckpt.index").exists()


# ---------------------------------------------------------------------------------------------
# 6. Errors name their file and key


def test_a_data_file_that_is_a_directory_is_corrupt_naming_key_and_file(tmp_path, capsys):
    checkpoint, _ = _checkpoint([1.0, 2.0])
    prefix = checkpoint.write(str(tmp_path / "ckpt"))
    data_file = _only_data_file(prefix)
    data_file.unlink()
    data_file.mkdir()
    for action in (lambda: _checkpoint([0.0, 0.0])[0].read(prefix), lambda: ckio.open_reader(prefix).verify()):
        with pytest.raises(CorruptCheckpointError, match="is a directory, not a regular file") as raised:
            action()
        assert repr(V) in str(raised.value) and str(data_file) in str(raised.value)
    assert cli.main(["verify", prefix]) == 1
    assert "corrupt checkpoint" in capsys.readouterr().err


def test_a_data_directory_that_is_a_file_is_corrupt_naming_key_and_file(tmp_path):
    checkpoint, _ = _checkpoint([1.0, 2.0])
    prefix = checkpoint.write(str(tmp_path / "ckpt"))
    data_file = _only_data_file(prefix)
    shutil.rmtree(data_file.parent)
    data_file.parent.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="a directory on its path is a file") as raised:
        ckio.open_reader(prefix).read(V)
    assert repr(V) in str(raised.value) and str(data_file) in str(raised.value)


@pytest.fixture
def small_filesystem():
    """A 1 MiB tmpfs, mounted for the test and always unmounted; skipped where mounting is refused."""
    with mounted_tmpfs("1m") as directory:
        yield directory


def _fill(filesystem: Path, leave: int) -> Path:
    """A file taking all free space of ``filesystem`` but about ``leave`` bytes."""
    stats = os.statvfs(filesystem)
    filler = filesystem / "filler"
    with open(filler, "wb") as handle:
        remaining = max(0, stats.f_bavail * stats.f_frsize - leave)
        try:
            while remaining > 0:
                remaining -= handle.write(b"\xa5" * min(1 << 16, remaining))
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def test_a_full_disk_names_the_file_it_could_not_write(small_filesystem):
    """At every fill level a failing save raises a ``StorageError`` naming the file, errno kept."""
    folder = small_filesystem / "run"
    checkpoint, variable = _checkpoint(np.zeros(2048))  # an 8 KiB data file
    manager = ac.CheckpointManager(checkpoint, folder, max_to_keep=1)
    manager.save()
    seen = set()
    for leave in range(0, 40 * 1024, 2048):
        filler = _fill(small_filesystem, leave)
        variable.assign(np.full(2048, leave, np.float32))
        try:
            manager.save()
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
            assert isinstance(error, StorageError), f"a bare {type(error).__name__}: {error}"
            assert str(folder) in str(error), f"names no file: {error}"
            cause = error.__cause__
            assert cause is None or cause.errno == errno.ENOSPC
            text = str(error)
            seen.add("data file" if ".data-" in text else "manifest" if ".index" in text else "state file")
        filler.unlink()
    manager.save()
    assert {"manifest", "state file"} <= seen, f"ENOSPC was not hit at every stage: {sorted(seen)}"
