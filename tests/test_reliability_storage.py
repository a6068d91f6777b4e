"""Storage faults: ENOSPC and EIO at every kind of storage operation, injected and for real.

Injected faults go through the storage seam (``WriteSettings(storage=...)``): while a fault is armed,
every call of one backend operation raises ``OSError`` with that errno (before doing anything, or
after doing part of the work: a data file half written, a manifest renamed but its folder fsync
failing). For each, a save through a ``CheckpointManager`` must fail loudly -- from the blocking
save itself, or from ``sync()`` for an asynchronous one -- with the errno intact; the earlier
checkpoints stay complete; nothing half-written becomes visible (no new ``P.index`` unless it is
complete, ``latest_checkpoint`` unchanged, no debris); and once the fault is gone the next save
succeeds. The real test fills a 2 MiB tmpfs to every level around what one save needs.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from _fakes import mounted_tmpfs

import asyncckpt as ac
from asyncckpt import io as ckio
from asyncckpt.naming import index_path, parse_data_dir_name, parse_index_tmp_name, parse_lock_name
from asyncckpt.io.storage import BackendWrapper, FileStorage
from asyncckpt.testing.storage import WrappingStorage

SETTINGS = dict(chunk_bytes=64 << 10, pack_bytes=16 << 10, small_array_bytes=4 << 10, staging_budget_bytes=256 << 10)


class FaultyStorage(WrappingStorage):
    """While ``armed`` is ``(operation, errno, when)``, that backend operation fails with ``errno``.

    ``when`` is ``"before"`` (nothing done), or ``"after"`` (the operation completed, then failed --
    e.g. a commit whose folder fsync fails after the rename), or ``"partial"`` (writes only: half
    the bytes are stored under the key, then the error).
    """

    OPERATIONS = ("prepare", "lock_new", "create_data_dir", "list_names", "write", "read", "commit", "delete",
                  "delete_tree")

    def __init__(self) -> None:
        super().__init__(FileStorage(), self._wrap)
        self.armed: tuple[str, int, str] | None = None
        self.hits = 0

    def _fault(self, operation: str, when: str) -> OSError | None:
        if self.armed is None or self.armed[0] != operation or self.armed[2] != when:
            return None
        self.hits += 1
        code = self.armed[1]
        return OSError(code, f"{os.strerror(code)} (injected into {operation})")

    def _wrap(self, backend):
        storage = self

        def faulty(operation):
            async def call(self, *args):
                if (error := storage._fault(operation, "before")) is not None:
                    raise error
                if operation == "write" and (error := storage._fault(operation, "partial")) is not None:
                    key, value = args
                    await self.inner.write(key, bytes(value[: len(value) // 2]))
                    raise error
                result = await getattr(self.inner, operation)(*args)
                if (error := storage._fault(operation, "after")) is not None:
                    raise error
                return result

            return call

        methods = {name: faulty(name) for name in self.OPERATIONS}
        return type("Faulty", (BackendWrapper,), methods)(backend)


def model_values(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((128, 130)).astype(np.float32), "b": rng.standard_normal(40), "step": np.int64(step)}


class Model:
    """Variables, a Checkpoint and a CheckpointManager saving through ``storage``."""

    def __init__(self, directory: Path, storage, max_to_keep: int = 2) -> None:
        self.variables = {key: ac.Variable(np.zeros_like(value)) for key, value in model_values(0).items()}
        self.checkpoint = ac.Checkpoint(**self.variables)
        self.manager = ac.CheckpointManager(self.checkpoint, directory, max_to_keep=max_to_keep)
        self.settings = ac.WriteSettings(storage=storage, **SETTINGS)
        self.saved: dict[str, int] = {}

    def save(self, step: int, asynchronous: bool) -> str:
        for key, value in model_values(step).items():
            self.variables[key].assign(value)
        options = ac.CheckpointOptions(enable_async=asynchronous, write_settings=self.settings)
        path = self.manager.save(options=options)
        self.saved[path] = step
        if asynchronous:
            self.manager.sync()
        return path


def assert_restores(path: str, step: int) -> None:
    variables = {key: ac.Variable(np.zeros_like(value)) for key, value in model_values(0).items()}
    ac.Checkpoint(**variables).restore(path).assert_existing_objects_matched()
    for key, value in model_values(step).items():
        assert variables[key].numpy().tobytes() == np.asarray(value).tobytes(), f"{path}: {key}"


def assert_no_debris(folder: Path, *, unreferenced_data_dirs_allowed: bool = False) -> None:
    """No lock marker, temporary file or (unless allowed) unreferenced data directory in ``folder``.

    An unreferenced data directory is invisible to readers; a write whose cleanup could not even
    read the folder leaves it for the next write to remove.
    """
    names = os.listdir(folder)
    referenced = {ckio.open_reader(folder / name[: -len(".index")]).data_dir for name in names if name.endswith(".index")}
    for name in names:
        assert parse_lock_name(name) is None and parse_index_tmp_name(name) is None, f"debris: {name}"
        assert not name.endswith(".tmp"), f"temporary file left: {name}"
        if not unreferenced_data_dirs_allowed:
            assert parse_data_dir_name(name) is None or name in referenced, f"unreferenced data directory: {name}"


def assert_listed_checkpoints_intact(model: Model, folder: Path) -> None:
    state = ac.get_checkpoint_state(folder)
    for path in state.all_model_checkpoint_paths:
        ckio.open_reader(path).verify()
        assert_restores(path, model.saved[path])


# The operations a save cannot do without: a fault there fails the save.
FATAL = [
    ("prepare", "before"), ("lock_new", "before"), ("create_data_dir", "before"), ("create_data_dir", "after"),
    ("write", "before"), ("write", "partial"), ("write", "after"), ("read", "before"),
    ("commit", "before"), ("commit", "after"),
]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("asynchronous", [False, True], ids=["blocking", "async"])
@pytest.mark.parametrize(("operation", "when"), FATAL, ids=[f"{op}-{when}" for op, when in FATAL])
def test_a_failing_operation_fails_the_save_and_loses_nothing(tmp_path, operation, when, asynchronous, code):
    storage = FaultyStorage()
    model = Model(tmp_path, storage)
    model.save(1, asynchronous=False)
    before = model.save(2, asynchronous=True)
    storage.armed = (operation, code, when)
    with pytest.raises(OSError) as raised:
        model.save(3, asynchronous)
    storage.armed = None
    assert storage.hits >= 1
    assert raised.value.errno == code, raised.value
    failed = f"{tmp_path / 'ckpt'}-3"
    assert ac.latest_checkpoint(tmp_path) == before
    if (operation, when) == ("commit", "after"):
        # The rename happened: the new checkpoint is complete, but it was never recorded.
        ckio.open_reader(failed).verify()
        assert_restores(failed, 3)
    else:
        assert not os.path.exists(index_path(failed)), "a failed save left a commit marker"
    assert_listed_checkpoints_intact(model, tmp_path)
    assert_no_debris(tmp_path, unreferenced_data_dirs_allowed=True)
    after = model.save(4, asynchronous)  # the fault is gone: saving works again
    assert ac.latest_checkpoint(tmp_path) == after
    assert_restores(after, 4)
    assert_listed_checkpoints_intact(model, tmp_path)
    assert_no_debris(tmp_path)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("operation", ["list_names", "delete", "delete_tree"])
def test_a_failing_debris_cleanup_does_not_fail_the_save(tmp_path, operation, code):
    """Cleanup is best effort: a write must not fail because old debris could not be removed."""
    storage = FaultyStorage()
    model = Model(tmp_path, storage, max_to_keep=None)
    model.save(1, asynchronous=False)
    debris = tmp_path / "ckpt-9.data-00000000000000aa"
    debris.mkdir()
    (debris / "pack-00000").write_bytes(b"partial")
    (tmp_path / "ckpt-9.index.tmp-00000000000000aa").write_bytes(b"{")
    storage.armed = (operation, code, "before")
    path = model.save(2, asynchronous=True)
    storage.armed = None
    assert storage.hits >= 1
    assert ac.latest_checkpoint(tmp_path) == path
    assert_restores(path, 2)
    model.save(3, asynchronous=False)  # the next write removes the debris
    assert not debris.exists()
    assert_no_debris(tmp_path)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("asynchronous", [False, True], ids=["blocking", "async"])
@pytest.mark.parametrize("operation", [
    "delete",
    "delete_tree",
])
def test_a_failing_deletion_of_an_old_checkpoint_is_reported_and_keeps_the_new_one(
    tmp_path, operation, asynchronous, code
):
    storage = FaultyStorage()
    model = Model(tmp_path, storage, max_to_keep=1)
    model.save(1, asynchronous=False)
    storage.armed = (operation, code, "before")
    with pytest.raises(OSError) as raised:
        model.save(2, asynchronous)  # committed, then its bookkeeping could not delete ckpt-1
    storage.armed = None
    assert raised.value.errno == code
    newest = f"{tmp_path / 'ckpt'}-2"
    assert ac.latest_checkpoint(tmp_path) == newest
    assert_restores(newest, 2)
    for path in ac.get_checkpoint_state(tmp_path).all_model_checkpoint_paths:
        assert ckio.checkpoint_exists(path), f"the state file lists {path}, which does not exist"
        ckio.open_reader(path).verify()  # whatever the file lists is still there and complete
    model.save(3, asynchronous)
    assert_restores(ac.latest_checkpoint(tmp_path), 3)
    assert_no_debris(tmp_path)


# ---------------------------------------------------------------------------------------------
# A real full disk


@pytest.fixture
def small_filesystem():
    """A 2 MiB tmpfs, mounted for the test and always unmounted; skipped where mounting is refused."""
    with mounted_tmpfs("2m") as directory:
        yield directory


def _fill(filesystem: Path, leave: int) -> Path:
    """A file taking all free space of ``filesystem`` but about ``leave`` bytes."""
    stats = os.statvfs(filesystem)
    free = stats.f_bavail * stats.f_frsize
    filler = filesystem / "filler"
    with open(filler, "wb") as handle:
        remaining = max(0, free - leave)
        block = b"\xa5" * (1 << 16)
        try:
            while remaining > 0:
                remaining -= handle.write(block[: min(len(block), remaining)])
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def test_a_full_filesystem_fails_saves_cleanly_at_every_fill_level(small_filesystem):
    folder = small_filesystem / "run"
    storage = FileStorage()
    model = Model(folder, storage, max_to_keep=1)
    model.save(1, asynchronous=False)
    need = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) + 32 * 1024
    outcomes = {"data file": 0, "manifest": 0, "state file": 0, "succeeded": 0}
    step = 1
    for leave in range(0, need + 32 * 1024, 2 * 1024):
        filler = _fill(small_filesystem, leave)
        previous = ac.latest_checkpoint(folder)
        step += 1
        asynchronous = step % 2 == 0
        attempted = f"{folder / 'ckpt'}-{step}"
        try:
            model.save(step, asynchronous)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
            # Where the disk filled up, as seen from outside: a data file names itself; a failed
            # manifest leaves no P.index; a failed state-file update leaves a complete, unrecorded one.
            if ".data-" in str(error):
                outcomes["data file"] += 1
            elif os.path.exists(index_path(attempted)):
                outcomes["state file"] += 1
                ckio.open_reader(attempted).verify()
            else:
                outcomes["manifest"] += 1
            assert ac.latest_checkpoint(folder) == previous
        else:
            outcomes["succeeded"] += 1
            assert ac.latest_checkpoint(folder) == attempted
        latest = ac.latest_checkpoint(folder)
        assert_restores(latest, model.saved[latest])
        assert_listed_checkpoints_intact(model, folder)
        assert_no_debris(folder, unreferenced_data_dirs_allowed=True)
        filler.unlink()
        step += 1
        path = model.save(step, asynchronous)  # room again: the next save works
        assert ac.latest_checkpoint(folder) == path
        assert_restores(path, step)
        assert_no_debris(folder)
    assert all(outcomes.values()), f"ENOSPC was not hit at every stage: {outcomes}"
