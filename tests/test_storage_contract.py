"""The backend contract (asyncckpt.testing.storage_contract) for every storage the package ships."""

from __future__ import annotations

import subprocess
import sys

import pytest

from asyncckpt.io.storage import BackendWrapper, FileStorage, KvStoreStorage
from asyncckpt.testing.storage import WrappingStorage
from asyncckpt.testing.storage_contract import BackendContract


class TestFileStorage(BackendContract):
    @pytest.fixture
    def storage_factory(self):
        return FileStorage

    @pytest.fixture
    def root(self, tmp_path):
        return str(tmp_path)


class TestFileStorageThroughABackendWrapper(BackendContract):
    """A wrapper that overrides nothing keeps every promise (the defaults it inherits included)."""

    @pytest.fixture
    def storage_factory(self):
        return lambda: WrappingStorage(FileStorage(), BackendWrapper)

    @pytest.fixture
    def root(self, tmp_path):
        return str(tmp_path)


class TestKvStoreOnMemory(BackendContract):
    @pytest.fixture
    def storage_factory(self):
        return lambda: KvStoreStorage({"driver": "memory"})

    @pytest.fixture
    def root(self):
        return "bucket"


class TestKvStoreOnFiles(BackendContract):
    @pytest.fixture
    def storage_factory(self, tmp_path):
        return lambda: KvStoreStorage({"driver": "file", "path": f"{tmp_path}/"})

    @pytest.fixture
    def root(self):
        return "bucket"


class TestS3OnALocalServer(BackendContract):
    """S3Storage against a real S3 server (moto): conditional commits, leases for locks."""

    @pytest.fixture
    def storage_factory(self, bucket):
        from asyncckpt.io.storage.s3 import S3Storage

        return lambda: S3Storage(bucket)

    @pytest.fixture
    def root(self, bucket):
        return f"s3://{bucket}"

    def test_a_held_lock_excludes_other_processes(self, storage, folder, backend, run):
        """The contract's check, in a spawned interpreter: TensorStore refuses to run in a forked child."""
        lock = run(backend.lock_new("ckpt.data-0123456789abcdef.lock"))
        program = (
            "import asyncio, sys\n"
            "from asyncckpt.io.storage.s3 import S3Storage\n"
            "async def check():\n"
            f"    other = await S3Storage({storage.bucket!r}).open({folder!r})\n"
            "    name = 'ckpt.data-0123456789abcdef.lock'\n"
            "    return await other.try_lock(name) is None and await other.lock_new(name) is None\n"
            "sys.exit(0 if asyncio.run(check()) else 1)\n"
        )
        try:
            assert subprocess.run([sys.executable, "-c", program], timeout=60).returncode == 0
        finally:
            run(lock.release())
