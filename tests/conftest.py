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


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 server (moto) for the whole run, its endpoint and credentials in the environment."""
    pytest.importorskip("moto.server", reason="the S3 tests need moto's server (the test extra)")
    from _s3_server import S3Server

    server = S3Server()
    saved = {name: os.environ.get(name) for name in server.environment}
    os.environ.update(server.environment)
    try:
        yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh bucket on the test run's S3 server."""
    return s3_server.new_bucket()
