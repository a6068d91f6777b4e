"""The owned event-loop thread: lazy start, run/submit, the loop-thread guard, close, fork."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading

import pytest

from asyncckpt._runtime import Runtime, get_runtime


def test_starts_lazily_and_runs_coroutines_on_its_own_thread():
    runtime = Runtime(name="lazy")
    try:
        assert not any(t.name == "lazy" for t in threading.enumerate())

        async def where():
            return threading.current_thread().name

        assert runtime.run(where()) == "lazy"
        assert runtime.submit(where()).result(10) == "lazy"
        assert not runtime.in_loop_thread()
    finally:
        runtime.close()
    assert not any(t.name == "lazy" for t in threading.enumerate())


def test_run_reraises_the_coroutine_exception():
    runtime = Runtime()
    try:
        async def fail():
            raise KeyError("boom")

        with pytest.raises(KeyError, match="boom"):
            runtime.run(fail())
    finally:
        runtime.close()


def test_run_from_the_loop_thread_raises_instead_of_deadlocking():
    runtime = Runtime()
    try:
        async def nested():
            async def inner():
                return 1

            coro = inner()
            try:
                runtime.run(coro)
            except RuntimeError as exc:
                return str(exc)
            return "no error"

        message = runtime.run(nested())
        assert "async API" in message and "deadlock" in message
    finally:
        runtime.close()


def test_close_cancels_pending_work_and_refuses_new_work():
    runtime = Runtime()
    started = threading.Event()

    async def forever():
        started.set()
        await asyncio.Event().wait()

    future = runtime.submit(forever())
    assert started.wait(10)
    runtime.close()
    assert future.cancelled()
    coro = forever()
    with pytest.raises(RuntimeError, match="closed"):
        runtime.run(coro)
    runtime.close()  # idempotent


def test_default_runtime_is_shared_and_replaced_after_fork():
    assert get_runtime() is get_runtime()
    script = textwrap.dedent(
        """
        import os, asyncio
        from asyncckpt._runtime import get_runtime

        async def pid():
            return os.getpid()

        parent = get_runtime()
        assert parent.run(pid()) == os.getpid()
        child = os.fork()
        if child == 0:
            fresh = get_runtime()
            ok = fresh is not parent and fresh.run(pid()) == os.getpid()
            os._exit(0 if ok else 1)
        _, status = os.waitpid(child, 0)
        raise SystemExit(os.waitstatus_to_exitcode(status))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
