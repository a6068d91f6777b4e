"""Fixtures shared by the behaviour suites (``tests/test_behaviours_*.py``)."""

from __future__ import annotations

import logging

import pytest

import asyncckpt as ac


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
