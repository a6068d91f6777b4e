"""Restoring into CuPy arrays through pinned buffers: round trips and stream ordering on a real GPU.

``CheckpointReader.read_many(out={key: cupy_array})`` and ``Checkpoint.restore`` into device
variables read each window of a value straight into a pinned buffer and upload it asynchronously on
the stager's upload stream, ordered after the work pending on the current stream; later work on
that stream waits for the uploads. The stager's counters show which path ran.
"""

from __future__ import annotations

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import _cuda
from asyncckpt import io as ckio
from asyncckpt.errors import CorruptCheckpointError

from _samples import DTYPES, sample  # tests/_samples.py, on the path through conftest.py

SMALL_FILES = ac.WriteSettings(chunk_bytes=1 << 20, pack_bytes=1 << 20, staging_budget_bytes=4 << 20)


@pytest.fixture
def stager(cp):
    """A stager of device 0 with 256 KiB windows: a few MiB span many windows and data files."""
    stager = _cuda.Stager(_cuda.cupy_backend(cp.cuda.Device().id), pinned_bytes=1 << 20, chunk_bytes=256 << 10)
    yield stager
    stager.close()


def write(prefix, arrays: dict[str, np.ndarray]) -> str:
    entries = [ckio.SaveEntry(key, value) for key, value in arrays.items()]
    return ckio.start_write(prefix, entries, {"nodes": []}, settings=SMALL_FILES).result()


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_and_shape_round_trips_into_cupy_arrays(cp, prefix, stager, dtype):
    saved = {
        "scalar": sample(dtype, (), 1),
        "empty": sample(dtype, (0, 3), 2),
        "cube": sample(dtype, (3, 4, 5), 3),
        "big": sample(dtype, (3 << 20) // np.dtype(dtype).itemsize, 4),  # 3 MiB: 3 files, 12 windows
    }
    path = write(prefix, saved)
    out = {key: cp.empty(value.shape, dtype=value.dtype) for key, value in saved.items()}
    result = ckio.open_reader(path).read_many(saved, out=out, stager=stager)
    cp.cuda.get_current_stream().synchronize()
    for key, value in saved.items():
        assert result[key] is out[key]
        assert cp.asnumpy(out[key]).tobytes() == value.tobytes(), key
    assert stager.stats["uploaded_chunks"] >= 12


def test_checkpoint_restore_reads_device_variables_through_pinned_buffers(cp, prefix):
    saved = sample("float32", (1 << 20,), 5)  # 4 MiB
    path = ac.Checkpoint(v=ac.Variable(saved), small=ac.Variable(np.arange(3.0))).save(prefix)
    default = _cuda.stager_for(_cuda.cupy_backend(cp.cuda.Device().id))
    before = default.stats["uploaded_chunks"] + default.stats["direct_uploads"]
    restored, small = ac.Variable(cp.zeros_like(cp.asarray(saved))), ac.Variable(cp.zeros(3))
    live = restored.array
    ac.Checkpoint(v=restored, small=small).restore(path).assert_consumed()
    assert restored.array is live  # filled in place, no new array
    np.testing.assert_array_equal(restored.numpy(), saved)
    np.testing.assert_array_equal(small.numpy(), np.arange(3.0))
    assert default.stats["uploaded_chunks"] + default.stats["direct_uploads"] > before


def test_uploads_run_after_pending_work_and_later_work_waits_for_them(cp, prefix, spin, stager):
    saved = np.arange(1 << 18, dtype=np.float64)  # 2 MiB: 8 windows
    path = write(prefix, {"x": saved})
    training = cp.cuda.Stream(non_blocking=True)  # a training stream other than the default one
    target = cp.zeros(saved.shape, cp.float64)
    with training:
        spin(target, 7.0, milliseconds=300)  # still writing the target when the restore starts
        ckio.open_reader(path).read_many(["x"], out={"x": target}, stager=stager)
        target += 1.0  # later work on the same stream sees the restored values
    training.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(target), saved + 1.0)


def test_a_corrupted_byte_raises_naming_the_key(cp, prefix, stager, tmp_path):
    saved = sample("float32", (1 << 18,), 6)  # 1 MiB: one file, 4 windows
    path = write(prefix, {"x": saved})
    (data_file,) = [p for p in tmp_path.rglob("*") if p.is_file() and ".data-" in str(p.parent)]
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data_file.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="key 'x'.*fails its checksum"):
        ckio.open_reader(path).read_many(["x"], out={"x": cp.empty(saved.shape, cp.float32)}, stager=stager)
