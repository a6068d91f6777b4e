"""The NumPy/CuPy seam (asyncckpt._arrays): host behaviour, device detection, and device paths on the fake backend."""

from __future__ import annotations

import numpy as np
import pytest

from asyncckpt import _arrays, _cuda
from asyncckpt.testing.fake_device import FakeDeviceArray, FakeDeviceBackend

NO_CUPY = _arrays.cupy_module() is None


@pytest.fixture
def fake():
    backend = FakeDeviceBackend(memory_bytes=1 << 20)
    yield backend
    backend.close()


class CudaArrayInterfaceOnly:
    """Stands for a Numba/PyTorch CUDA array: only the protocol attribute matters to detection."""

    __cuda_array_interface__ = {"shape": (2,), "typestr": "<f4", "data": (0, False), "version": 3}


class DLPackOn:
    def __init__(self, device_type: int) -> None:
        self._device = (device_type, 0)

    def __dlpack__(self, stream=None):
        raise NotImplementedError

    def __dlpack_device__(self):
        return self._device


class CpuTensorLike:
    """Like a PyTorch CPU tensor: the CUDA interface property raises AttributeError."""

    @property
    def __cuda_array_interface__(self):
        raise AttributeError("Can't get __cuda_array_interface__ on non-CUDA tensor")

    def __dlpack_device__(self):
        return (1, 0)


# ---------------------------------------------------------------------------------------------
# Detection


def test_host_values_are_not_device_arrays():
    for value in (np.zeros(3), np.float32(1), [1, 2], 3.0, CpuTensorLike(), DLPackOn(1), DLPackOn(3)):
        assert not _arrays.is_device_array(value), value


def test_gpu_protocols_mark_device_arrays():
    assert _arrays.is_device_array(CudaArrayInterfaceOnly())
    assert _arrays.is_device_array(DLPackOn(2))  # kDLCUDA
    assert _arrays.is_device_array(DLPackOn(13))  # kDLCUDAManaged


class GradTensorLike:
    """Like a PyTorch CUDA tensor that requires grad: the CUDA interface property raises RuntimeError."""

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")

    def __dlpack_device__(self):
        return (2, 0)


def test_a_gpu_tensor_refusing_the_cuda_interface_is_still_found_through_dlpack():
    assert _arrays.is_device_array(GradTensorLike())


def test_fake_arrays_are_device_arrays_only_where_the_fake_backend_is_passed(fake):
    x = fake.array([1.0, 2.0])
    assert not _arrays.is_device_array(x)
    assert _arrays.is_device_array(x, fake)
    assert not _arrays.is_device_array(np.zeros(2), fake)
    other = FakeDeviceBackend()
    try:
        assert not _arrays.is_device_array(x, other)
    finally:
        other.close()


def test_array_module_of_host_values_is_numpy():
    assert _arrays.array_module(np.zeros(2)) is np


# ---------------------------------------------------------------------------------------------
# Host behaviour


def test_as_array_copies_and_makes_byte_order_native():
    source = np.arange(4, dtype=">i4")
    array = _arrays.as_array(source)
    assert array.dtype == np.dtype("int32") and array.dtype.isnative
    np.testing.assert_array_equal(array, [0, 1, 2, 3])
    source[0] = 9
    assert array[0] == 0


def test_as_array_casts_and_accepts_cpu_device_names():
    assert _arrays.as_array([1, 2], dtype=np.float16, device="CPU").dtype == np.float16


@pytest.mark.parametrize("dtype", ["U3", "O", "datetime64[s]"])
def test_unstorable_dtypes_are_refused(dtype):
    with pytest.raises(TypeError, match="cannot be stored in a checkpoint"):
        _arrays.as_array(np.zeros(2, dtype=dtype))


@pytest.mark.parametrize("device", ["tpu", "metal:0"])
def test_unknown_devices_are_refused(device):
    with pytest.raises(ValueError, match=f"unknown device {device!r}"):
        _arrays.as_array(1.0, device=device)


