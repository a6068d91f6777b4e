"""The owned event-loop thread: lazy start, run/submit, the loop-thread guard, close, fork."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from asyncckpt._runtime import BACKGROUND_NICE, WORKER_THREADS, Runtime, get_runtime


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


def test_the_worker_pool_is_fully_started_with_the_loop_and_runs_blocking_calls():
    runtime = Runtime(name="pooled")
    try:
        runtime.loop  # starts the loop thread and its pool
        workers = [t for t in threading.enumerate() if t.name.startswith("pooled-worker")]
        assert len(workers) == WORKER_THREADS

        async def blocking_calls():
            return await asyncio.gather(*(asyncio.to_thread(threading.current_thread) for _ in range(3 * WORKER_THREADS)))

        used = runtime.run(blocking_calls())
        assert {thread.name for thread in used} <= {thread.name for thread in workers}
    finally:
        runtime.close()
    assert not any(t.name.startswith("pooled-worker") for t in threading.enumerate())


def test_blocking_calls_need_no_new_thread_once_the_loop_runs():
    # Python 3.12 refuses to start threads while the interpreter exits, when pending writes are
    # still finished; this child refuses them from the start of its work to show none is needed.
    script = textwrap.dedent(
        """
        import asyncio, threading
        from asyncckpt._runtime import Runtime

        runtime = Runtime()
        runtime.loop

        def refuse(self):
            raise RuntimeError("can't create new thread at interpreter shutdown")

        threading.Thread.start = refuse

        async def work():
            return sum(await asyncio.gather(*(asyncio.to_thread(pow, 2, n) for n in range(100))))

        assert runtime.run(work()) == 2**100 - 1
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_forked_child_starts_with_fresh_components_but_continues_every_number_series():
    """One fork reset: components (pools, registries) are new in the child, while numbers that
    identify versions and restores never repeat (a graph cached under a version must stay stale)."""
    script = textwrap.dedent(
        """
        import os
        from asyncckpt._runtime import process_state

        class Component:
            pass

        parent = process_state().owned(Component)
        last = process_state().next_number("series")
        child = os.fork()
        if child == 0:
            fresh = process_state().owned(Component)
            ok = fresh is not parent and process_state().next_number("series") == last + 1
            os._exit(0 if ok else 1)
        _, status = os.waitpid(child, 0)
        assert process_state().owned(Component) is parent
        raise SystemExit(os.waitstatus_to_exitcode(status))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_at_exit_calls_every_component_in_creation_order_and_re_raises_the_first_error():
    from asyncckpt._runtime import ProcessState

    calls = []

    class First:
        def at_exit(self, final):
            calls.append(("first", final))
            raise ValueError("first failed")

    class Second:
        def at_exit(self, final):
            calls.append(("second", final))

    state = ProcessState()
    state.owned(First)
    state.owned(Second)
    with pytest.raises(ValueError, match="first failed"):
        state.at_exit(final=True)
    assert calls == [("first", True), ("second", True)]
    assert state.owned(First) is state.owned(First)


def test_gc_pause_nests_and_leaves_a_disabled_collector_disabled():
    import gc

    from asyncckpt._runtime import GcPause

    pause = GcPause()
    assert gc.isenabled()
    with pause.paused():
        assert not gc.isenabled()
        with pause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()
    gc.disable()
    try:
        with pause.paused():
            pass
        assert not gc.isenabled()  # the program turned it off: it stays off
    finally:
        gc.enable()
    with pytest.raises(RuntimeError):
        with pause.paused():
            raise RuntimeError("boom")
    assert gc.isenabled()


def _nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nice values are per thread on Linux only")
@pytest.mark.parametrize("nice", [BACKGROUND_NICE, 3, 0])
def test_the_loop_and_worker_threads_run_below_the_programs_own_priority(nice):
    mine = _nice_of_this_thread()
    runtime = Runtime(name="niced", nice=nice)
    try:
        async def niceness():
            return _nice_of_this_thread(), await asyncio.to_thread(_nice_of_this_thread)

        loop_nice, worker_nice = runtime.run(niceness())
        assert loop_nice == worker_nice == min(19, mine + nice)
        assert _nice_of_this_thread() == mine  # the caller's own thread keeps its priority
    finally:
        runtime.close()


@pytest.mark.parametrize("nice", [-1, 40, 1.5, True])
def test_a_runtime_refuses_a_nice_increment_it_cannot_apply(nice):
    with pytest.raises(ValueError, match="nice"):
        Runtime(nice=nice)
