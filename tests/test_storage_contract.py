"""The backend contract (asyncckpt.testing.storage_contract) for every storage the package ships."""

from __future__ import annotations

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
