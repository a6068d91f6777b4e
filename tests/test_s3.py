"""Checkpoints on S3: a real local server (moto, started once per run), ``s3://`` paths, conditional commits."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt.io.storage import BackendWrapper, CommitConflictError, StorageError
from asyncckpt.io.storage.s3 import S3Storage
from asyncckpt.testing.storage import WrappingStorage

KEY = "w/.ATTRIBUTES/VARIABLE_VALUE"


def _model(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": ac.Variable(rng.standard_normal((64, 32)).astype(np.float32)),
            "b": ac.Variable(np.arange(5, dtype=np.int64) + seed)}


def _data_dirs(s3_server, bucket: str) -> set[str]:
    """The data directories holding data files (``<folder>/<stem>.data-<nonce>``)."""
    return {key.rsplit("/", 1)[0] for key in s3_server.keys(bucket) if ".data-" in key and not key.endswith(".lock")}


def test_a_checkpoint_round_trips_through_an_s3_url(s3_server, bucket):
    saved = _model(1)
    path = ac.Checkpoint(**saved).write(f"s3://{bucket}/run/ckpt")
    assert path == f"s3://{bucket}/run/ckpt"
    keys = s3_server.keys(bucket)
    assert "run/ckpt.index" in keys and any(key.startswith("run/ckpt.data-") for key in keys)
    assert not any(".lock" in key for key in keys)  # the lease marker goes with the write
    fresh = _model(2)
    ac.Checkpoint(**fresh).read(path).assert_consumed()
    np.testing.assert_array_equal(fresh["w"].numpy(), saved["w"].numpy())
    assert ac.load_checkpoint(path).verify().tensors == 2
    np.testing.assert_array_equal(ac.load_variable(path, "b/.ATTRIBUTES/VARIABLE_VALUE"), np.arange(5) + 1)


def test_an_asynchronous_save_commits_on_s3_and_the_next_write_replaces_it(s3_server, bucket):
    values = _model(3)
    checkpoint = ac.Checkpoint(**values)
    path = checkpoint.write(f"s3://{bucket}/ckpt", options=ac.CheckpointOptions(enable_async=True))
    values["w"].assign_add(np.ones((64, 32), np.float32))  # while the write may be under way
    checkpoint.sync()
    np.testing.assert_array_equal(ac.load_variable(path, KEY), _model(3)["w"].numpy())
    checkpoint.write(path)  # replaces it: the old data goes
    assert len(_data_dirs(s3_server, bucket)) == 1
    np.testing.assert_array_equal(ac.load_variable(path, KEY), values["w"].numpy())


RACING_WRITER = '''
import os, sys, time, numpy as np
import asyncckpt as ac
from asyncckpt.io.storage import BackendWrapper
from asyncckpt.io.storage.s3 import S3Storage
from asyncckpt.testing.storage import WrappingStorage

bucket, number, gate, writers = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

class AllAtTheCommit(BackendWrapper):
    async def commit(self, name, tmp_name, value):
        # Every writer has noted what P.index held and written its data before any commits: a real race.
        open(os.path.join(gate, f"ready-{number}"), "w").close()
        while len(os.listdir(gate)) < writers:
            time.sleep(0.01)
        await super().commit(name, tmp_name, value)

storage = WrappingStorage(S3Storage(bucket), AllAtTheCommit)
checkpoint = ac.Checkpoint(w=ac.Variable(np.full(1000, float(number))), b=ac.Variable(np.arange(5) + number))
try:
    path = checkpoint.write(f"s3://{bucket}/race/ckpt",
                            options=ac.CheckpointOptions(write_settings=ac.WriteSettings(storage=storage)))
    print("committed", path, flush=True)
except Exception as exc:
    print("refused", type(exc).__name__, exc, flush=True)
'''


def test_eight_writers_racing_to_one_path_commit_exactly_one(s3_server, bucket, tmp_path):
    """Eight processes (this process's own writes to one path are serialised instead, first come first)."""
    script = tmp_path / "writer.py"
    script.write_text(RACING_WRITER)
    env = {**os.environ, "PYTHONPATH": str(Path(ac.__file__).parents[1])}
    gate = tmp_path / "gate"
    gate.mkdir()
    writers = [subprocess.Popen([sys.executable, str(script), bucket, str(n), str(gate), "8"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(8)]
    outputs = [writer.communicate(timeout=120) for writer in writers]
    lines = [out.strip().splitlines()[-1] if out.strip() else f"nothing ({err[-300:]})" for out, err in outputs]
    winners = [n for n, line in enumerate(lines) if line.startswith("committed")]
    assert len(winners) == 1, lines
    for n, line in enumerate(lines):
        if n not in winners:
            assert line.startswith("refused CommitConflictError"), line
            assert "another writer committed" in line and "race/ckpt.index" in line
    assert len(_data_dirs(s3_server, bucket)) == 1  # the losers deleted their data
    url = f"s3://{bucket}/race/ckpt"
    np.testing.assert_array_equal(ac.load_variable(url, "b/.ATTRIBUTES/VARIABLE_VALUE"), np.arange(5) + winners[0])


KILLED_WRITER = '''
import sys, time, numpy as np
import asyncckpt as ac
from asyncckpt.io.storage import BackendWrapper
from asyncckpt.io.storage.s3 import S3Storage
from asyncckpt.testing.storage import WrappingStorage
from asyncckpt.testing.storage import WrappingStorage

class StopBeforeCommit(BackendWrapper):
    async def commit(self, name, tmp_name, value):
        print("data written", flush=True)
        time.sleep(600)  # killed here: between the data and the commit

storage = WrappingStorage(S3Storage(sys.argv[1], lease_seconds=1), StopBeforeCommit)
ac.Checkpoint(w=ac.Variable(np.ones(1000))).write(
    f"s3://{sys.argv[1]}/ckpt", options=ac.CheckpointOptions(write_settings=ac.WriteSettings(storage=storage)))
'''


def test_a_writer_killed_between_data_and_commit_leaves_nothing_visible_and_the_next_save_cleans_up(
        s3_server, bucket, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    child = subprocess.Popen([sys.executable, str(script), bucket], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(ac.__file__).parents[1])})
    try:
        assert child.stdout.readline().strip() == "data written"
    finally:
        child.kill()  # SIGKILL
        child.wait(30)
        child.stdout.close()
    url = f"s3://{bucket}/ckpt"
    assert not ac.checkpoint_exists(url)
    assert len(_data_dirs(s3_server, bucket)) == 1 and any(k.endswith(".lock") for k in s3_server.keys(bucket))
    time.sleep(1.5)  # the dead writer's lease (1 s) runs out
    settings = ac.WriteSettings(storage=S3Storage(bucket, lease_seconds=1))
    ac.Checkpoint(w=ac.Variable(np.zeros(10))).write(url, options=ac.CheckpointOptions(write_settings=settings))
    assert len(_data_dirs(s3_server, bucket)) == 1  # the leftovers are gone, the new data stays
    assert not any(key.endswith(".lock") for key in s3_server.keys(bucket))
    np.testing.assert_array_equal(ac.load_variable(url, KEY), np.zeros(10))


def test_a_live_writers_lease_keeps_cleanup_away(s3_server, bucket):
    """Another writer's data directory whose lease has not run out is never taken for debris."""
    storage = S3Storage(bucket)
    gate = threading.Event()
    reached = threading.Event()

    class HoldCommit(BackendWrapper):
        async def commit(self, name, tmp_name, value):
            reached.set()
            while not gate.is_set():
                await asyncio.sleep(0.01)
            await super().commit(name, tmp_name, value)

    held = ac.WriteSettings(storage=WrappingStorage(S3Storage(bucket), HoldCommit))
    slow = ac.Checkpoint(w=ac.Variable(np.ones(100)))
    slow.write(f"s3://{bucket}/slow", options=ac.CheckpointOptions(enable_async=True, write_settings=held))
    assert reached.wait(30)
    ac.Checkpoint(w=ac.Variable(np.zeros(3))).write(
        f"s3://{bucket}/other", options=ac.CheckpointOptions(write_settings=ac.WriteSettings(storage=storage)))
    gate.set()
    slow.sync()
    np.testing.assert_array_equal(ac.load_variable(f"s3://{bucket}/slow", KEY), np.ones(100))


def test_sharded_values_save_and_reshard_on_s3(s3_server, bucket):
    from _threads import on_ranks

    full = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    url = f"s3://{bucket}/sharded/ckpt"

    def make(rank):
        start = rank * 4
        return ac.ShardedVariable.shard(full[start:start + 4], global_shape=full.shape, offset=(start, 0), name="w")

    def save(rank, coordinator, variable):
        options = ac.CheckpointOptions(multi_worker=ac.MultiWorker.of(coordinator))
        return ac.Checkpoint(w=variable).write(url, options=options)

    assert on_ranks(2, make, save, timeout=30) == {0: url, 1: url}
    columns = ac.ShardedVariable.shard(np.zeros((8, 3), np.float32), global_shape=full.shape, offset=(0, 3), name="w")
    ac.Checkpoint(w=columns).read(url).assert_consumed()
    np.testing.assert_array_equal(columns.local.numpy(), full[:, 3:])


def test_a_server_that_ignores_conditional_writes_is_refused_at_first_use(s3_server, bucket):
    class Unconditional(S3Storage):
        async def open(self, folder):
            backend = await super(S3Storage, self).open(folder)  # no probe yet: it is the probe under test

            async def create_new(key, value):  # as a server without If-None-Match behaves
                await backend.write(key, value)
                return True

            backend.create_new = create_new
            await self._probe(backend)
            return backend

    settings = ac.WriteSettings(storage=Unconditional(bucket))
    with pytest.raises(StorageError, match="does not honour conditional writes"):
        ac.Checkpoint(w=ac.Variable(np.ones(3))).write(
            f"s3://{bucket}/ckpt", options=ac.CheckpointOptions(write_settings=settings))
    assert s3_server.keys(bucket) == []  # nothing written, the probe removed


def test_a_path_of_another_bucket_is_refused_by_a_storage():
    with pytest.raises(ValueError, match="not in this storage's"):
        S3Storage("one").split("s3://two/ckpt")


def test_a_manager_keeps_its_state_object_and_retention_in_the_bucket(s3_server, bucket):
    directory = f"s3://{bucket}/managed"
    variable = ac.Variable(np.zeros(4))
    manager = ac.CheckpointManager(ac.Checkpoint(v=variable), directory, max_to_keep=2)
    for step in range(4):
        variable.assign(np.full(4, float(step)))
        manager.save(options=ac.CheckpointOptions(enable_async=step % 2 == 1))
    manager.sync()
    assert manager.checkpoints == [f"{directory}/ckpt-3", f"{directory}/ckpt-4"]
    keys = s3_server.keys(bucket)
    assert "managed/checkpoint" in keys
    assert {key.split("/")[1].split(".")[0] for key in keys if ".index" in key} == {"ckpt-3", "ckpt-4"}
    assert not any(".lock" in key or ".deleting" in key for key in keys)
    assert ac.latest_checkpoint(directory) == f"{directory}/ckpt-4"
    state = ac.get_checkpoint_state(directory)
    assert state.all_model_checkpoint_paths == [f"{directory}/ckpt-3", f"{directory}/ckpt-4"]
    # The state object holds paths relative to the directory, as TensorFlow's state file does.
    from asyncckpt import state_object

    text = state_object.read_bytes(f"{directory}/checkpoint", 1 << 20).decode()
    assert text.splitlines()[0] == 'model_checkpoint_path: "ckpt-4"'
    # A new manager over the bucket adopts the checkpoints and goes on numbering after them.
    resumed = ac.Variable(np.zeros(4))
    again = ac.CheckpointManager(ac.Checkpoint(v=resumed), directory, max_to_keep=2)
    assert again.restore_or_initialize() == f"{directory}/ckpt-4"
    np.testing.assert_array_equal(resumed.numpy(), np.full(4, 3.0))
    again.save()
    assert again.checkpoints == [f"{directory}/ckpt-4", f"{directory}/ckpt-5"]
    assert not ac.checkpoint_exists(f"{directory}/ckpt-3")


def test_the_command_line_reads_checkpoints_in_a_bucket(s3_server, bucket, capsys):
    from asyncckpt import cli

    manager = ac.CheckpointManager(ac.Checkpoint(**_model(5)), f"s3://{bucket}/runs", max_to_keep=1)
    manager.save()
    assert cli.main(["ls", f"s3://{bucket}/runs"]) == 0  # a directory: its latest checkpoint
    listed = capsys.readouterr().out
    assert "w" in listed and "[64, 32]" in listed
    assert cli.main(["verify", f"s3://{bucket}/runs/ckpt-1"]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli.main(["verify", f"s3://{bucket}/runs/ckpt-9"]) == 1


def test_two_saves_to_one_path_in_a_row_both_commit(s3_server, bucket):
    """The second write's conditional commit is on what the first committed, not on what it saw at start."""
    url = f"s3://{bucket}/ckpt"
    first, second = ac.Checkpoint(v=ac.Variable(np.ones(8))), ac.Checkpoint(v=ac.Variable(np.full(8, 2.0)))
    asynchronous = ac.CheckpointOptions(enable_async=True)
    first.write(url, options=asynchronous)
    second.write(url, options=asynchronous)
    first.sync()
    second.sync()
    np.testing.assert_array_equal(ac.load_variable(url, "v/.ATTRIBUTES/VARIABLE_VALUE"), np.full(8, 2.0))
    assert len(_data_dirs(s3_server, bucket)) == 1


def test_a_save_whose_lease_ran_out_and_was_taken_over_fails_instead_of_committing(s3_server, bucket):
    reached, go = threading.Event(), threading.Event()

    class SlowDataWrite(BackendWrapper):
        async def write(self, key, value):
            if "/" in key:  # a data file: its directory and lease exist
                reached.set()
                while not go.is_set():
                    await asyncio.sleep(0.01)
            await super().write(key, value)

    slow = ac.Checkpoint(v=ac.Variable(np.ones(100)))
    storage = WrappingStorage(S3Storage(bucket, lease_seconds=1), SlowDataWrite)
    slow.write(f"s3://{bucket}/slow", options=ac.CheckpointOptions(
        enable_async=True, write_settings=ac.WriteSettings(storage=storage)))
    assert reached.wait(30)
    time.sleep(1.5)  # its lease runs out; another writer of the folder cleans its data up
    other = ac.WriteSettings(storage=S3Storage(bucket, lease_seconds=1))
    ac.Checkpoint(v=ac.Variable(np.zeros(3))).write(
        f"s3://{bucket}/other", options=ac.CheckpointOptions(write_settings=other))
    go.set()
    with pytest.raises(StorageError, match="lease ran out"):
        slow.sync()
    assert not ac.checkpoint_exists(f"s3://{bucket}/slow")
    np.testing.assert_array_equal(ac.load_variable(f"s3://{bucket}/other", KEY.replace("w/", "v/")), np.zeros(3))
