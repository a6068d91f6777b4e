"""Concurrent savers: many threads on one Checkpoint, two processes on one checkpoint path.

* Threads: every checkpoint written by asynchronous saves from many threads holds exactly the value
  its saver assigned just before saving (other threads keep assigning while writes are in flight),
  and ``save_counter`` inside ``ckpt-N`` is ``N``.
* Processes: two processes writing the same prefix with ``Checkpoint.write`` never leave a torn
  checkpoint -- every read that succeeds, during and after, holds one writer's one iteration, and a
  write afterwards leaves no debris.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np

import asyncckpt as ac
from asyncckpt import io as ckio
from asyncckpt.errors import CorruptCheckpointError, NotFoundError
from asyncckpt.naming import parse_data_dir_name, parse_index_tmp_name, parse_lock_name

ASYNC = ac.CheckpointOptions(enable_async=True)


def test_async_saves_from_many_threads_each_hold_their_own_snapshot(tmp_path):
    value = ac.Variable(np.zeros(4096, np.float64))
    noise = ac.Variable(np.zeros(4096, np.float64))
    checkpoint = ac.Checkpoint(value=value, noise=noise)
    user_lock = threading.Lock()  # a saver's assign and save happen together, as in one training step
    recorded: dict[str, float] = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def saver(thread: int) -> None:
        try:
            for round_ in range(6):
                mark = thread * 100 + round_
                with user_lock:
                    value.assign(np.full(4096, mark, np.float64))
                    path = checkpoint.save(tmp_path / "ckpt", options=ASYNC)
                    recorded[path] = mark
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    def mutator() -> None:
        step = 0
        while not stop.is_set():  # keeps changing a saved variable while writes are in flight
            step += 1
            noise.assign(np.full(4096, step, np.float64))

    threads = [threading.Thread(target=saver, args=(n,)) for n in range(8)]
    noisy = threading.Thread(target=mutator)
    noisy.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    noisy.join()
    checkpoint.sync()
    assert not errors, errors
    assert len(recorded) == 48 and int(checkpoint.save_counter) == 48
    for path, mark in recorded.items():
        restored = {"value": ac.Variable(np.zeros(4096)), "noise": ac.Variable(np.zeros(4096))}
        loaded = ac.Checkpoint(**restored)
        loaded.restore(path).assert_consumed()
        assert np.all(restored["value"].numpy() == mark), path
        noise_value = restored["noise"].numpy()
        assert np.all(noise_value == noise_value[0]), f"{path}: a torn copy of a variable changed mid-write"
        assert int(loaded.save_counter) == int(path.rsplit("-", 1)[1])


WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import asyncckpt as ac

    prefix, writer, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    settings = ac.WriteSettings(chunk_bytes=64 << 10, pack_bytes=16 << 10, small_array_bytes=4 << 10,
                                staging_budget_bytes=128 << 10)
    big = ac.Variable(np.zeros((128, 256), np.float32))
    small = ac.Variable(np.zeros(10, np.int64))
    checkpoint = ac.Checkpoint(big=big, small=small)
    for i in range(rounds):
        mark = writer * 1000 + i
        big.assign(np.full((128, 256), mark, np.float32))
        small.assign(np.arange(10) + mark)
        checkpoint.write(prefix, options=ac.CheckpointOptions(write_settings=settings))
    """
)


def _read_consistent(prefix: str) -> int:
    """The (writer, iteration) mark of the checkpoint at ``prefix``; fails if its values disagree."""
    reader = ckio.open_reader(prefix)
    values = reader.read_many(["big/.ATTRIBUTES/VARIABLE_VALUE", "small/.ATTRIBUTES/VARIABLE_VALUE"])
    big, small = values["big/.ATTRIBUTES/VARIABLE_VALUE"], values["small/.ATTRIBUTES/VARIABLE_VALUE"]
    mark = int(small[0])
    assert np.all(big == mark) and np.array_equal(small, np.arange(10) + mark), f"torn checkpoint at {prefix}"
    return mark


def test_two_processes_writing_one_prefix_never_tear_it(tmp_path):
    prefix = str(tmp_path / "shared")
    rounds = 25
    children = [
        subprocess.Popen([sys.executable, "-c", WRITER, prefix, str(writer), str(rounds)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for writer in (1, 2)
    ]
    seen, retried = set(), 0
    # Until the first commit (the writers are still starting up) there is nothing to race with: wait
    # instead of spinning a core, then read as fast as possible.
    while not os.path.exists(prefix + ".index") and all(child.poll() is None for child in children):
        threading.Event().wait(0.005)
    while any(child.poll() is None for child in children):
        try:
            seen.add(_read_consistent(prefix))
        except NotFoundError:
            pass  # nothing committed yet
        except CorruptCheckpointError as error:
            # Documented: the data a reader opened may be replaced and deleted under it; reopen.
            assert "is missing" in str(error), error
            retried += 1
    for child in children:
        _, stderr = child.communicate()
        assert child.returncode == 0, stderr
    final = _read_consistent(prefix)
    assert final in (1000 + rounds - 1, 2000 + rounds - 1)
    ckio.open_reader(prefix).verify()
    assert seen, "the reader never saw a committed checkpoint"
    # One more write cleans whatever the race left unreferenced.
    ac.Checkpoint(big=ac.Variable(np.zeros((128, 256), np.float32)), small=ac.Variable(np.arange(10))).write(
        str(tmp_path / "after"))
    names = os.listdir(tmp_path)
    referenced = {ckio.open_reader(tmp_path / n[: -len(".index")]).data_dir for n in names if n.endswith(".index")}
    for name in names:
        assert parse_lock_name(name) is None and parse_index_tmp_name(name) is None, f"debris: {name}"
        assert parse_data_dir_name(name) is None or name in referenced, f"unreferenced data directory: {name}"
    assert sorted(n for n in names if n.endswith(".index")) == ["after.index", "shared.index"]
    assert Path(prefix + ".index").exists()
