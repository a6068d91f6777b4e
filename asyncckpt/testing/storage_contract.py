"""The backend contract: what every :class:`~asyncckpt.io.storage.Storage` and its backends must do.

These are the promises the write and read pipelines rely on, stated once and run against every
storage, so that storages cannot drift apart where they must agree. Subclass :class:`BackendContract` in a test module and override two
fixtures::

    class TestMyStorage(BackendContract):
        @pytest.fixture
        def storage_factory(self, tmp_path):
            return lambda: MyStorage(root=tmp_path)

        @pytest.fixture
        def root(self):
            return "bucket"

Where storages legitimately differ, a test states the capability flag it needs with
:func:`requires` (the flags are :data:`~asyncckpt.io.storage.base.CAPABILITIES`) and is skipped for
storages that do not claim it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import posixpath
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import PurePosixPath

import numpy as np
import pytest

from asyncckpt._runtime import get_runtime
from asyncckpt.io.storage import Storage, StorageError, TruncatedError
from asyncckpt.io.storage.base import CAPABILITIES
from asyncckpt.testing.storage import BatchedValue

__all__ = ["BackendContract", "requires"]

_LOCK = "ckpt.data-0123456789abcdef.lock"
_DATA_DIR = "ckpt.data-0123456789abcdef"


def requires(**capabilities: bool):
    """Run the decorated contract test only for storages whose flags have these values."""
    unknown = set(capabilities) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"unknown storage capabilities {sorted(unknown)}; known: {CAPABILITIES}")

    def mark(test):
        test.required_capabilities = capabilities
        return test

    return mark


def _in_child_process(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether ``check()`` is true in a forked child (which never returns into the caller's code)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # forking a process that runs threads
        child = os.fork()
    if child == 0:
        code = 2
        try:
            code = 0 if check() else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            raise TimeoutError(f"the child process did not finish within {timeout} s")
        time.sleep(0.005)


class BackendContract:
    """Tests every storage must pass; see the module docstring for how to run them."""

    # -- fixtures a subclass overrides ----------------------------------------------------------

    @pytest.fixture
    def storage_factory(self) -> Callable[[], Storage]:
        """Makes a storage over one location private to the test; each call makes a new object.

        Two storages from one factory share what is stored only where the storage is durable.
        """
        raise NotImplementedError("override the storage_factory fixture")

    @pytest.fixture
    def root(self) -> str:
        """A ``/``-separated checkpoint path prefix the test may write below (absolute for files)."""
        raise NotImplementedError("override the root fixture")

    # -- fixtures the tests use -----------------------------------------------------------------

    @pytest.fixture
    def run(self):
        """Runs a coroutine to its end on the process's runtime, as the pipeline does."""
        return get_runtime().run

    @pytest.fixture
    def storage(self, storage_factory, request) -> Storage:
        """The storage under test; the test is skipped if it lacks a capability the test requires."""
        storage = storage_factory()
        wanted = getattr(request.function, "required_capabilities", {})
        lacking = {name: value for name, value in wanted.items() if getattr(storage, name) != value}
        if lacking:
            pytest.skip(f"{type(storage).__name__} does not have {lacking}")
        return storage

    @pytest.fixture
    def folder(self, storage, root) -> str:
        """The folder of the checkpoint ``<root>/run/ckpt``."""
        return storage.split(f"{root}/run/ckpt")[0]

    @pytest.fixture
    def backend(self, storage, folder, run):
        """A backend of that folder, prepared (and so empty)."""
        backend = run(storage.open(folder))
        run(backend.prepare())
        return backend

    # -- paths ----------------------------------------------------------------------------------

    def test_split_gives_the_folder_and_stem_that_canonical_joins(self, storage, root):
        path = f"{root}/run/ckpt"
        folder, stem = storage.split(path)
        assert stem == "ckpt"
        assert posixpath.join(folder, stem) == storage.canonical(path)
        assert storage.split(f"{root}/run/x/../ckpt") == (folder, stem)
        assert storage.split(PurePosixPath(path)) == (folder, stem)

    def test_split_refuses_paths_that_name_no_checkpoint(self, storage, root):
        for bad in ["", f"{root}/run/", f"{root}/run/a\0b"]:
            with pytest.raises(ValueError):
                storage.split(bad)

    def test_canonical_spells_one_path_one_way(self, storage, root):
        canonical = storage.canonical(f"{root}/run/ckpt")
        assert storage.canonical(f"{root}/run/./x/../ckpt") == canonical
        assert storage.canonical(canonical) == canonical
        assert storage.canonical(f"{root}/run/other") != canonical

    def test_describe_names_the_folder_and_the_name(self, backend):
        assert backend.describe("ckpt.index").endswith("run/ckpt.index")
        assert backend.describe("d/file").endswith("run/d/file")

    # -- folders --------------------------------------------------------------------------------

    def test_prepare_is_idempotent_and_leaves_an_empty_folder(self, backend, run):
        run(backend.prepare())
        assert run(backend.list_names()) == set()

    def test_a_folder_never_prepared_holds_nothing(self, storage, root, run):
        backend = run(storage.open(storage.split(f"{root}/nowhere/ckpt")[0]))
        assert run(backend.list_names()) == set()
        assert run(backend.read("ckpt.index")) is None
        assert run(backend.read("d/file", 0, 1)) is None
        assert run(backend.read_into("d/file", 0, [bytearray(1)])) is False
        assert run(backend.holds("d/file", 1)) is None
        run(backend.delete("ckpt.index"))
        run(backend.delete_tree("d"))

    def test_a_write_creates_the_folders_it_needs(self, storage, root, run):
        backend = run(storage.open(storage.split(f"{root}/new/deeper/ckpt")[0]))
        run(backend.write("d/file", b"data"))
        assert run(backend.read("d/file")) == b"data"

    def test_backends_of_one_folder_share_what_is_stored(self, storage, folder, backend, run):
        other = run(storage.open(folder))
        run(backend.write("ckpt.data-x", b"shared"))
        assert run(other.read("ckpt.data-x")) == b"shared"
        assert run(other.list_names()) == {"ckpt.data-x"}

    def test_folders_keep_their_names_apart(self, storage, root, backend, run):
        neighbour = run(storage.open(storage.split(f"{root}/run-2/ckpt")[0]))
        run(neighbour.prepare())
        run(backend.write("ckpt.index", b"mine"))
        assert run(neighbour.read("ckpt.index")) is None
        assert run(neighbour.list_names()) == set()
        assert neighbour.describe("ckpt.index") != backend.describe("ckpt.index")

    @requires(keeps_empty_folders=True)
    def test_a_new_data_dir_is_listed_while_empty(self, backend, run):
        run(backend.create_data_dir(_DATA_DIR))
        assert run(backend.list_names()) == {_DATA_DIR}
        run(backend.delete_tree(_DATA_DIR))
        assert run(backend.list_names()) == set()

    # -- writing and reading --------------------------------------------------------------------

    def test_write_then_read_whole_and_ranges(self, backend, run):
        run(backend.create_data_dir("d"))
        run(backend.write("d/file", bytearray(b"0123456789")))
        assert run(backend.read("d/file")) == b"0123456789"
        assert run(backend.read("d/file", 2, 5)) == b"234"
        assert run(backend.read("d/file", 7)) == b"789"
        assert run(backend.read("d/file", 10, 10)) == b""
        assert run(backend.read("d/nothing")) is None

    def test_every_kind_of_buffer_can_be_written(self, backend, run):
        run(backend.create_data_dir("d"))
        view = memoryview(b"--0123--")[2:6]
        for name, value in [("bytes", b"0123"), ("bytearray", bytearray(b"0123")), ("memoryview", view)]:
            run(backend.write(f"d/{name}", value))
            assert run(backend.read(f"d/{name}")) == b"0123", name

    def test_a_write_replaces_the_old_value_also_with_a_shorter_one(self, backend, run):
        run(backend.create_data_dir("d"))
        run(backend.write("d/file", b"a much longer old value"))
        run(backend.write("d/file", b"new"))
        assert run(backend.read("d/file")) == b"new"

    def test_an_empty_value_exists(self, backend, run):
        run(backend.create_data_dir("d"))
        run(backend.write("d/empty", b""))
        assert run(backend.read("d/empty")) == b""
        assert run(backend.holds("d/empty", 0)) is True
        assert run(backend.holds("d/empty", 1)) is False
        assert run(backend.read_into("d/empty", 0, [])) is True

    def test_a_range_past_the_end_is_a_truncated_error_naming_the_path(self, backend, run):
        run(backend.create_data_dir("d"))
        run(backend.write("d/file", b"0123456789"))
        for start, stop in [(5, 11), (10, 11), (11, 12)]:
            with pytest.raises(TruncatedError) as info:
                run(backend.read("d/file", start, stop))
            assert isinstance(info.value, StorageError) and isinstance(info.value, OSError)
            assert backend.describe("d/file") in str(info.value)
        with pytest.raises(TruncatedError) as info:
            run(backend.read_into("d/file", 8, [bytearray(3)]))
        assert backend.describe("d/file") in str(info.value)

    def test_a_streamed_value_is_written_batch_by_batch(self, backend, run):
        run(backend.create_data_dir("d"))
        value = BatchedValue((b"01", b"234"), (b"", b"56789"))
        run(backend.write("d/file", value))
        assert value.served == 2
        assert run(backend.read("d/file")) == b"0123456789"

    def test_a_streamed_value_that_disagrees_with_its_size_fails_the_write(self, backend, run):
        run(backend.create_data_dir("d"))
        for size in (9, 11):
            with pytest.raises(ValueError):
                run(backend.write("d/file", BatchedValue((b"01234",), (b"56789",), size=size)))

    def test_read_into_scatters_a_range_over_several_buffers(self, backend, run):
        run(backend.create_data_dir("d"))
        run(backend.write("d/file", b"0123456789"))
        first, gap, second = bytearray(3), bytearray(2), np.zeros(4, np.uint8)
        assert run(backend.read_into("d/file", 1, [first, gap, memoryview(second)])) is True
        assert (bytes(first), bytes(gap), second.tobytes()) == (b"123", b"45", b"6789")
        assert run(backend.read_into("d/nothing", 0, [bytearray(1)])) is False

    def test_holds_tells_missing_short_and_long_enough_apart(self, backend, run):
        run(backend.create_data_dir("d"))
        run(backend.write("d/file", b"0123456789"))
        assert run(backend.holds("d/file", 10)) is True
        assert run(backend.holds("d/file", 11)) is False
        assert run(backend.holds("d/nothing", 1)) is None
        assert run(backend.holds("d/nothing", 0)) is None

    @requires(durable=True)
    def test_what_is_stored_outlives_the_storage_object(self, storage_factory, folder, backend, run):
        run(backend.write("d/file", b"data"))
        run(backend.commit("ckpt.index", "ckpt.index.tmp-0123456789abcdef", b"index"))
        afresh = run(storage_factory().open(folder))
        assert run(afresh.read("d/file")) == b"data"
        assert run(afresh.read("ckpt.index")) == b"index"

    @requires(hierarchical=True)
    def test_writing_below_a_value_is_a_storage_error_naming_the_path(self, storage, folder, backend, run):
        run(backend.write("blocker", b"a value, not a folder"))
        below = run(storage.open(posixpath.join(folder, "blocker")))
        with pytest.raises(StorageError) as info:
            run(below.write("x", b"1"))
        assert info.value.errno == errno.ENOTDIR
        assert below.describe("x") in str(info.value)

    # -- commit, listing, deleting, renaming ----------------------------------------------------

    def test_commit_replaces_atomically_and_leaves_no_temporary(self, backend, run):
        run(backend.commit("ckpt.index", "ckpt.index.tmp-0123456789abcdef", b"one"))
        run(backend.commit("ckpt.index", "ckpt.index.tmp-fedcba9876543210", b"two"))
        assert run(backend.read("ckpt.index")) == b"two"
        assert run(backend.list_names()) == {"ckpt.index"}

    def test_list_and_delete(self, backend, run):
        run(backend.create_data_dir("ckpt.data-x"))
        run(backend.write("ckpt.data-x/a", b"1"))
        run(backend.write("ckpt.data-x/b", b"2"))
        run(backend.write("ckpt.data-xy/c", b"3"))  # shares a prefix, must survive delete_tree
        run(backend.commit("ckpt.index", "tmp", b"i"))
        assert run(backend.list_names()) == {"ckpt.data-x", "ckpt.data-xy", "ckpt.index"}
        run(backend.delete_tree("ckpt.data-x"))
        run(backend.delete_tree("ckpt.data-x"))  # already gone: fine
        run(backend.delete("ckpt.index"))
        run(backend.delete("ckpt.index"))
        assert run(backend.list_names()) == {"ckpt.data-xy"}
        assert run(backend.read("ckpt.data-xy/c")) == b"3"
        assert run(backend.read("ckpt.data-x/a")) is None

    def test_rename_moves_a_value_and_reports_a_missing_one(self, backend, run):
        run(backend.write("ckpt.index-section", b"section"))
        assert run(backend.rename("ckpt.index-section", "ckpt.index-claim")) is True
        assert run(backend.read("ckpt.index-section")) is None
        assert run(backend.read("ckpt.index-claim")) == b"section"
        assert run(backend.list_names()) == {"ckpt.index-claim"}
        assert run(backend.rename("ckpt.index-section", "ckpt.index-other")) is False
        assert run(backend.read("ckpt.index-other")) is None

    def test_of_concurrent_renames_of_one_name_one_succeeds(self, backend, run):
        run(backend.write("ckpt.index-section", b"section"))

        async def race():
            return await asyncio.gather(*(backend.rename("ckpt.index-section", f"claim-{n}") for n in range(8)))

        won = run(race())
        assert sum(won) == 1
        winner = f"claim-{won.index(True)}"
        assert run(backend.list_names()) == {winner}
        assert run(backend.read(winner)) == b"section"

    # -- locks ----------------------------------------------------------------------------------

    def test_a_new_lock_is_listed_excludes_others_and_vanishes_on_release(self, backend, run):
        lock = run(backend.lock_new(_LOCK))
        assert lock is not None
        assert _LOCK in run(backend.list_names())
        assert run(backend.try_lock(_LOCK)) is None  # held
        run(lock.release())
        run(lock.release())  # idempotent
        assert _LOCK not in run(backend.list_names())
        assert run(backend.try_lock(_LOCK)) is None  # missing marker: nothing to take

    def test_a_held_lock_excludes_every_backend_of_the_folder(self, storage, folder, backend, run):
        lock = run(backend.lock_new(_LOCK))
        other = run(storage.open(folder))
        assert run(other.try_lock(_LOCK)) is None
        assert run(other.lock_new(_LOCK)) is None
        run(lock.release())
        again = run(other.lock_new(_LOCK))
        assert again is not None
        assert run(backend.try_lock(_LOCK)) is None
        run(again.release())

    def test_try_lock_takes_a_marker_nobody_holds(self, backend, run):
        run(backend.write(_LOCK, b""))  # left by a writer that crashed
        lock = run(backend.try_lock(_LOCK))
        assert lock is not None
        assert run(backend.try_lock(_LOCK)) is None
        run(lock.release())
        assert run(backend.list_names()) == set()

    @requires(locks_across_processes=True)
    def test_a_held_lock_excludes_other_processes(self, storage_factory, folder, backend, run):
        lock = run(backend.lock_new(_LOCK))

        async def taken_elsewhere() -> bool:
            other = await storage_factory().open(folder)
            return await other.try_lock(_LOCK) is None and await other.lock_new(_LOCK) is None

        try:
            assert _in_child_process(lambda: asyncio.run(taken_elsewhere()))
        finally:
            run(lock.release())

    def test_a_backend_cleans_debris_only_where_its_locks_exclude_every_writer(self, storage, backend):
        # Writers in other processes can reach a durable folder; only locks across processes stop them.
        assert isinstance(backend.cleans_debris, bool)
        assert not backend.cleans_debris or storage.locks_across_processes or not storage.durable

    def test_check_data_dir_accepts_a_data_dir_in_the_folder(self, backend, run):
        run(backend.create_data_dir(_DATA_DIR))
        run(backend.write(f"{_DATA_DIR}/file", b"1"))
        run(backend.check_data_dir(_DATA_DIR))
