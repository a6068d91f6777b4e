"""Fixtures shared by the behaviour suites (``tests/test_behaviours_*.py``); assert rewriting for contracts."""

from __future__ import annotations

import logging
import os

import pytest

# JAX tests run on several CPU devices (sharded arrays); the flag must be set before JAX starts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

# The backend contract's asserts live in the package; have pytest explain their failures too.
pytest.register_assert_rewrite("asyncckpt.testing.storage_contract")

import asyncckpt as ac  # noqa: E402


@pytest.fixture
def prefix(tmp_path):
    """A checkpoint prefix (as ``str``) inside a fresh, empty directory."""
    return str(tmp_path / "ckpt")


@pytest.fixture
def ac_log(caplog):
    """``caplog`` recording every level the ``asyncckpt`` logger emits."""
    caplog.set_level(logging.DEBUG, logger="asyncckpt")
    return caplog


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def save_options(request):
    """Save options for both write modes; async results must equal sync results."""
    return ac.CheckpointOptions(enable_async=request.param)
