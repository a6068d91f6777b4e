"""The NumPy/CuPy seam: every array operation that depends on where an array lives goes here.

This is the only module that imports ``cupy``, and it does so lazily, so the package imports and
works on machines without CuPy or without a GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

__all__ = [
    "cupy_module",
    "is_device_array",
    "as_array",
    "to_numpy",
    "copy_into",
    "array_module",
    "check_dtype_supported",
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


def is_device_array(value: Any) -> bool:
    """True for arrays that live in GPU memory (CuPy, or anything with ``__cuda_array_interface__``)."""
    return type(value).__module__.split(".")[0] == "cupy" or hasattr(value, "__cuda_array_interface__")


def _require_cupy():
    cupy = cupy_module()
    if cupy is None:
        raise RuntimeError(
            "a CUDA device array was requested but CuPy with a usable GPU is not available; "
            "install the 'cuda' extra (pip install asyncckpt[cuda]) on a machine with a GPU"
        )
    return cupy


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


_STORABLE_DTYPES = frozenset(
    np.dtype(name)
    for name in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "complex64", "complex128",
    )
)


def check_dtype_supported(dtype: np.dtype) -> np.dtype:
    """Reject dtypes a checkpoint cannot store as raw little-endian bytes (object, str, longdouble…)."""
    dtype = np.dtype(dtype)
    if dtype.newbyteorder("=") not in _STORABLE_DTYPES:
        raise TypeError(
            f"dtype {dtype} cannot be stored in a checkpoint; use a numeric or bool dtype (bool, "
            "(u)int8-64, float16/32/64, complex64/128); strings and Python objects belong in a PythonState"
        )
    return dtype


def as_array(value: Any, dtype: Any = None, device: str | None = None):
    """Return a new array owning a copy of ``value``, on ``device`` (default: where ``value`` lives)."""
    ordinal = _parse_device(device)
    if ordinal is not None or (device is None and is_device_array(value)):
        cupy = _require_cupy()
        with cupy.cuda.Device(ordinal if ordinal is not None else cupy.cuda.Device().id):
            array = cupy.array(value, dtype=dtype, copy=True)
    else:
        if is_device_array(value):
            value = to_numpy(value)
        array = np.array(value, dtype=dtype, copy=True)
    check_dtype_supported(array.dtype)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def to_numpy(value: Any) -> np.ndarray:
    """A host copy of ``value`` as a NumPy array (never a view of the original)."""
    if is_device_array(value):
        cupy = _require_cupy()
        return cupy.asnumpy(cupy.asarray(value))
    return np.array(value, copy=True)


def copy_into(destination: Any, source: Any) -> None:
    """Copy ``source`` into ``destination`` in place, across host and device as needed."""
    destination_on_device = is_device_array(destination)
    source_on_device = is_device_array(source)
    if destination_on_device and not source_on_device:
        destination.set(np.ascontiguousarray(source, dtype=destination.dtype).reshape(destination.shape))
    elif source_on_device and not destination_on_device:
        cupy = _require_cupy()
        np.copyto(destination, cupy.asnumpy(source).reshape(destination.shape), casting="no")
    elif destination_on_device:
        destination[...] = source
    else:
        np.copyto(destination, source, casting="no")
