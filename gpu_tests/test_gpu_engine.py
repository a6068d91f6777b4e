"""The device staging engine (asyncckpt._cuda) on a real GPU through CuPy.

The same properties tests/test_cuda_*.py check on the CPU simulation: captures ordered after the
kernel running at save time and unaffected by later work, no host synchronisation in save except
the host_copy fallback, pinned pool bounded and reused, uploads ordered on the current stream.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from asyncckpt import _arrays, _cuda

MiB = 1 << 20


@pytest.fixture
def backend(cp):
    return _cuda.cupy_backend(cp.cuda.Device().id)


def make_stager(backend, policy, *, pinned_bytes=64 * MiB, chunk_bytes=4 * MiB):
    if policy == _cuda.DEVICE_COPY:
        return _cuda.Stager(backend, pinned_bytes=pinned_bytes, chunk_bytes=chunk_bytes)
    if policy == _cuda.STREAM_WAIT:
        return _cuda.Stager(backend, pinned_bytes=pinned_bytes, chunk_bytes=chunk_bytes, safety_factor=math.inf)
    return _cuda.Stager(backend, pinned_bytes=chunk_bytes, chunk_bytes=chunk_bytes, safety_factor=math.inf)


def read_all(capture) -> np.ndarray:
    out = np.empty(capture.shape, dtype=capture.dtype)
    capture.read_into(0, out.reshape(-1).view(np.uint8))
    return out


def test_cupy_backend_satisfies_the_protocol(backend):
    assert isinstance(backend, _cuda.DeviceBackend)
    free, total = backend.mem_info()
    assert 0 < free <= total


def test_each_device_has_one_backend_and_one_stager(cp, backend):
    assert _cuda.cupy_backend(backend.device_id) is backend
    assert _cuda.backend_for(cp.zeros(4)) is backend
    assert _cuda.stager_for(backend) is _cuda.stager_for(backend)


@pytest.mark.parametrize("policy", [_cuda.DEVICE_COPY, _cuda.STREAM_WAIT])
def test_capture_waits_for_the_running_kernel_without_synchronising_and_ignores_later_work(cp, backend, spin, policy):
    x = cp.zeros(3 * MiB, dtype=cp.float64)  # 24 MiB: six chunks
    stager = make_stager(backend, policy)
    stager.warm_up()  # allocating pinned memory (once per process) may synchronise; keep it out of save
    scratch = cp.empty_like(x)  # leaves a cached block in CuPy's pool for the device copy, as in
    del scratch  # a training loop past its first step (cudaMalloc itself may synchronise)
    spin(x, 1.0, milliseconds=500)
    before = cp.cuda.get_current_stream().record()
    (capture,) = stager.stage([x], labels=["x"])
    assert capture.policy == policy
    assert not before.done, "stage() waited for the device"
    x.fill(2.0)  # training goes on right after save()
    values = read_all(capture)
    assert (values == 1.0).all()
    assert (x == 2.0).all()


def test_host_copy_is_the_fallback_that_waits(cp, backend, spin):
    x = cp.zeros(MiB, dtype=cp.float64)  # 8 MiB, pool of one 4 MiB buffer, no device copy allowed
    spin(x, 3.0, milliseconds=200)
    (capture,) = make_stager(backend, _cuda.HOST_COPY).stage([x])
    assert capture.policy == _cuda.HOST_COPY
    x.fill(4.0)
    assert (read_all(capture) == 3.0).all()


def test_chunks_arrive_in_order_and_the_pinned_pool_stays_within_budget(cp, backend):
    stager = make_stager(backend, _cuda.DEVICE_COPY, pinned_bytes=8 * MiB, chunk_bytes=2 * MiB)
    arrays = [cp.arange(i, i + 5 * MiB // 4, dtype=cp.int32) for i in range(3)]  # 5 MiB each
    for _ in range(2):  # the second save reuses the pinned buffers
        captures = stager.stage(arrays)
        for capture, array in zip(captures, arrays):
            assert capture.num_chunks == 3
            joined = b"".join(bytes(view) for _, view in capture.chunks())
            assert joined == cp.asnumpy(array).tobytes()
            assert stager.pool.allocated_bytes <= 8 * MiB
    assert stager.stats["prefetched"] > 0


def test_every_dtype_and_non_contiguous_views(cp, backend):
    stager = make_stager(backend, _cuda.STREAM_WAIT)
    rng = np.random.default_rng(0)
    for dtype in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                  "float16", "float32", "float64", "complex64", "complex128"):
        host = (rng.standard_normal((33, 17)) * 50).astype(dtype)
        device = cp.asarray(host)
        captures = stager.stage([device, device.T[::3]])
        np.testing.assert_array_equal(read_all(captures[0]), host)
        np.testing.assert_array_equal(read_all(captures[1]), host.T[::3])


def test_upload_is_ordered_after_the_running_kernel_and_before_later_work(cp, backend, spin):
    target = cp.zeros(2 * MiB, dtype=cp.float64)
    spin(target, 5.0, milliseconds=300)
    before = cp.cuda.get_current_stream().record()
    stager = make_stager(backend, _cuda.DEVICE_COPY)
    stager.warm_up()  # fresh buffers: the upload has no reason to wait on the host
    host = np.arange(target.size, dtype=np.float64)
    stager.upload(host, target)
    assert not before.done, "upload() waited for the device"
    doubled = target * 2  # later work on the current stream sees the uploaded values
    np.testing.assert_array_equal(cp.asnumpy(doubled), host * 2)


def test_upload_through_a_small_pool_and_into_a_view(cp, backend):
    stager = make_stager(backend, _cuda.DEVICE_COPY, pinned_bytes=2 * MiB, chunk_bytes=1 * MiB)
    host = np.random.default_rng(1).standard_normal(3 * MiB)  # 24 MiB through two 1 MiB buffers
    target = cp.empty(host.shape, host.dtype)
    stager.upload(host, target)
    np.testing.assert_array_equal(cp.asnumpy(target), host)
    base = cp.zeros((64, 32), cp.float32)
    stager.upload(np.ones(64, np.float32), base[:, 5])
    expected = np.zeros((64, 32), np.float32)
    expected[:, 5] = 1
    np.testing.assert_array_equal(cp.asnumpy(base), expected)


def test_training_on_a_non_default_stream(cp, backend, spin):
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        x = cp.zeros(MiB, dtype=cp.float64)
        spin(x, 6.0, milliseconds=200)
        (capture,) = make_stager(backend, _cuda.STREAM_WAIT).stage([x])
        x.fill(7.0)
    assert (read_all(capture) == 6.0).all()
    stream.synchronize()
    assert (x == 7.0).all()


def test_array_seam_on_cupy(cp):
    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    device = _arrays.as_array(host, device="cuda:0")
    assert isinstance(device, cp.ndarray) and device.device.id == 0
    np.testing.assert_array_equal(cp.asnumpy(device), host)
    copy = _arrays.as_array(device)
    assert isinstance(copy, cp.ndarray) and copy.data.ptr != device.data.ptr
    _arrays.copy_into(device, host * 2)
    np.testing.assert_array_equal(_arrays.to_numpy(device), host * 2)
    assert _arrays.array_module(device) is cp
    assert _arrays.is_device_array(device) and not _arrays.is_device_array(host)


def test_snapshot_entry_point_groups_arrays_by_device(cp):
    arrays = [cp.arange(10, dtype=cp.int64)]
    if cp.cuda.runtime.getDeviceCount() > 1:
        with cp.cuda.Device(1):
            arrays.append(cp.arange(20, dtype=cp.int64))
    captures = _cuda.snapshot_device_arrays(arrays, labels=[f"a{i}" for i in range(len(arrays))])
    for capture, array in zip(captures, arrays):
        np.testing.assert_array_equal(read_all(capture), cp.asnumpy(array))
