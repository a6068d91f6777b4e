"""``CheckpointManager`` (``asyncckpt.checkpoint_management``): bookkeeping after durable data,
asynchronous saves, several managers and processes on one directory.

The state-file codec and its file operations are tested in ``test_state_file.py``.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import checkpoint_management as cm
from asyncckpt import io as ckio
from asyncckpt import state_file
from asyncckpt._runtime import Runtime, get_runtime
from asyncckpt.checkpoint_management import CheckpointState
from asyncckpt.naming import index_name, index_path
from asyncckpt.io.storage import BackendWrapper, KvStoreStorage, default_storage

from _fakes import FailingStorage, GatedStorage, WrappingStorage

V_KEY = "v/.ATTRIBUTES/VARIABLE_VALUE"


def committed_on_disk(prefix: str) -> bool:
    """Whether ``P.index`` exists, looked up without waiting for pending writes."""
    return os.path.exists(index_path(prefix))


def state_on_disk(directory) -> CheckpointState | None:
    """The state file as it is on disk right now, without waiting for pending writes."""
    path = os.path.join(str(directory), "checkpoint")
    if not os.path.exists(path):
        return None
    return cm.parse_checkpoint_state(pathlib.Path(path).read_text(encoding="utf-8"))


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_to_keep": 1.5}, ValueError, "got 1.5."),
        ({"max_to_keep": True}, ValueError, "got True."),
        ({"max_to_keep": 2, "keep_checkpoint_every_n_hours": -1}, ValueError, "keep_checkpoint_every_n_hours"),
        ({"max_to_keep": 2, "step_counter": 0, "checkpoint_interval": -1}, ValueError, "checkpoint_interval"),
        ({"max_to_keep": 2, "checkpoint_name": ""}, ValueError, "checkpoint_name"),
        ({"max_to_keep": 2, "init_fn": 3}, TypeError, "init_fn"),
    ],
)
def test_manager_rejects_bad_arguments(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        cm.CheckpointManager(ac.Checkpoint(), tmp_path, **kwargs)


def test_manager_rejects_a_non_checkpoint_and_leaves_the_counter_uncreated(tmp_path):
    with pytest.raises(TypeError, match="must be an asyncckpt.Checkpoint"):
        cm.CheckpointManager(ac.Variable(np.zeros(2)), tmp_path, max_to_keep=1)
    checkpoint = ac.Checkpoint(v=ac.Variable(np.zeros(2)))
    cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=1)
    keys = [key for key, _ in ac.list_variables(checkpoint.write(str(tmp_path / "w")))]
    assert V_KEY in keys and "save_counter/.ATTRIBUTES/VARIABLE_VALUE" not in keys


def test_manager_accepts_numpy_integers_and_rejects_non_integer_numbers(tmp_path):
    manager = cm.CheckpointManager(ac.Checkpoint(), tmp_path, max_to_keep=np.int64(2))
    assert manager.save(checkpoint_number=np.int32(4)).endswith("ckpt-4")
    with pytest.raises(TypeError, match="checkpoint_number"):
        manager.save(checkpoint_number=4.0)
    with pytest.raises(TypeError, match="checkpoint_number"):
        manager.save(checkpoint_number=ac.Variable(np.float32(4)))


def test_injected_clock_drives_timestamps_and_preservation(tmp_path):
    clock = Clock(1000.0)
    manager = cm.CheckpointManager(
        ac.Checkpoint(), tmp_path, max_to_keep=1, keep_checkpoint_every_n_hours=1.0, clock=clock
    )
    clock.now = 1000.0 + 3600.0
    first = manager.save()
    clock.now += 60.0
    second = manager.save()
    state = cm.get_checkpoint_state(tmp_path)
    assert state.all_model_checkpoint_timestamps == [4660.0]
    assert state.last_preserved_timestamp == 4600.0  # first was preserved, not deleted
    assert ac.checkpoint_exists(first) and manager.checkpoints == [second]


def test_hostile_state_file_makes_a_fresh_manager(tmp_path, caplog):
    (tmp_path / "checkpoint").write_bytes(b"model_checkpoint_path: {}\n")
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        manager = cm.CheckpointManager(ac.Checkpoint(), tmp_path, max_to_keep=2)
    assert manager.latest_checkpoint is None and manager.checkpoints == []
    assert any("Checkpoint ignored" in r.getMessage() for r in caplog.records)
    path = manager.save()
    assert cm.latest_checkpoint(tmp_path) == path


def test_nan_preserved_timestamp_keeps_every_recorded_checkpoint(tmp_path, caplog):
    checkpoint = ac.Checkpoint()
    kept = [checkpoint.write(str(tmp_path / f"ckpt-{n}")) for n in (1, 2)]
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-1"\nall_model_checkpoint_paths: "ckpt-2"\n'
        "all_model_checkpoint_timestamps: 1.0\nall_model_checkpoint_timestamps: 2.0\nlast_preserved_timestamp: nan\n",
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        manager = cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=1, clock=Clock(100.0))
    assert any("nan" in r.getMessage() for r in caplog.records)
    assert manager.checkpoints == []
    newest = manager.save(checkpoint_number=3)
    assert all(ac.checkpoint_exists(p) for p in kept)
    assert cm.get_checkpoint_state(tmp_path) == CheckpointState(newest, [newest], [100.0], 100.0)


def test_user_callbacks_run_before_bookkeeping_and_deletion_follows_commit(tmp_path):
    manager = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.zeros(3))), tmp_path, max_to_keep=1)
    first = manager.save()
    seen = []

    def callback(path):
        # The new checkpoint is durable, the old one is not deleted yet, the state file is unchanged.
        seen.append((path, committed_on_disk(path), committed_on_disk(first), state_on_disk(tmp_path).model_checkpoint_path))

    options = ac.CheckpointOptions(experimental_write_callbacks=[callback])
    second = manager.save(options=options)
    assert seen == [(second, True, True, "ckpt-1")]
    assert options.experimental_write_callbacks == [callback]  # the caller's options are not mutated
    assert not ac.checkpoint_exists(first)
    final = state_on_disk(tmp_path)
    assert (final.model_checkpoint_path, final.all_model_checkpoint_paths) == ("ckpt-2", ["ckpt-2"])


def test_manager_properties_read_inside_a_write_callback_do_not_deadlock(tmp_path):
    checkpoint = ac.Checkpoint(v=ac.Variable(np.zeros(3)))
    manager = cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=2)
    first = manager.save()
    seen = []
    options = ac.CheckpointOptions(
        enable_async=True, experimental_write_callbacks=[lambda: seen.append(manager.latest_checkpoint)]
    )
    second = manager.save(options=options)
    manager.sync()
    assert seen == [first]  # the callback ran before the bookkeeping of its own save
    assert manager.latest_checkpoint == second


# ---------------------------------------------------------------- deleting expired checkpoints


PENDING = ".checkpoint.deleting"


def observing_storage(directory, seen: list):
    """The default storage, noting at every ``P.index`` deletion the state and pending-deletions files."""

    class Observing(BackendWrapper):
        async def delete(self, name):
            if name.endswith(".index"):
                pending = pathlib.Path(directory, PENDING)
                seen.append((
                    name,
                    state_on_disk(directory).all_model_checkpoint_paths,
                    cm.parse_checkpoint_state(pending.read_text()).all_model_checkpoint_paths if pending.exists() else None,
                    os.stat(os.path.join(directory, "checkpoint")).st_ino,
                ))
            await super().delete(name)

    return WrappingStorage(default_storage(), Observing)


def test_expired_checkpoints_leave_the_state_file_before_they_are_deleted(tmp_path):
    seen = []
    options = ac.CheckpointOptions(write_settings=ac.WriteSettings(storage=observing_storage(tmp_path, seen)))
    manager = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.zeros(2))), tmp_path, max_to_keep=2)
    first, second, third = (manager.save(options=options) for _ in range(3))
    # When ckpt-1 is deleted the state file no longer lists it, and the pending-deletions file does.
    assert [entry[:3] for entry in seen] == [("ckpt-1.index", ["ckpt-2", "ckpt-3"], ["ckpt-1"])]
    # The state file was written once: not replaced again after the deletion.
    assert os.stat(tmp_path / "checkpoint").st_ino == seen[0][3]
    assert not ac.checkpoint_exists(first) and manager.checkpoints == [second, third]
    assert not (tmp_path / PENDING).exists()


def test_a_pending_deletion_left_by_a_crash_is_finished_by_the_next_save(tmp_path, caplog):
    checkpoint = ac.Checkpoint(v=ac.Variable(np.zeros(2)))
    manager = cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=2)
    first, second = manager.save(), manager.save()
    # As a manager leaves it when killed after writing the state file, before deleting: ckpt-0
    # complete but unlisted. The file also names what must survive: a listed checkpoint, the
    # one about to be saved again, and one outside the directory.
    orphan = checkpoint.write(str(tmp_path / "ckpt-0"))
    outside = checkpoint.write(str(tmp_path.parent / f"{tmp_path.name}-outside" / "ckpt-7"))
    state_file._write_pending_deletions(str(tmp_path), None, [orphan, second, str(tmp_path / "ckpt-5"), outside])
    later = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.ones(2))), tmp_path, max_to_keep=2)
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        fifth = later.save(checkpoint_number=5)
    assert not ac.checkpoint_exists(orphan) and not ac.checkpoint_exists(first)  # first expired now
    assert ac.checkpoint_exists(second) and ac.checkpoint_exists(fifth) and ac.checkpoint_exists(outside)
    assert any(outside in r.getMessage() and "outside the directory" in r.getMessage() for r in caplog.records)
    assert state_on_disk(tmp_path).all_model_checkpoint_paths == ["ckpt-2", "ckpt-5"]
    assert sorted(os.listdir(tmp_path)).count(PENDING) == 0


def test_a_failed_deletion_is_reported_and_retried_by_the_next_save(tmp_path):
    failures = []

    class FailOnce(BackendWrapper):
        async def delete(self, name):
            if name == "ckpt-1.index" and not failures:
                failures.append(name)
                raise OSError(errno.EIO, "injected", name)
            await super().delete(name)

    options = ac.CheckpointOptions(write_settings=ac.WriteSettings(storage=WrappingStorage(default_storage(), FailOnce)))
    manager = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.zeros(2))), tmp_path, max_to_keep=1)
    first = manager.save(options=options)
    with pytest.raises(OSError) as raised:
        manager.save(options=options)
    assert raised.value.errno == errno.EIO
    second = f"{tmp_path / 'ckpt'}-2"
    assert ac.checkpoint_exists(first) and state_on_disk(tmp_path).all_model_checkpoint_paths == ["ckpt-2"]
    assert (tmp_path / PENDING).exists()
    third = manager.save(options=options)
    assert [ac.checkpoint_exists(p) for p in (first, second, third)] == [False, False, True]
    assert {name.split(".")[0] for name in os.listdir(tmp_path)} == {"", "checkpoint", "ckpt-3"}
    assert not (tmp_path / PENDING).exists()


def test_a_failed_state_file_write_changes_nothing_the_manager_manages(tmp_path, caplog):
    manager = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.zeros(2))), tmp_path, max_to_keep=1)
    first = manager.save()
    os.unlink(tmp_path / "checkpoint")
    (tmp_path / "checkpoint").mkdir()  # the state file cannot be replaced
    with caplog.at_level(logging.WARNING, logger="asyncckpt"), pytest.raises(OSError):
        manager.save()
    second = f"{tmp_path / 'ckpt'}-2"
    assert ac.checkpoint_exists(first)  # not deleted: no state file stopped listing it
    assert manager.checkpoints == [first, second]
    (tmp_path / "checkpoint").rmdir()
    third = manager.save()
    assert [ac.checkpoint_exists(p) for p in (first, second, third)] == [False, False, True]
    assert state_on_disk(tmp_path).all_model_checkpoint_paths == ["ckpt-3"]
    assert not (tmp_path / PENDING).exists()


# ---------------------------------------------------------------- paths read from the state file


def write_state_file(directory, *entries: str, timestamp: float = 1.0) -> None:
    lines = [f'model_checkpoint_path: "{entries[-1]}"']
    lines += [f'all_model_checkpoint_paths: "{entry}"' for entry in entries]
    lines += [f"all_model_checkpoint_timestamps: {timestamp}"] * len(entries) + ["last_preserved_timestamp: 0.5"]
    pathlib.Path(directory, "checkpoint").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_spellings_of_one_path_are_one_checkpoint(tmp_path):
    checkpoint = ac.Checkpoint(v=ac.Variable(np.zeros(2)))
    one, two = (checkpoint.write(str(tmp_path / f"ckpt-{n}")) for n in (1, 2))
    (tmp_path / "sub").mkdir()
    write_state_file(tmp_path, "./ckpt-1", "sub/../ckpt-2", "ckpt-1", str(tmp_path / "sub" / ".." / "ckpt-2"))
    manager = cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=2)
    assert manager.checkpoints == [one, two]  # the last spelling of each decides its place
    checkpoint.save_counter.assign(1)
    assert manager.save() == two  # ckpt-2 again: it moves to the end, nothing is deleted
    assert manager.checkpoints == [one, two] and ac.checkpoint_exists(one)
    assert state_on_disk(tmp_path).all_model_checkpoint_paths == ["ckpt-1", "ckpt-2"]


def test_a_relative_directory_agrees_with_latest_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manager = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.zeros(2))), "./run/", max_to_keep=2)
    saved = [manager.save() for _ in range(3)]
    assert saved == ["./run/ckpt-1", "./run/ckpt-2", "./run/ckpt-3"]
    assert manager.latest_checkpoint == cm.latest_checkpoint("./run/") == saved[-1]
    assert manager.checkpoints == saved[1:] and not ac.checkpoint_exists(saved[0])
    again = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.zeros(2))), "run", max_to_keep=2)
    assert again.checkpoints == ["run/ckpt-2", "run/ckpt-3"]


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("", "names the directory"),
        (".", "names the directory"),
        ("x" * 300, "too long"),
        ("x" * 230, "too long"),  # ckpt.index fits, but not the lock a write of it needs
        ("../elsewhere/ckpt-1", "outside the directory"),
        ("linked/ckpt-1", "symbolic link"),  # leads outside
        ("self/ckpt-1", "symbolic link"),  # another spelling of ckpt-1, which a save would then delete
    ],
    ids=["empty", "dot", "300", "230", "outside", "symlink-out", "symlink-in"],
)
def test_a_manager_manages_only_checkpoints_it_could_have_written(tmp_path, caplog, entry, reason):
    checkpoint = ac.Checkpoint(v=ac.Variable(np.zeros(2)))
    directory, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    directory.mkdir()
    victim = checkpoint.write(str(elsewhere / "ckpt-1"))
    os.symlink(elsewhere, directory / "linked")
    os.symlink(directory, directory / "self")
    (directory / "sub").mkdir()
    inside = checkpoint.write(str(directory / "sub" / "ckpt-1"))  # in a real subdirectory: managed
    write_state_file(directory, entry, "sub/ckpt-1", "ckpt-1")
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        manager = cm.CheckpointManager(checkpoint, directory, max_to_keep=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "Not managing" in r.getMessage()]
    assert len(warnings) == 1 and reason in warnings[0], warnings
    assert manager.checkpoints == [inside, str(directory / "ckpt-1")]
    # Numbered explicitly: the recorded latest (ckpt-1) is missing, and a run numbered from 0
    # after that would keep what it found (see the fallback tests below).
    manager.save(checkpoint_number=1)
    manager.save(checkpoint_number=2)
    assert ac.checkpoint_exists(victim) and not ac.checkpoint_exists(inside)
    assert cm.latest_checkpoint(directory) == manager.latest_checkpoint == str(directory / "ckpt-2")


# ---------------------------------------------------------------- asynchronous saves


@pytest.fixture
def gated():
    return GatedStorage(default_storage(), get_runtime())


def async_options(storage=None):
    settings = ac.WriteSettings(storage=storage) if storage is not None else None
    return ac.CheckpointOptions(enable_async=True, write_settings=settings)


def test_async_save_bookkeeping_waits_for_durable_data(tmp_path, gated):
    variable = ac.Variable(np.arange(4, dtype=np.float32))
    checkpoint = ac.Checkpoint(v=variable)
    manager = cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=1)
    first = manager.save()
    second = manager.save(options=async_options(gated))
    # save() returned: the counter moved, but nothing of the second checkpoint is durable yet.
    assert second.endswith("ckpt-2") and checkpoint.save_counter.numpy() == 2
    gated.reached.wait()
    assert ckio.has_pending_writes(second)
    assert not committed_on_disk(second) and committed_on_disk(first)
    assert state_on_disk(tmp_path).model_checkpoint_path == "ckpt-1"
    variable.assign(np.zeros(4, np.float32))  # after the snapshot: not in the checkpoint
    gated.open_gate()
    assert manager.latest_checkpoint == second  # waits for the save's bookkeeping
    assert manager.checkpoints == [second]
    assert not committed_on_disk(first)
    assert state_on_disk(tmp_path).all_model_checkpoint_paths == ["ckpt-2"]
    np.testing.assert_array_equal(ac.load_variable(second, V_KEY), np.arange(4, dtype=np.float32))


def test_restore_or_initialize_waits_for_a_pending_first_save(tmp_path, gated):
    variable = ac.Variable(np.float32(5.0))
    checkpoint = ac.Checkpoint(v=variable)
    init_calls = []
    manager = cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=2, init_fn=lambda: init_calls.append(1))
    path = manager.save(options=async_options(gated))
    gated.reached.wait()
    variable.assign(np.float32(-1.0))
    result = []
    worker = threading.Thread(target=lambda: result.append(manager.restore_or_initialize()))
    worker.start()
    worker.join(0.2)
    assert worker.is_alive() and result == []  # blocked on the pending save, not initialising
    gated.open_gate()
    worker.join()
    assert result == [path] and init_calls == []
    assert variable.numpy() == 5.0


def test_async_saves_number_from_the_one_save_counter(tmp_path):
    checkpoint = ac.Checkpoint(v=ac.Variable(np.zeros(2)))
    manager = cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=2)
    paths = [manager.save(options=async_options()) for _ in range(4)]
    assert [os.path.basename(p) for p in paths] == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4"]
    assert manager.checkpoints == paths[2:]
    assert cm.latest_checkpoint(tmp_path) == paths[-1] == manager.latest_checkpoint
    assert [ac.checkpoint_exists(p) for p in paths] == [False, False, True, True]
    assert checkpoint.save_counter.numpy() == 4


def test_failed_async_save_leaves_state_and_old_checkpoints(tmp_path):
    checkpoint = ac.Checkpoint(v=ac.Variable(np.zeros(2)))
    manager = cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=1)
    first = manager.save()
    failed = manager.save(options=async_options(FailingStorage(default_storage(), fail_on=1)))
    # Neither waiting property hangs on the failed save, nor reports it.
    assert manager.latest_checkpoint == first and manager.checkpoints == [first]
    with pytest.raises(OSError, match="No space left on device"):
        manager.sync()
    assert not ac.checkpoint_exists(failed) and ac.checkpoint_exists(first)
    assert cm.latest_checkpoint(tmp_path) == first
    third = manager.save()
    assert manager.checkpoints == [third] and not ac.checkpoint_exists(first)


def test_failed_sync_save_records_nothing(tmp_path):
    checkpoint = ac.Checkpoint(v=ac.Variable(np.zeros(2)))
    manager = cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=1)
    first = manager.save()
    options = ac.CheckpointOptions(write_settings=ac.WriteSettings(storage=FailingStorage(default_storage(), 1)))
    with pytest.raises(OSError):
        manager.save(options=options)
    assert manager.latest_checkpoint == first and manager.checkpoints == [first]
    assert cm.latest_checkpoint(tmp_path) == first


# ---------------------------------------------------------------- several managers, one directory


def test_two_managers_keep_each_others_entries(tmp_path):
    a = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.zeros(2))), tmp_path, max_to_keep=2, checkpoint_name="a")
    b = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.ones(2))), tmp_path, max_to_keep=2, checkpoint_name="b")
    saved = []
    for _ in range(4):
        saved.append(a.save())
        saved.append(b.save())
    kept = [p for p in saved if ac.checkpoint_exists(p)]
    assert [os.path.basename(p) for p in kept] == ["a-3", "b-3", "a-4", "b-4"]
    state = cm.get_checkpoint_state(tmp_path)
    assert state.all_model_checkpoint_paths == kept  # the union, oldest first, nothing deleted listed
    assert state.model_checkpoint_path == cm.latest_checkpoint(tmp_path) == saved[-1]
    assert a.checkpoints == kept[0::2] and b.checkpoints == kept[1::2]
    # A later manager adopts both sets and keeps the newest two of them.
    c = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.ones(2))), tmp_path, max_to_keep=2)
    assert c.checkpoints == kept
    newest = c.save()
    assert cm.get_checkpoint_state(tmp_path).all_model_checkpoint_paths == [kept[-1], newest]


def test_checkpoints_deleted_by_another_manager_are_forgotten(tmp_path):
    a = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.zeros(2))), tmp_path, max_to_keep=3, checkpoint_name="a")
    a1 = a.save()
    # b adopts a-1 (it is in the state file) and deletes it when it needs the room.
    b = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.ones(2))), tmp_path, max_to_keep=1, checkpoint_name="b")
    assert b.checkpoints == [a1]
    b1 = b.save()
    assert not ac.checkpoint_exists(a1)
    a2 = a.save()
    assert a.checkpoints == [a2]  # a-1 is gone and no longer listed anywhere
    assert cm.get_checkpoint_state(tmp_path).all_model_checkpoint_paths == [b1, a2]


_WORKER = """
import os, sys, time
import numpy as np
import asyncckpt as ac

