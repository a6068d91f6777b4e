"""Sample values of every storable dtype, shared by the CPU tests and the GPU tier (``gpu_tests``)."""

from __future__ import annotations

import numpy as np

__all__ = ["DTYPES", "sample"]

#: Every NumPy dtype a checkpoint stores, by name (the ml_dtypes ones are in tests/test_low_precision_dtypes.py).
DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "complex64", "complex128"]


def sample(dtype, shape, seed=0) -> np.ndarray:
    """Random values of ``dtype`` over its whole range (integers to their limits), reproducible by ``seed``."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)
