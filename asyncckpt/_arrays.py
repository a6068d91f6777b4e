"""The NumPy/CuPy seam: every array operation that depends on where an array lives goes here.

This module and :mod:`asyncckpt._cuda.cupy` (the copy engine's CuPy backend) are the only importers
of ``cupy``, both lazily, so the package imports and works on machines without CuPy or without a GPU.

Host-to-device copies (creating a device variable from a checkpoint value, copying a host value
into one) go through :func:`asyncckpt._cuda.upload`: pinned buffers and asynchronous copies ordered
on the current stream. A restore into an existing device variable reads from storage straight into
pinned buffers and uploads them (:func:`device_target` gives the reader the backend and array).
Functions take an optional ``backend`` (a :class:`~asyncckpt._cuda.DeviceBackend`); by default
device arrays are CuPy arrays or foreign GPU arrays (PyTorch, JAX, Numba) adopted without a copy.
Tests pass a :class:`~asyncckpt.testing.fake_device.FakeDeviceBackend`, whose arrays count as
device arrays only where that backend is passed.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from asyncckpt import _cuda
from asyncckpt.dtypes import check_dtype_supported

__all__ = [
    "cupy_module",
    "is_device_array",
    "adopt_device_array",
    "device_target",
    "as_array",
    "to_numpy",
    "capture_device_arrays",
    "plan_device_capture",
    "copy_into",
    "array_module",
]


@functools.lru_cache(maxsize=1)
def cupy_module():
    """Return the ``cupy`` module, or ``None`` when CuPy or a usable device is missing."""
    try:
        import cupy  # noqa: PLC0415 - optional dependency, imported on first use only
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    return cupy


def is_device_array(value: Any, backend: _cuda.DeviceBackend | None = None) -> bool:
    """True for arrays in GPU memory.

    Without ``backend``: CuPy arrays and anything exposing CUDA memory through
    ``__cuda_array_interface__`` or DLPack (PyTorch CUDA tensors, JAX GPU arrays). With
    ``backend``: the arrays that backend owns.
    """
    if backend is not None:
        return backend.is_device_array(value)
    return _cuda.is_cuda_array(value)


def _require_cupy():
    cupy = cupy_module()
    if cupy is None:
        raise RuntimeError(
            "a CUDA device array was requested but CuPy with a usable GPU is not available; "
            "install the 'cuda' extra (pip install asyncckpt[cuda]) on a machine with a GPU"
        )
    return cupy


def _backend_of(value: Any, backend: _cuda.DeviceBackend | None) -> _cuda.DeviceBackend:
    if backend is not None:
        return backend
    _require_cupy()
    return _cuda.backend_for(value)


def adopt_device_array(value: Any, backend: _cuda.DeviceBackend | None = None):
    """The backend's own array viewing a device array's memory (CuPy for foreign arrays), no copy.

    Other values are returned unchanged. Lets callers treat a PyTorch/JAX GPU tensor as a CuPy
    array (dtype, shape, in-place writes) without copying it.
    """
    if not is_device_array(value, backend):
        return value
    return _backend_of(value, backend).adopt(value)


def device_target(value: Any, backend: _cuda.DeviceBackend | None = None) -> tuple[_cuda.DeviceBackend, Any] | None:
    """``(backend, array)`` for a device array, else ``None``.

    ``backend`` is the one that copies into ``value`` (its CuPy backend, or the given one) and
    ``array`` that backend's own array viewing ``value``'s memory (no copy): what a reader needs
    to upload bytes into ``value`` at byte offsets. Host values (NumPy arrays and anything else)
    give ``None``.
    """
    if not is_device_array(value, backend):
        return None
    target_backend = _backend_of(value, backend)
    return target_backend, target_backend.adopt(value)


def array_module(value: Any):
    """``numpy`` or ``cupy``, whichever owns ``value``."""
    return _require_cupy() if is_device_array(value) else np


def _parse_device(device: str | None) -> int | None:
    """Map ``None``/"cpu" to None and "cuda"/"cuda:N"/"gpu:N" to a device ordinal."""
    if device is None or device.lower() == "cpu":
        return None
    kind, _, ordinal = device.lower().partition(":")
    if kind not in ("cuda", "gpu"):
        raise ValueError(f"unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'")
    return int(ordinal) if ordinal else 0


def as_array(value: Any, dtype: Any = None, device: str | None = None, backend: _cuda.DeviceBackend | None = None):
    """Return a new array owning a copy of ``value``, on ``device`` (default: where ``value`` lives).

    A host value bound for the device is uploaded through pinned buffers (:func:`_cuda.upload`);
    a device value stays on its device (a device-to-device copy on the current stream).
    """
    ordinal = _parse_device(device)
    on_device = is_device_array(value, backend)
    if ordinal is None and (device is not None or not on_device):
        host = to_numpy(value, backend) if on_device else value
        return _native(np.array(host, dtype=dtype, copy=True))
    if backend is None:
        cupy = _require_cupy()
    if on_device:
        source_backend = _backend_of(value, backend)
        target = source_backend.device_id if ordinal is None else ordinal
        if backend is None and target == source_backend.device_id:
            with cupy.cuda.Device(target):
                array = cupy.array(source_backend.adopt(value), dtype=dtype, copy=True)
            check_dtype_supported(array.dtype)
            return array
        host = to_numpy(value, backend)  # to another device (or within a fake): through the host
    else:
        host, target = value, ordinal
    target_backend = backend if backend is not None else _cuda.cupy_backend(target)
    return _upload_new(target_backend, _native(np.asarray(host, dtype=dtype)))


def _native(array: np.ndarray) -> np.ndarray:
    check_dtype_supported(array.dtype)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _upload_new(backend: _cuda.DeviceBackend, host: np.ndarray):
    array = backend.empty(host.shape, host.dtype)
    _cuda.upload(backend, host, array)
    return array


def to_numpy(value: Any, backend: _cuda.DeviceBackend | None = None) -> np.ndarray:
    """A host copy of ``value`` as a NumPy array (never a view of the original).

    For a device array the copy is ordered after the current stream's pending work and waits for it.
    """
    if is_device_array(value, backend):
        if backend is None:
            cupy = _require_cupy()
            return cupy.asnumpy(_cuda.CupyBackend.adopt_foreign(value))
        return _cuda.download(backend, value)
    return np.array(value, copy=True)


def capture_device_arrays(
    arrays: list[Any], labels: list[str], pinned_bytes: int, backend: _cuda.DeviceBackend | None = None
) -> list[_cuda.DeviceCapture]:
    """Start copying device ``arrays`` to pinned host buffers as they will be once pending work is done.

    Does not wait for the device (see :meth:`asyncckpt._cuda.Stager.stage` for the policies);
    ``pinned_bytes`` caps the pinned pool. Without ``backend`` the arrays may live on several GPUs.
    """
    if backend is None:
        _require_cupy()
        return _cuda.snapshot_device_arrays(arrays, labels=labels, pinned_bytes=pinned_bytes)
    return _cuda.stage_device_arrays(backend, arrays, labels=labels, pinned_bytes=pinned_bytes)


def plan_device_capture(
    arrays: list[Any], labels: list[str], backend: _cuda.DeviceBackend | None = None
) -> _cuda.CapturePlan:
    """A :class:`~asyncckpt._cuda.CapturePlan` for device ``arrays``: made once, captured at every save."""
    if backend is None:
        _require_cupy()
    return _cuda.CapturePlan(arrays, labels, backend)


def copy_into(destination: Any, source: Any, backend: _cuda.DeviceBackend | None = None) -> None:
    """Copy ``source`` into ``destination`` in place, across host and device as needed.

    Host to device goes through :func:`_cuda.upload` (pinned, asynchronous, ordered on the current
    stream); device to host waits for the copy.
    """
    destination_on_device = is_device_array(destination, backend)
    source_on_device = is_device_array(source, backend)
    if destination_on_device and not source_on_device:
        target_backend = _backend_of(destination, backend)
        target = target_backend.adopt(destination)
        host = np.asarray(source)
        if host.size != target.size:  # a scalar, or another value that broadcasts to the target
            host = np.broadcast_to(host, tuple(target.shape))
        _cuda.upload(target_backend, host, target)
    elif source_on_device and not destination_on_device:
        host = to_numpy(source, backend)
        np.copyto(destination, host.reshape(destination.shape), casting="no")
    elif destination_on_device:
        target_backend = _backend_of(destination, backend)
        target = target_backend.adopt(destination)
        source = _backend_of(source, backend).adopt(source)
        if backend is None:
            target[...] = source
        else:
            backend.assign_on_stream(target, source, backend.current_stream())
    else:
        np.copyto(destination, source, casting="no")
