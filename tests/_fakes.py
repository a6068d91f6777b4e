"""Test doubles used only by this test suite: a snapshot source, a reader, a copy gate, manifest edits.

The storage doubles ship with the package (:mod:`asyncckpt.testing.storage`); they are importable
from here too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import types
from pathlib import Path

import numpy as np

from asyncckpt.format import seal_manifest
from asyncckpt.naming import index_path
from asyncckpt.testing.storage import FailingStorage, GatedStorage, WrappingStorage

__all__ = ["FakeVariable", "MemoryReader", "WrappingStorage", "GatedStorage", "FailingStorage", "CopyGate", "manifest_editor", "json_paths",
           "tensorflow_index_bytes", "write_tensorflow_checkpoints", "files_in", "TENSORFLOW_FIXTURE"]


class FakeVariable:
    """A minimal snapshot source: a NumPy array whose in-place changes call hooks first."""

    def __init__(self, value) -> None:
        self._array = np.array(value)
        self._hooks: list = []
        self._hooks_guard = threading.Lock()
        self.snapshot_calls = 0

    def _snapshot_array(self):
        self.snapshot_calls += 1
        return self._array

    def _add_mutation_hook(self, hook) -> None:
        with self._hooks_guard:
            self._hooks.append(hook)

    def _remove_mutation_hook(self, hook) -> None:
        with self._hooks_guard:
            self._hooks.remove(hook)

    @property
    def hook_count(self) -> int:
        return len(self._hooks)

    def assign(self, value) -> None:
        with self._hooks_guard:
            hooks = list(self._hooks)  # a hook may remove itself while we iterate
        for hook in hooks:
            hook(self)
        self._array[...] = value

    def numpy(self) -> np.ndarray:
        return self._array.copy()


class MemoryReader:
    """The three reader calls the restore engine makes, over a dict of arrays."""

    def __init__(self, values: dict):
        self.values = values
        self.reads: list[list[str]] = []
        self.specs: list[str] = []

    def keys(self):
        return sorted(self.values)

    def spec(self, key):
        self.specs.append(key)
        value = self.values[key]
        return types.SimpleNamespace(dtype=value.dtype, shape=value.shape)

    def read_many(self, keys, out=None):
        self.reads.append(list(keys))
        values = {key: self.values[key].copy() for key in keys}
        for key, destination in (out or {}).items():  # like CheckpointReader: fill and return it
            np.copyto(destination, values[key])
            values[key] = destination
        return values


class CopyGate:
    """A ``FakeDeviceBackend`` copy hook: logs every copy, and can hold or fail the n-th copy of one kind.

    ``kind`` is the copy direction counted (``"d2h"``, ``"h2d"`` or ``"d2d"``); the n-th such copy
    blocks on ``opened`` when ``hold_at == n`` (setting ``held`` first) and raises when ``fail_at == n``.
    """

    def __init__(self, kind: str = "d2h") -> None:
        self.kind = kind
        self.log: list[str] = []
        self.calls = 0
        self.hold_at: int | None = None
        self.fail_at: int | None = None
        self.opened = threading.Event()
        self.held = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, kind: str, nbytes: int) -> None:
        with self._lock:
            self.log.append(kind)
            if kind != self.kind:
                return
            self.calls += 1
            call = self.calls
        if call == self.hold_at:
            self.held.set()
            self.opened.wait()
        if call == self.fail_at:
            raise RuntimeError("simulated DMA fault")


def manifest_editor(folder, document: dict, workdir):
    """Copy the checkpoint folder ``folder`` (holding ``ckpt``) under ``workdir``; return ``(write, document)``.

    ``write(edit)`` applies ``edit`` to a deep copy of the manifest ``document``, seals it with a
    valid checksum (as an attacker would) over the copy's ``ckpt.index`` and returns its prefix.
    """
    copy = Path(workdir) / "copy"
    shutil.copytree(folder, copy)
    prefix = str(copy / "ckpt")

    def write(edit) -> str:
        edited = json.loads(json.dumps(document))
        edit(edited)
        Path(index_path(prefix)).write_bytes(seal_manifest(edited))
        return prefix

    return write, document


def json_paths(node, prefix=()):
    """Every path (a tuple of keys and list indexes) into the JSON value ``node``, itself first."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from json_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from json_paths(value, (*prefix, index))


#: A real TensorFlow checkpoint (tests/fixtures/tensorflow/make_fixtures.py): its prefix.
TENSORFLOW_FIXTURE = Path(__file__).with_name("fixtures") / "tensorflow" / "tf2" / "ckpt-1"


def tensorflow_index_bytes(seed: int = 0) -> bytes:
    """The ``P.index`` of a real TensorFlow checkpoint (a TF2 one, written by ``tf.train.Checkpoint``)."""
    return TENSORFLOW_FIXTURE.with_name(TENSORFLOW_FIXTURE.name + ".index").read_bytes()


def write_tensorflow_checkpoints(directory, numbers=(1, 2, 3), name: str = "ckpt") -> dict[str, bytes]:
    """Make ``directory`` look as ``tf.train.CheckpointManager`` leaves it; return :func:`files_in` of it.

    Each ``<name>-<n>`` is a copy of a real TensorFlow checkpoint (its index and its data file
    ``<name>-<n>.data-00000-of-00001``); the ``checkpoint`` state file lists them with recent
    timestamps, as a manager recording them would.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    data = TENSORFLOW_FIXTURE.with_name(TENSORFLOW_FIXTURE.name + ".data-00000-of-00001").read_bytes()
    lines = [f'model_checkpoint_path: "{name}-{numbers[-1]}"']
    for number in numbers:
        (directory / f"{name}-{number}.index").write_bytes(tensorflow_index_bytes(number))
        (directory / f"{name}-{number}.data-00000-of-00001").write_bytes(data)
        lines.append(f'all_model_checkpoint_paths: "{name}-{number}"')
    lines += [f"all_model_checkpoint_timestamps: {now - 60 + i!r}" for i in range(len(numbers))]
    lines.append(f"last_preserved_timestamp: {now - 3600!r}")
    (directory / "checkpoint").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files_in(directory)


def files_in(directory) -> dict[str, bytes]:
    """Every file under ``directory`` (relative name -> bytes), directories as ``b"<dir>"``."""
    directory = Path(directory)
    return {
        str(path.relative_to(directory)): b"<dir>" if path.is_dir() else path.read_bytes()
        for path in sorted(directory.rglob("*"))
    }


@contextlib.contextmanager
def mounted_tmpfs(size: str):
    """A tmpfs of ``size`` (``"1m"``), mounted for the block and always unmounted.

    Skips the calling test where there is no mount command or mounting is refused.
    """
    import pytest  # noqa: PLC0415 - only tests call this

    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no mount command on this machine")
    directory = tempfile.mkdtemp(prefix="asyncckpt-tmpfs-")
    result = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", directory],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        os.rmdir(directory)
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or 'exit ' + str(result.returncode)}")
    try:
        yield Path(directory)
    finally:
        if subprocess.run(["umount", directory], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", directory], capture_output=True, check=False)
        os.rmdir(directory)