@pytest.mark.skipif(not NO_CUPY, reason="this machine has CuPy and a GPU")
def test_asking_for_a_gpu_without_cupy_says_how_to_get_one():
    with pytest.raises(RuntimeError, match=r"pip install asyncckpt\[cuda\]"):
        _arrays.as_array([1.0], device="cuda:0")
    with pytest.raises(RuntimeError, match="CuPy with a usable GPU is not available"):
        _arrays.array_module(CudaArrayInterfaceOnly())


def test_to_numpy_returns_a_copy():
    source = np.arange(3)
    copy = _arrays.to_numpy(source)
    copy[0] = 7
    assert source[0] == 0


def test_copy_into_on_the_host_refuses_casts():
    destination = np.zeros(3, np.float32)
    _arrays.copy_into(destination, np.ones(3, np.float32))
    np.testing.assert_array_equal(destination, 1)
    with pytest.raises(TypeError):
        _arrays.copy_into(destination, np.ones(3, np.float64))


def test_adopting_host_values_returns_them_unchanged():
    value = np.zeros(2)
    assert _arrays.adopt_device_array(value) is value


# ---------------------------------------------------------------------------------------------
# Device paths, on the fake backend


def test_host_value_to_device_goes_through_a_pinned_upload(fake):
    array = _arrays.as_array(np.arange(6, dtype=">f8").reshape(2, 3), device="cuda", backend=fake)
    assert isinstance(array, FakeDeviceArray)
    assert array.dtype == np.float64 and array.shape == (2, 3)
    np.testing.assert_array_equal(fake.peek(array), np.arange(6.0).reshape(2, 3))
    assert fake.copies["h2d"] == 1
    assert _cuda.stager_for(fake).stats["uploaded_chunks"] == 1


def test_device_value_copies_stay_on_the_device_or_come_home(fake):
    x = fake.array(np.arange(4, dtype=np.int16))
    on_device = _arrays.as_array(x, backend=fake)
    assert _arrays.is_device_array(on_device, fake) and on_device is not x
    np.testing.assert_array_equal(fake.peek(on_device), np.arange(4))
    home = _arrays.as_array(x, device="cpu", backend=fake)
    assert isinstance(home, np.ndarray)
    np.testing.assert_array_equal(home, np.arange(4))
    np.testing.assert_array_equal(_arrays.to_numpy(x, fake), np.arange(4))


def test_to_numpy_of_a_device_array_waits_for_pending_work(fake):
    x = fake.array(np.zeros(5, np.float32))
    fake.launch(fake.default_stream, lambda data: data.fill(4), x)
    np.testing.assert_array_equal(_arrays.to_numpy(x, fake), np.full(5, 4, np.float32))


def test_copy_into_a_device_array_uploads_a_host_value(fake):
    """What Variable._restore_from_tensors does with a NumPy checkpoint value and a device variable."""
    destination = fake.array(np.zeros((2, 3), np.float32))
    _arrays.copy_into(destination, np.arange(6, dtype=np.float32).reshape(2, 3), fake)
    np.testing.assert_array_equal(fake.peek(destination), np.arange(6).reshape(2, 3))
    assert fake.copies["h2d"] == 1
    _arrays.copy_into(destination, np.float32(7), fake)  # a scalar broadcasts like ndarray.set would
    np.testing.assert_array_equal(fake.peek(destination), np.full((2, 3), 7))


def test_copy_into_between_host_and_device_both_ways(fake):
    device = fake.array(np.arange(3, dtype=np.int64))
    host = np.zeros(3, np.int64)
    _arrays.copy_into(host, device, fake)
    np.testing.assert_array_equal(host, [0, 1, 2])
    other = fake.array(np.full(3, 5, np.int64))
    _arrays.copy_into(device, other, fake)
    np.testing.assert_array_equal(fake.peek(device), [5, 5, 5])


def test_adopting_a_fake_array_returns_the_same_array(fake):
    x = fake.array([1])
    assert _arrays.adopt_device_array(x, fake) is x
