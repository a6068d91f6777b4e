"""The storage interface's own code: streamed values, the defaults backends inherit, the error helpers."""

from __future__ import annotations

import errno

import pytest

from asyncckpt._runtime import Runtime
from asyncckpt.io.storage import BackendWrapper, FileStorage, StorageError, TruncatedError
from asyncckpt.io.storage.base import from_os_error, storage_error
from asyncckpt.testing.storage import BatchedValue, WrappingStorage


@pytest.fixture(scope="module")
def runtime():
    runtime = Runtime()
    yield runtime
    runtime.close()


def test_a_streamed_value_can_be_read_into_buffers_of_any_size():
    value = BatchedValue((b"012", b"3"), (b"456789",))
    buffer = bytearray(4)
    parts = []
    while got := value.readinto(buffer):
        parts.append(bytes(buffer[:got]))
    assert parts == [b"0123", b"4567", b"89"]


def test_a_streamed_value_is_gathered_once_and_reads_like_bytes():
    value = BatchedValue((b"01", b""), (b"234",))
    assert value.to_bytearray() == bytearray(b"01234")
    assert value.to_bytearray() is value.to_bytearray()
    assert value.served == 2  # gathered once
    assert (len(value), bytes(value), value[1:3]) == (5, b"01234", bytearray(b"12"))
    with pytest.raises(ValueError, match="produced 5 bytes instead of 6"):
        BatchedValue((b"01234",), size=6).to_bytearray()


def test_the_inherited_holds_reports_a_missing_value_as_none_for_every_end(tmp_path, runtime):
    # BackendWrapper forwards read but not holds: this is the default every backend inherits.
    backend = runtime.run(WrappingStorage(FileStorage(), BackendWrapper).open(str(tmp_path)))
    runtime.run(backend.write("empty", b""))
    assert [runtime.run(backend.holds("nothing", end)) for end in (0, 1)] == [None, None]
    assert [runtime.run(backend.holds("empty", end)) for end in (0, 1)] == [True, False]


def test_errors_name_what_failed_and_keep_the_errno():
    error = from_os_error(OSError(errno.ENOSPC, "No space left on device"), "writing /x/y")
    assert isinstance(error, StorageError) and error.errno == errno.ENOSPC
    assert str(error) == "[Errno 28] writing /x/y: No space left on device"
    assert from_os_error(error, "again") is error
    assert storage_error("listing /x", "gone").errno is None
    assert str(storage_error("listing /x", "gone")) == "listing /x: gone"
    assert issubclass(TruncatedError, StorageError) and issubclass(StorageError, OSError)
