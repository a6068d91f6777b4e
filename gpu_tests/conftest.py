"""GPU test tier: real CuPy on an NVIDIA GPU. Run with ``pytest gpu_tests``.

On a machine without CuPy or without a usable CUDA device every test here is reported as skipped,
with the reason, instead of failing to import: the test modules never import CuPy themselves; they
receive it from the ``cp`` fixture.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # shared sample values: tests/_samples.py


def _why_no_gpu() -> str | None:
    try:
        with warnings.catch_warnings():  # a CUDA-path warning at import is not a test failure
            warnings.simplefilter("ignore")
            import cupy  # noqa: PLC0415 - optional dependency
    except Exception as exc:
        return f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no usable CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return "no CUDA device"
    return None


SKIP_REASON = _why_no_gpu()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (in the project's addopts) means one process here: the tests share one GPU and
    measure its free and pinned memory."""
    return 0


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if SKIP_REASON is not None:
                item.add_marker(pytest.mark.skip(reason=f"GPU tier skipped: {SKIP_REASON}"))


@pytest.fixture
def cp():
    """The ``cupy`` module, with the default memory pools emptied after the test."""
    import cupy  # noqa: PLC0415

    yield cupy
    cupy.cuda.Device().synchronize()
    cupy.get_default_memory_pool().free_all_blocks()


def _wrap_external_stream(cupy, stream):
    """A CuPy stream wrapping another framework's stream (e.g. ``torch.cuda.Stream``)."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        with contextlib.suppress(TypeError, AttributeError):  # an object without the stream protocol
            return from_external(stream)
    with warnings.catch_warnings():  # the older spelling, deprecated in newer CuPy
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(stream.cuda_stream)


@pytest.fixture
def external_stream(cp):
    """``external_stream(stream)``: a CuPy stream for another framework's stream, to make current."""
    return lambda stream: _wrap_external_stream(cp, stream)


@pytest.fixture
def prefix(tmp_path):
    return str(tmp_path / "ckpt")


@pytest.fixture
def spin(cp):
    """``spin(array, value, milliseconds)``: a kernel that busy-waits, then fills ``array`` (float64).

    Enqueued on the current stream, it is still running when the next host line executes, which is
    how the tests put "a kernel writing the array" in flight at save time.
    """
    kernel = cp.RawKernel(
        r"""
        extern "C" __global__ void spin_then_fill(double* x, long long n, long long cycles, double value) {
            long long start = clock64();
            while (clock64() - start < cycles) { }
            long long i = (long long)blockDim.x * blockIdx.x + threadIdx.x;
            if (i < n) x[i] = value;
        }
        """,
        "spin_then_fill",
    )
    # clockRate (kHz) left cudaDeviceProp in CUDA 13; assume 2 GHz there (the spin is then a bit shorter or longer).
    rate_khz = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id).get("clockRate") or 2_000_000

    def launch(array, value: float, milliseconds: int = 300) -> None:
        assert array.dtype == cp.float64 and array.flags.c_contiguous
        n = array.size
        threads = 256
        blocks = max(1, (n + threads - 1) // threads)
        kernel((blocks,), (threads,), (array, cp.int64(n), cp.int64(rate_khz * milliseconds), cp.float64(value)))

    return launch
