"""JAX arrays on the GPU as save sources, adopted through DLPack without a copy."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import _arrays, _cuda

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to CuPy and the tests
with warnings.catch_warnings():  # a plugin warning at import is not a test failure
    warnings.simplefilter("ignore")
    jax = pytest.importorskip("jax")
    try:
        HAS_GPU = any(device.platform == "gpu" for device in jax.devices())
    except Exception:
        HAS_GPU = False
if not HAS_GPU:
    pytest.skip("JAX has no GPU device", allow_module_level=True)


def test_jax_gpu_arrays_are_captured_at_save_time(cp):
    x = jax.numpy.arange(1000, dtype="float32") * 2
    assert _arrays.is_device_array(x)
    (capture,) = _cuda.snapshot_device_arrays([x], labels=["x"])
    out = np.empty(capture.shape, dtype=capture.dtype)
    capture.read_into(0, out.reshape(-1).view(np.uint8))
    np.testing.assert_array_equal(out, np.arange(1000, dtype=np.float32) * 2)


def test_variable_from_a_jax_array_round_trips_to_numpy_and_cupy(cp, prefix):
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 3))
    variable = ac.Variable(x)  # a CuPy copy on the same device
    assert variable.device.startswith("cuda:")
    path = ac.Checkpoint(v=variable).save(prefix)
    on_host = ac.Variable(np.zeros((64, 3), np.float32))
    ac.Checkpoint(v=on_host).restore(path).assert_consumed()
    np.testing.assert_array_equal(on_host.numpy(), np.asarray(x))
    on_device = ac.Variable(cp.zeros((64, 3), cp.float32))
    ac.Checkpoint(v=on_device).restore(path).assert_consumed()
    np.testing.assert_array_equal(on_device.numpy(), np.asarray(x))
