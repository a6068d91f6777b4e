"""KvStoreStorage's own behaviour, beyond the backend contract (tests/test_storage_contract.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from asyncckpt._runtime import Runtime
from asyncckpt.io.storage import KvStoreStorage


@pytest.fixture(scope="module")
def runtime():
    runtime = Runtime()
    yield runtime
    runtime.close()


def test_split_takes_keys_below_the_spec_path():
    memory = KvStoreStorage({"driver": "memory"})
    assert memory.split("/b/run/ckpt") == ("b/run", "ckpt")
    assert memory.canonical("/b/run/./x/../ckpt") == "b/run/ckpt"
    for bad in ["b/run/", "", "/", "b/a\x00b"]:
        with pytest.raises(ValueError):
            memory.split(bad)


def test_a_spec_needs_a_driver():
    with pytest.raises(ValueError, match="driver"):
        KvStoreStorage({"path": "x"})


def test_capabilities_and_debris_cleanup_follow_the_driver(tmp_path, runtime):
    memory = KvStoreStorage({"driver": "memory"})
    files = KvStoreStorage({"driver": "file", "path": f"{tmp_path}/"})
    flags = ("durable", "hierarchical", "keeps_empty_folders", "locks_across_processes")
    assert [getattr(memory, flag) for flag in flags] == [False, False, False, False]
    assert [getattr(files, flag) for flag in flags] == [True, True, False, False]
    assert runtime.run(memory.open("run")).cleans_debris is True
    assert runtime.run(files.open("run")).cleans_debris is False  # its locks are in-process only
    assert runtime.run(KvStoreStorage({"driver": "memory"}, clean_debris=False).open("run")).cleans_debris is False


def test_one_context_is_one_memory_store(runtime):
    import tensorstore as ts  # noqa: PLC0415 - only to share a context between two storages

    context = ts.Context()
    first, second = (KvStoreStorage({"driver": "memory"}, context=context) for _ in range(2))
    runtime.run(runtime.run(first.open("run")).write("ckpt.index", b"one"))
    assert runtime.run(runtime.run(second.open("run")).read("ckpt.index")) == b"one"
    assert runtime.run(runtime.run(KvStoreStorage({"driver": "memory"}).open("run")).read("ckpt.index")) is None


def test_files_only_programs_never_import_tensorstore(tmp_path):
    program = textwrap.dedent(
        """
        import sys
        import numpy as np
        import asyncckpt as ac, asyncckpt.cli
        ac.Checkpoint(v=ac.Variable(np.arange(3.0))).save(sys.argv[1])
        assert "tensorstore" not in sys.modules, "saving to files imported tensorstore"
        from asyncckpt.io.storage import KvStoreStorage
        assert "tensorstore" in sys.modules and KvStoreStorage.__module__ == "asyncckpt.io.storage.kvstore"
        """
    )
    result = subprocess.run([sys.executable, "-c", program, str(tmp_path / "ckpt")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
