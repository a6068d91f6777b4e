"""A training loop that saves with a ``CheckpointManager`` and kills itself at a chosen point.

Usage::

    python _training_child.py FOLDER KIND N MAX_SAVES

The loop resumes from ``latest_checkpoint(FOLDER)`` (``restore_or_initialize``), then for each step
sets every value to ``expected_values(step)`` and saves, synchronous and asynchronous saves in
turn, with ``max_to_keep=2``. The next step's values are assigned while an asynchronous save is in
flight, so the copy-on-write guard is exercised on every other save.

``KIND``/``N`` pick where the process sends itself ``SIGKILL``: the ``N``-th occurrence (counted
from this process's start) of one of the points in :data:`KILL_POINTS`, reached by injection --
a storage wrapper passed through ``WriteSettings(storage=...)``, a variable whose snapshot reads
are counted, a write callback, and an audit hook on ``os.rename`` -- never by timing. ``none``
kills nowhere (the parent may kill at a random moment instead).

Lines on stdout, each flushed, tell the parent what happened:

``resumed STEP PATH``  the step restored from (0 and ``None`` on a fresh folder);
``committed STEP``     a save of STEP is known complete (a synchronous save returned, or ``sync()``);
``killing KIND N``     about to kill itself;
``counts JSON``        how often each point was reached (printed when the loop ends unkilled);
``finished``           the loop ended without a kill.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import threading

import numpy as np

import asyncckpt as ac
from asyncckpt.io.storage import BackendWrapper, FileStorage
from asyncckpt.testing.storage import WrappingStorage

__all__ = ["KILL_POINTS", "Notes", "build_model", "expected_values", "main"]

#: Every point the child can kill itself at, in the order a save reaches them.
KILL_POINTS = (
    "snapshot",          # a live variable's bytes are read (at start_write, by the copier, by a hook)
    "write-before",      # a data file write is about to start
    "write-after",       # a data file write is durable
    "commit-before",     # the manifest commit is about to start (nothing of it written yet)
    "rename-index",      # P.index.tmp-N is written and fsynced; its rename to P.index is next
    "commit-after",      # P.index is renamed and the folder fsynced; lock release and callbacks next
    "callback",          # a write callback runs: committed, state file not yet updated
    "rename-state",      # the state file's temporary is written; its rename is next
    "delete-before",     # the manager (or debris cleanup) is about to remove a P.index / temporary
    "delete-after",      # ... and has removed it; the data directory is still there
    "delete_tree-before",  # a data directory is about to be removed
    "delete_tree-after",   # ... and is gone
)

SHAPES = {"big": ((512, 1024), np.float32), "emb": ((65536,), np.float64)}
SMALL = 12
MAX_TO_KEEP = 2
SETTINGS = dict(
    chunk_bytes=1 << 20, pack_bytes=256 << 10, small_array_bytes=64 << 10, staging_budget_bytes=2 << 20,
    max_concurrent_writes=2,
)


class Notes(ac.PythonState):
    """Python state saved with the model: a short text naming the step."""

    def __init__(self) -> None:
        self.value = b""

    def serialize(self) -> bytes:
        return self.value

    def deserialize(self, string_value: bytes) -> None:
        self.value = string_value


class _Killer:
    """Counts points reached; sends SIGKILL to this process at the ``n``-th ``kind``."""

    def __init__(self, kind: str, n: int) -> None:
        if kind != "none" and kind not in KILL_POINTS:
            raise SystemExit(f"unknown kill point {kind!r}")
        self.kind, self.n = kind, n
        self.counts: collections.Counter = collections.Counter()
        self._guard = threading.Lock()

    def reached(self, point: str) -> None:
        with self._guard:
            self.counts[point] += 1
            hit = point == self.kind and self.counts[point] == self.n
        if hit:
            print(f"killing {point} {self.n}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
            threading.Event().wait()  # never returns: the signal cannot be caught


class _CountedVariable(ac.Variable):
    """A variable whose every snapshot read is a kill point."""

    killer: _Killer | None = None

    def _snapshot_array(self):
        if self.killer is not None:
            self.killer.reached("snapshot")
        return super()._snapshot_array()


def _killing_storage(killer: _Killer) -> WrappingStorage:
    def wrap(backend):
        class Killing(BackendWrapper):
            async def write(self, key, value):
                killer.reached("write-before")
                await super().write(key, value)
                killer.reached("write-after")

            async def commit(self, name, tmp_name, value):
                killer.reached("commit-before")
                await super().commit(name, tmp_name, value)
                killer.reached("commit-after")

            async def delete(self, name):
                killer.reached("delete-before")
                await super().delete(name)
                killer.reached("delete-after")

            async def delete_tree(self, name):
                killer.reached("delete_tree-before")
                await super().delete_tree(name)
                killer.reached("delete_tree-after")

        return Killing(backend)

    return WrappingStorage(FileStorage(), wrap)


def _install_rename_hook(killer: _Killer, state_file: str) -> None:
    state_file = os.path.abspath(state_file)

    def hook(event: str, args: tuple) -> None:
        if event != "os.rename":  # os.replace raises this audit event too
            return
        target = os.path.abspath(os.fsdecode(args[1]))
        if target == state_file:
            killer.reached("rename-state")
        elif target.endswith(".index"):
            killer.reached("rename-index")

    sys.addaudithook(hook)


def expected_values(step: int) -> dict:
    """Every value of the model at ``step`` (a function of the step only)."""
    rng = np.random.default_rng(step)
    values = {"step": np.int64(step), "notes": f"step {step}: {'x' * (step % 17)}".encode()}
    for name, (shape, dtype) in SHAPES.items():
        values[name] = rng.standard_normal(shape).astype(dtype)
    for j in range(SMALL):
        values[f"small/{j}"] = rng.integers(-(2**31), 2**31, size=8 + j, dtype=np.int32)
    return values


def build_model(counted: _Killer | None = None):
    """``(variables, notes, checkpoint)``: the model with zero values, and its Checkpoint."""
    variable = _CountedVariable if counted is not None else ac.Variable
    variables = {"step": ac.Variable(np.int64(0))}
    for name, (shape, dtype) in SHAPES.items():
        variables[name] = variable(np.zeros(shape, dtype))
        if counted is not None:
            variables[name].killer = counted
    model = ac.AutoTrackable()
    model.big, model.emb = variables["big"], variables["emb"]
    model.layers = []
    for j in range(SMALL):
        variables[f"small/{j}"] = ac.Variable(np.zeros(8 + j, np.int32))
        model.layers.append(variables[f"small/{j}"])
    notes = Notes()
    checkpoint = ac.Checkpoint(model=model, step=variables["step"], notes=notes)
    return variables, notes, checkpoint


def _assign(variables: dict, notes: Notes, step: int) -> None:
    for key, value in expected_values(step).items():
        if key == "notes":
            notes.value = value
        else:
            variables[key].assign(value)


def main() -> None:
    folder, kind, n, max_saves = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    killer = _Killer(kind, n)
    _install_rename_hook(killer, os.path.join(folder, "checkpoint"))
    settings = ac.WriteSettings(storage=_killing_storage(killer), **SETTINGS)
    variables, notes, checkpoint = build_model(counted=killer)
    manager = ac.CheckpointManager(checkpoint, folder, max_to_keep=MAX_TO_KEEP)
    restored = manager.restore_or_initialize()
    step = int(variables["step"].numpy()) if restored else 0
    print(f"resumed {step} {restored}", flush=True)

    def on_commit() -> None:
        killer.reached("callback")

    for _ in range(max_saves):
        step += 1
        _assign(variables, notes, step)  # copy-on-write for an asynchronous save still in flight
        asynchronous = step % 2 == 0
        options = ac.CheckpointOptions(
            enable_async=asynchronous, write_settings=settings, experimental_write_callbacks=[on_commit]
        )
        manager.save(options=options)
        if not asynchronous:
            print(f"committed {step}", flush=True)
    manager.sync()
    print(f"committed {step}", flush=True)
    print(f"counts {json.dumps(dict(killer.counts))}", flush=True)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
