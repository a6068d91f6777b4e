"""Resource hygiene: interpreter exit with a save in flight, and garbage-collected Checkpoints.

* Exit: a program whose asynchronous save (slowed down by an injected storage delay) is still
  writing when the interpreter exits -- by returning, an unhandled exception, ``sys.exit``,
  ``KeyboardInterrupt`` -- or started by a non-daemon thread while the interpreter shuts down,
  finishes that save, records it in the state file and exits; one killed with no chance to clean
  up (``os._exit``, ``SIGTERM``) leaves no visible partial checkpoint. Never a hang: each program runs under a generous timeout.
* Garbage collection: a ``Checkpoint`` (and its manager) is collectable after its saves, even one
  dropped with a save in flight, and creating many leaks no thread.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import io as ckio
from asyncckpt.io.storage import BackendWrapper, FileStorage
from asyncckpt.testing.storage import WrappingStorage

TESTS = str(Path(__file__).parent)

PROGRAM = textwrap.dedent(
    """
    import sys, threading
    shutting_down = threading.Event()
    if sys.argv[2] == "thread-at-exit":
        # Registered before anything else, so it runs last of the interpreter's thread-exit hooks:
        # the save below starts after every hook of asyncckpt and of the thread pools has run.
        threading._register_atexit(shutting_down.set)

    import asyncio, os, signal
    import numpy as np
    import asyncckpt as ac
    from asyncckpt.io.storage import BackendWrapper, FileStorage
    from asyncckpt.testing.storage import WrappingStorage

    class Slow(BackendWrapper):
        async def write(self, key, value):
            await asyncio.sleep(0.05)  # keeps the save in flight while the program ends
            await super().write(key, value)

    directory, mode = sys.argv[1], sys.argv[2]
    settings = ac.WriteSettings(storage=WrappingStorage(FileStorage(), Slow), chunk_bytes=1 << 20,
                                pack_bytes=1 << 20, staging_budget_bytes=2 << 20)
    big = ac.Variable(np.full((1024, 1024), 1.0, np.float32))  # 4 MiB: four slow chunk writes
    checkpoint = ac.Checkpoint(big=big)
    manager = ac.CheckpointManager(checkpoint, directory, max_to_keep=2)
    manager.save()

    def save_second():
        big.assign(np.full((1024, 1024), 2.0, np.float32))
        manager.save(options=ac.CheckpointOptions(enable_async=True, write_settings=settings))
        big.assign(np.full((1024, 1024), 3.0, np.float32))  # after the snapshot: must not be saved

    if mode == "thread-at-exit":
        threading.Thread(target=lambda: (shutting_down.wait(), save_second())).start()
    else:
        save_second()
    print("pending", flush=True)
    if mode == "exception":
        raise RuntimeError("the training loop crashed")
    if mode == "sys.exit":
        sys.exit(3)
    if mode == "KeyboardInterrupt":
        raise KeyboardInterrupt
    if mode == "os._exit":
        os._exit(0)
    if mode == "SIGTERM":
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait()
    """
)


def _run(directory: Path, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", PROGRAM, str(directory), mode], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


def _restored_value(path: str) -> float:
    big = ac.Variable(np.zeros((1024, 1024), np.float32))
    ac.Checkpoint(big=big).restore(path).expect_partial()
    values = big.numpy()
    assert np.all(values == values[0, 0]), f"{path} holds a mixture of values"
    return float(values[0, 0])


@pytest.mark.parametrize(
    ("mode", "code"),
    [("return", 0), ("exception", 1), ("sys.exit", 3), ("KeyboardInterrupt", 1),
     ("thread-at-exit", 0)],
)
def test_a_save_in_flight_at_exit_is_finished_and_recorded(tmp_path, mode, code):
    result = _run(tmp_path, mode)
    assert result.returncode in (code, -2 if mode == "KeyboardInterrupt" else code), result.stderr
    assert "pending" in result.stdout, result.stderr
    latest = ac.latest_checkpoint(tmp_path)
    assert latest == str(tmp_path / "ckpt-2"), result.stderr
    ckio.open_reader(latest).verify()
    assert _restored_value(latest) == 2.0
    assert _restored_value(str(tmp_path / "ckpt-1")) == 1.0


# thread-at-exit runs the program of test_a_save_in_flight_at_exit_is_finished_and_recorded[thread-at-exit-0]
# again, so only the slow tier repeats it here.
@pytest.mark.parametrize("mode", ["os._exit", "SIGTERM", pytest.param("thread-at-exit", marks=pytest.mark.slow)])
def test_a_process_ended_without_cleanup_leaves_no_partial_checkpoint(tmp_path, mode):
    result = _run(tmp_path, mode)
    assert "pending" in result.stdout, result.stderr
    latest = ac.latest_checkpoint(tmp_path)
    assert latest in (str(tmp_path / "ckpt-1"), str(tmp_path / "ckpt-2"))
    assert _restored_value(latest) == (1.0 if latest.endswith("-1") else 2.0)
    for prefix in ("ckpt-1", "ckpt-2"):
        if ckio.checkpoint_exists(tmp_path / prefix):  # committed means complete
            ckio.open_reader(tmp_path / prefix).verify()
    # The next program in the directory carries on and cleans up.
    assert _run(tmp_path, "return").returncode == 0
    assert _restored_value(ac.latest_checkpoint(tmp_path)) == 2.0
    names = os.listdir(tmp_path)
    assert not [n for n in names if n.endswith(".lock") and n != ".checkpoint.lock"], names
    assert not [n for n in names if ".index.tmp-" in n], names


def _short_lived_checkpoint(directory: Path, storage=None) -> weakref.ref:
    variable = ac.Variable(np.arange(1000, dtype=np.float64))
    checkpoint = ac.Checkpoint(v=variable)
    manager = ac.CheckpointManager(checkpoint, directory, max_to_keep=1)
    options = ac.CheckpointOptions(enable_async=True, write_settings=ac.WriteSettings(storage=storage))
    manager.save(options=options)
    variable.assign_add(1.0)  # a copy-on-write hook may be installed on it right now
    return weakref.ref(checkpoint)


def test_checkpoints_are_collected_and_leak_no_threads(tmp_path):
    _short_lived_checkpoint(tmp_path / "warm")  # starts the process runtime and its pools
    ckio.wait_for_pending_writes(tmp_path)
    gc.collect()
    threads_before = threading.active_count()
    refs = []
    for n in range(30):
        refs.append(_short_lived_checkpoint(tmp_path / f"run-{n}"))
    ckio.wait_for_pending_writes(tmp_path)
    gc.collect()
    assert [ref for ref in refs if ref() is not None] == [], "a Checkpoint outlived its last save"
    assert threading.active_count() <= threads_before + 2, threading.enumerate()
    assert all(ac.latest_checkpoint(tmp_path / f"run-{n}") is not None for n in range(30))


def test_a_checkpoint_dropped_with_a_save_in_flight_is_collected_once_it_finishes(tmp_path):
    release = threading.Event()

    class Held(BackendWrapper):
        async def write(self, key, value):
            while not release.is_set():
                await __import__("asyncio").sleep(0.01)
            await super().write(key, value)

    ref = _short_lived_checkpoint(tmp_path, storage=WrappingStorage(FileStorage(), Held))
    assert ckio.has_pending_writes(tmp_path)
    release.set()
    ckio.wait_for_pending_writes(tmp_path)
    gc.collect()
    assert ref() is None, gc.get_referrers(ref())
    restored = ac.Variable(np.zeros(1000))
    ac.Checkpoint(v=restored).restore(ac.latest_checkpoint(tmp_path)).expect_partial()
    np.testing.assert_array_equal(restored.numpy(), np.arange(1000, dtype=np.float64))