directory, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
variable = ac.Variable(np.zeros(64, np.float32))
manager = ac.CheckpointManager(ac.Checkpoint(v=variable), directory, max_to_keep=2, checkpoint_name=name)
open(os.path.join(directory, "ready-" + name), "w").close()
while not os.path.exists(os.path.join(directory, "go")):
    time.sleep(0.002)
for step in range(count):
    variable.assign(np.full(64, step, np.float32))
    manager.save(options=ac.CheckpointOptions(enable_async=step % 2 == 1))
manager.sync()
print(",".join(manager.checkpoints))
"""


def test_two_processes_share_one_directory(tmp_path):
    directory, count, names = str(tmp_path), 12, ("w0", "w1")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, directory, name, str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    # Both managers are built on the empty directory before either saves, so neither adopts
    # (and may delete) the other's checkpoints.
    while not all(os.path.exists(os.path.join(directory, "ready-" + name)) for name in names):
        assert all(worker.poll() is None for worker in workers), [w.communicate() for w in workers]
        threading.Event().wait(0.005)
    open(os.path.join(directory, "go"), "w").close()
    outputs = [worker.communicate() for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs

    own = {name: out.strip().split(",") for name, (out, _) in zip(names, outputs)}
    for name in names:
        assert own[name] == [os.path.join(directory, f"{name}-{n}") for n in (count - 1, count)]
    existing = sorted(f[: -len(".index")] for f in os.listdir(directory) if f.endswith(".index"))
    assert existing == sorted(os.path.basename(p) for paths in own.values() for p in paths)
    state = cm.get_checkpoint_state(directory)
    # Every surviving checkpoint is listed, nothing deleted is, oldest first, latest last.
    assert sorted(os.path.basename(p) for p in state.all_model_checkpoint_paths) == existing
    assert state.all_model_checkpoint_timestamps == sorted(state.all_model_checkpoint_timestamps)
    assert state.model_checkpoint_path == state.all_model_checkpoint_paths[-1]
    assert cm.latest_checkpoint(directory) == state.model_checkpoint_path
    for path in state.all_model_checkpoint_paths:
        np.testing.assert_array_equal(ac.load_variable(path, V_KEY), np.full(64, int(path.rsplit("-", 1)[1]) - 1))


# ---------------------------------------------------------------- checkpoints on another storage


@pytest.fixture
def memory():
    return KvStoreStorage({"driver": "memory"})


def options_for(storage, runtime=None, enable_async=False):
    settings = ac.WriteSettings(storage=storage, runtime=runtime)
    return ac.CheckpointOptions(enable_async=enable_async, write_settings=settings)


def test_manager_deletes_checkpoints_on_the_storage_of_the_save(tmp_path, memory):
    manager = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.zeros(2))), tmp_path, max_to_keep=2)
    paths = [manager.save(options=options_for(memory)) for _ in range(3)]
    assert [ckio.checkpoint_exists(p, storage=memory) for p in paths] == [False, True, True]
    assert manager.checkpoints == paths[1:] and manager.latest_checkpoint == paths[-1]
    # The state file stays a local file in the directory; the checkpoints never touch the disk.
    assert sorted(os.listdir(tmp_path)) == [".checkpoint.lock", "checkpoint"]
    assert state_on_disk(tmp_path).all_model_checkpoint_paths == ["ckpt-2", "ckpt-3"]


def test_two_managers_on_another_storage_keep_each_others_entries(tmp_path, memory):
    # Another manager's entries survive a rewrite only if they are found on the save's storage.
    a = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.zeros(2))), tmp_path, max_to_keep=2, checkpoint_name="a")
    b = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.ones(2))), tmp_path, max_to_keep=2, checkpoint_name="b")
    saved = []
    for _ in range(3):
        saved.append(a.save(options=options_for(memory)))
        saved.append(b.save(options=options_for(memory)))
    kept = [p for p in saved if ckio.checkpoint_exists(p, storage=memory)]
    assert [os.path.basename(p) for p in kept] == ["a-2", "b-2", "a-3", "b-3"]
    assert state_on_disk(tmp_path).all_model_checkpoint_paths == ["a-2", "b-2", "a-3", "b-3"]
    assert a.checkpoints == kept[0::2] and b.checkpoints == kept[1::2]


def test_manager_waits_for_and_restores_an_async_save_on_another_storage(tmp_path, memory):
    gated = GatedStorage(memory, get_runtime())
    variable = ac.Variable(np.float32(5.0))
    init_calls = []
    manager = cm.CheckpointManager(
        ac.Checkpoint(v=variable), tmp_path, max_to_keep=2, init_fn=lambda: init_calls.append(1)
    )
    path = manager.save(options=options_for(gated, enable_async=True))
    gated.reached.wait()
    variable.assign(np.float32(-1.0))
    result = []
    worker = threading.Thread(target=lambda: result.append(manager.restore_or_initialize()))
    worker.start()
    try:
        worker.join(0.2)
        assert worker.is_alive() and result == []  # waits for the save it made on the gated storage
    finally:
        gated.open_gate()  # a failure must not leave the write stuck behind the gate
        worker.join()
    assert result == [path] and init_calls == []
    assert variable.numpy() == 5.0  # read back from the in-memory store
    assert not os.path.exists(index_path(path))


def test_manager_deletes_on_the_runtime_of_the_save(tmp_path):
    deleted = []

    class Recording(BackendWrapper):
        async def delete(self, name):
            deleted.append((name, threading.current_thread().name))
            await super().delete(name)

    runtime = Runtime(name="manager-test-runtime")
    try:
        manager = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.zeros(2))), tmp_path, max_to_keep=1)
        options = options_for(WrappingStorage(default_storage(), Recording), runtime=runtime)
        first = manager.save(options=options)
        second = manager.save(options=options)
    finally:
        runtime.close()
    assert (index_name(os.path.basename(first)), "manager-test-runtime") in deleted
    assert not ac.checkpoint_exists(first) and ac.checkpoint_exists(second)


# ---------------------------------------------------------------- the re-exported state-file API


def test_state_file_api_is_re_exported_unchanged():
    # ``from asyncckpt.checkpoint_management import latest_checkpoint`` keeps working (TF's spelling).
    for name in state_file.__all__:
        assert getattr(cm, name) is getattr(state_file, name), name
    assert set(state_file.__all__) < set(cm.__all__)
    assert "CheckpointManager" in cm.__all__
