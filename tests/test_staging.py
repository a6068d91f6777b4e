"""The byte budget and the pool of staging blocks a write copies into."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from _fakes import FakeVariable

from asyncckpt._runtime import Runtime
from asyncckpt.io.plan import PlanItem, plan_write
from asyncckpt.io.snapshot import Snapshot
from asyncckpt.io.sources import SaveEntry, prepare_sources
from asyncckpt.io.staging import STAGING_BLOCK_BYTES, BudgetClosedError, ByteBudget, StagingPool

# ---------------------------------------------------------------------------------------------
# ByteBudget


def test_budget_grants_in_arrival_order_and_blocks_when_exhausted():
    async def main():
        budget = ByteBudget(10)
        await budget.acquire(6)
        order = []

        async def take(name, nbytes):
            await budget.acquire(nbytes)
            order.append(name)

        big = asyncio.create_task(take("big", 8))
        small = asyncio.create_task(take("small", 1))  # fits now, but must not overtake "big"
        await asyncio.sleep(0.01)
        assert order == [] and budget.in_use == 6
        budget.release(6)
        await asyncio.gather(big, small)
        assert order == ["big", "small"]
        assert budget.in_use == 9

    asyncio.run(main())


def test_budget_cancelled_waiter_does_not_leak_or_block_others():
    async def main():
        budget = ByteBudget(10)
        await budget.acquire(10)
        waiter = asyncio.create_task(budget.acquire(10))
        behind = asyncio.create_task(budget.acquire(2))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        budget.release(10)
        await behind
        assert budget.in_use == 2

    asyncio.run(main())


def test_budget_close_fails_waiters_and_later_acquires():
    async def main():
        budget = ByteBudget(4)
        await budget.acquire(4)
        waiter = asyncio.create_task(budget.acquire(1))
        await asyncio.sleep(0.01)
        budget.close()
        with pytest.raises(BudgetClosedError):
            await waiter
        with pytest.raises(BudgetClosedError):
            await budget.acquire(1)

    asyncio.run(main())


def test_budget_reserve_context_manager_and_oversized_request():
    async def main():
        budget = ByteBudget(8)
        async with budget.reserve(5):
            assert budget.in_use == 5
        assert budget.in_use == 0
        with pytest.raises(ValueError, match="cannot reserve 9"):
            await budget.acquire(9)

    asyncio.run(main())


def test_budget_acquire_from_thread_waits_for_release_on_the_loop():
    runtime = Runtime()
    try:
        budget = ByteBudget(4)
        runtime.run(budget.acquire(4))
        got = threading.Event()
        thread = threading.Thread(target=lambda: (budget.acquire_from_thread(3, runtime.loop), got.set()))
        thread.start()
        assert not got.wait(0.1)
        runtime.call_soon(budget.release, 4)
        thread.join(10)
        assert got.is_set()
        assert runtime.run(_in_use(budget)) == 3
    finally:
        runtime.close()


async def _in_use(budget):
    return budget.in_use



# ---------------------------------------------------------------------------------------------
# The staging pool


def test_staging_blocks_are_reused_capped_and_released_when_idle():
    pool = StagingPool(retain_bytes=2 * STAGING_BLOCK_BYTES, idle_seconds=0.0)
    first = pool.take(STAGING_BLOCK_BYTES)
    partial = pool.take(STAGING_BLOCK_BYTES // 2)  # a block, sliced
    small = pool.take(100)  # too small to be worth a block
    assert partial.nbytes == STAGING_BLOCK_BYTES // 2 and partial.base.nbytes == STAGING_BLOCK_BYTES
    pool.give(first)
    pool.give(partial)
    pool.give(small)
    assert pool.kept_bytes == 2 * STAGING_BLOCK_BYTES
    pool.give(np.empty(STAGING_BLOCK_BYTES, np.uint8))  # over the cap: not kept
    assert pool.kept_bytes == 2 * STAGING_BLOCK_BYTES
    again = {id(pool.take(STAGING_BLOCK_BYTES).base), id(pool.take(10 + STAGING_BLOCK_BYTES // 2).base)}
    assert again == {id(first.base), id(partial.base)}
    with pytest.raises(ValueError):
        pool.take(STAGING_BLOCK_BYTES + 1)
    runtime = Runtime()
    try:

        async def give_then_pause():
            # Given on the loop thread, the idle release (idle_seconds=0) cannot run before this
            # coroutine yields; given from another thread, it could run before the check.
            pool.give(first, runtime.loop)
            kept = pool.kept_bytes
            await asyncio.sleep(0.05)
            return kept

        assert runtime.run(give_then_pause()) == STAGING_BLOCK_BYTES
        assert pool.kept_bytes == 0  # the idle release ran
    finally:
        runtime.close()


def test_a_hook_copies_a_large_value_into_blocks_that_go_back_to_the_pool():
    runtime = Runtime()
    try:
        pool = StagingPool()
        size = 2 * STAGING_BLOCK_BYTES + 1000
        big = FakeVariable(np.arange(size // 8, dtype=np.int64))
        sources = prepare_sources([SaveEntry("big", big)])
        plan = plan_write([PlanItem("big", size)], small_array_bytes=1, pack_bytes=size, chunk_bytes=size)
        budget = ByteBudget(size)
        snapshot = Snapshot(sources, plan, budget, runtime.loop, pool=pool)
        snapshot.install_guards()
        big.assign(-1)
        assert snapshot.bytes_staged_by_hooks == size
        assert bytes(snapshot.content(0)) == np.arange(size // 8, dtype="<i8").tobytes()
        snapshot.file_written(0)
        assert pool.kept_bytes == 2 * STAGING_BLOCK_BYTES  # the 1000-byte tail was not worth keeping
    finally:
        runtime.close()


