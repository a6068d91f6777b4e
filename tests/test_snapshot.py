"""Unit tests of the byte budget, source preparation, host byte views, streamed contents and the guard."""

from __future__ import annotations

import asyncio
import threading

import crc32c
import numpy as np
import pytest
from _fakes import FakeVariable

from asyncckpt._runtime import Runtime
from asyncckpt.format import OBJECT_GRAPH_KEY
from asyncckpt.io.plan import PlanItem, plan_write
from asyncckpt.io.snapshot import (
    SEGMENT_BYTES,
    STAGING_BLOCK_BYTES,
    BudgetClosedError,
    ByteBudget,
    SaveEntry,
    Snapshot,
    StagingPool,
    WriteAbortedError,
    host_bytes,
    prepare_sources,
)

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
# Sources and host bytes


def test_prepare_sources_freezes_bytes_and_arrays_but_not_holders():
    array = np.arange(4, dtype=np.int16)
    variable = FakeVariable(np.zeros((2, 3), dtype=np.float32))
    data = bytearray(b"abc")
    sources = prepare_sources([SaveEntry("a", array), SaveEntry("v", variable), SaveEntry("b", data)])
    assert [(s.key, s.kind, s.dtype, s.shape, s.nbytes) for s in sources] == [
        ("a", "array", "<i2", (4,), 8),
        ("v", "holder", "<f4", (2, 3), 24),
        ("b", "bytes", "bytes", (), 3),
    ]
    array[0] = 99
    data[0] = ord("z")
    assert sources[0].value[0] == 0 and sources[2].value == b"abc"
    assert sources[1].value is variable


@pytest.mark.parametrize(
    ("entries", "error", "pattern"),
    [
        ([SaveEntry("k", np.ones(1)), SaveEntry("k", b"")], ValueError, "duplicate"),
        ([SaveEntry(OBJECT_GRAPH_KEY, b"")], ValueError, "reserved"),
        ([SaveEntry(3, b"")], ValueError, "non-empty strings"),
        ([("k", b"")], TypeError, "SaveEntry"),
        ([SaveEntry("k", "str")], TypeError, "encode"),
        ([SaveEntry("k", np.array(["x"]))], TypeError, "'k'"),
        ([SaveEntry("k", FakeVariable(np.array(["x"])))], TypeError, "'k'"),
    ],
)
def test_prepare_sources_rejects_bad_entries(entries, error, pattern):
    with pytest.raises(error, match=pattern):
        prepare_sources(entries)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float32).reshape(4, 6),
        np.arange(24, dtype=np.float32).reshape(4, 6)[::2, ::-1],
        np.asfortranarray(np.arange(24, dtype=np.int64).reshape(4, 6)),
        np.arange(24, dtype=">u4"),
        np.array(3.5, dtype=">f8"),
        np.array([True, False, True]),
    ],
    ids=["contiguous", "strided", "fortran", "big-endian", "0-d-big-endian", "bool"],
)
def test_host_bytes_matches_c_order_little_endian_bytes_for_any_range(array):
    expected = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    for start, stop in [(0, len(expected)), (1, len(expected) - 1), (3, 7), (5, 5)]:
        stop = min(stop, len(expected))
        assert bytes(host_bytes(array, start, stop)) == expected[start:stop]


def test_host_bytes_is_a_view_for_contiguous_little_endian_arrays():
    array = np.arange(8, dtype="<i4")
    view = host_bytes(array, 0, 32)
    array[0] = 7
    assert bytes(view[:4]) == np.int32(7).tobytes()


# ---------------------------------------------------------------------------------------------
# Snapshot: streamed file contents and the copy-on-write guard


def _snapshot(sources, runtime, capacity, *, segment_bytes=SEGMENT_BYTES, file_bytes=16):
    """A Snapshot whose files hold at most ``file_bytes`` bytes, with a budget of ``capacity``."""
    plan = plan_write([PlanItem(s.key, s.nbytes) for s in sources], small_array_bytes=file_bytes + 1,
                      pack_bytes=file_bytes, chunk_bytes=file_bytes)
    budget = ByteBudget(capacity)
    snapshot = Snapshot(sources, plan, budget, runtime.loop, segment_bytes=segment_bytes)
    return snapshot, plan, budget


def _in_use_now(runtime, budget):
    return runtime.run(_in_use(budget))  # also lets releases queued from other threads run first


def test_contents_serve_each_file_once_with_piece_checksums_and_no_copy():
    runtime = Runtime()
    try:
        a = FakeVariable(np.arange(2, dtype=np.int32))  # 8 bytes
        b = FakeVariable(np.arange(2, 4, dtype=np.int32))
        sources = prepare_sources([SaveEntry("a", a), SaveEntry("b", b), SaveEntry("c", b"xyz")])
        snapshot, plan, budget = _snapshot(sources, runtime, 32)
        snapshot.install_guards()
        assert a.hook_count == b.hook_count == 1
        assert [f.name for f in plan.files] == ["pack-00000", "pack-00001"]
        assert bytes(snapshot.content(0).to_bytearray()) == np.arange(4, dtype="<i4").tobytes()
        assert snapshot.crcs(0) == (crc32c.crc32c(np.arange(2, dtype="<i4").tobytes()),
                                    crc32c.crc32c(np.arange(2, 4, dtype="<i4").tobytes()))
        assert a.hook_count == b.hook_count == 0  # every byte went out: the guards are spent
        assert bytes(snapshot.content(1)) == b"xyz"
        assert snapshot.crcs(1) == (crc32c.crc32c(b"xyz"),)
        assert _in_use_now(runtime, budget) == 0 and snapshot.bytes_staged_by_hooks == 0
        content = snapshot.content(0)
        list(content.segments())
        with pytest.raises(RuntimeError, match="once"):
            content.segments()
    finally:
        runtime.close()


def test_batches_are_views_of_the_live_array_split_at_the_segment_size():
    runtime = Runtime()
    try:
        big = FakeVariable(np.arange(12, dtype=np.int64))  # 96 bytes in one chunk
        snapshot, _, _ = _snapshot(prepare_sources([SaveEntry("big", big)]), runtime, 96, segment_bytes=40,
                                   file_bytes=96)
        batches = [list(batch) for batch in snapshot.content(0).segments()]
        assert [sum(len(view) for view in batch) for batch in batches] == [40, 40, 16]
        assert np.shares_memory(np.frombuffer(batches[0][0], np.uint8), big._array)
    finally:
        runtime.close()


class _SlowVariable(FakeVariable):
    """Its first background read blocks until released, like a long device-to-host copy."""

    def __init__(self, value):
        super().__init__(value)
        self.copy_started = threading.Event()
        self.release_copy = threading.Event()

    def _snapshot_array(self):
        array = super()._snapshot_array()
        if self.snapshot_calls == 2:  # the 1st call is prepare_sources' inspection
            self.copy_started.set()
            assert self.release_copy.wait(10)
        return array


def test_mutation_waits_while_a_batch_holding_its_bytes_is_being_written():
    runtime = Runtime()
    try:
        slow = _SlowVariable(np.arange(4, dtype=np.float32))
        snapshot, _, budget = _snapshot(prepare_sources([SaveEntry("slow", slow)]), runtime, 16)
        snapshot.install_guards()
        written = []
        writer = threading.Thread(target=lambda: written.append(bytes(snapshot.content(0).to_bytearray())))
        writer.start()
        assert slow.copy_started.wait(10)
        mutated = threading.Event()
        mutator = threading.Thread(target=lambda: (slow.assign(-1), mutated.set()))
        mutator.start()
        assert not mutated.wait(0.1)  # the hook waits for the batch being written
        slow.release_copy.set()
        writer.join(10)
        mutator.join(10)
        assert mutated.is_set()
        assert written == [np.arange(4, dtype="<f4").tobytes()]
        assert snapshot.bytes_staged_by_hooks == 0  # the write got there first: nothing to copy
        assert _in_use_now(runtime, budget) == 0
    finally:
        runtime.close()


def test_hook_copies_a_holder_the_writer_has_not_reached_and_the_file_is_served_from_the_copy():
    runtime = Runtime()
    try:
        variables = [FakeVariable(np.full(4, i, dtype=np.int32)) for i in range(3)]  # 16 bytes each
        sources = prepare_sources([SaveEntry(f"v{i}", v) for i, v in enumerate(variables)])
        snapshot, _, budget = _snapshot(sources, runtime, 48)
        snapshot.install_guards()
        variables[2].assign(99)  # nothing written yet: the hook copies v2 before it changes
        assert variables[2].hook_count == 0 and variables[0].hook_count == 1
        assert snapshot.bytes_staged_by_hooks == 16 and snapshot.files_staged_by_hooks == 1
        assert _in_use_now(runtime, budget) == 16
        assert bytes(snapshot.content(2)) == np.full(4, 2, dtype="<i4").tobytes()
        assert snapshot.crcs(2) == (crc32c.crc32c(np.full(4, 2, dtype="<i4").tobytes()),)
        snapshot.file_written(2)
        assert _in_use_now(runtime, budget) == 0  # a durable file returns its copies' budget
        variables[2].assign(7)  # the guard is spent: no copy, no wait
        assert snapshot.bytes_staged_by_hooks == 16
    finally:
        runtime.close()


def test_a_mutation_between_batches_copies_only_what_has_not_been_written():
    runtime = Runtime()
    try:
        big = FakeVariable(np.arange(12, dtype=np.int64))  # 96 bytes, one chunk, batches of 32
        snapshot, _, budget = _snapshot(prepare_sources([SaveEntry("big", big)]), runtime, 96, segment_bytes=32,
                                        file_bytes=96)
        snapshot.install_guards()
        batches = snapshot.content(0).segments()
        first = b"".join(bytes(view) for view in next(batches))
        next_batch = next(batches)  # the second batch is "being written": mutation would wait
        second = b"".join(bytes(view) for view in next_batch)
        mutated = threading.Event()
        mutator = threading.Thread(target=lambda: (big.assign(-1), mutated.set()))
        mutator.start()
        assert not mutated.wait(0.1)
        rest = b"".join(b"".join(bytes(view) for view in batch) for batch in batches)  # releases batch 2
        mutator.join(10)
        assert mutated.is_set()
        assert first + second + rest == np.arange(12, dtype="<i8").tobytes()
        assert snapshot.bytes_staged_by_hooks == 32  # only the third batch had to be copied
        assert snapshot.crcs(0) == (crc32c.crc32c(np.arange(12, dtype="<i8").tobytes()),)
        assert big.hook_count == 0
    finally:
        runtime.close()


def test_closed_snapshot_removes_hooks_lets_mutations_through_and_serves_nothing():
    runtime = Runtime()
    try:
        variable = FakeVariable(np.zeros(4, dtype=np.int32))
        snapshot, _, budget = _snapshot(prepare_sources([SaveEntry("v", variable)]), runtime, 16)
        snapshot.install_guards()
        runtime.run(budget.acquire(16))  # someone else holds the whole budget
        snapshot.close()
        assert variable.hook_count == 0
        variable.assign(5)  # no hook left: does not block
        with pytest.raises(WriteAbortedError):
            snapshot.content(0).to_bytearray()
    finally:
        runtime.close()


def test_a_holder_saved_under_several_keys_stays_guarded_until_all_its_bytes_are_out():
    runtime = Runtime()
    try:
        shared = FakeVariable(np.arange(2, dtype=np.int64))  # 16 bytes: "a" and "b" fill pack 0
        sources = prepare_sources([SaveEntry("a", shared), SaveEntry("b", shared), SaveEntry("c", shared)])
        snapshot, plan, _ = _snapshot(sources, runtime, 64, file_bytes=32)
        assert [len(f.pieces) for f in plan.files] == [2, 1]
        snapshot.install_guards()
        snapshot.content(0).to_bytearray()
        assert shared.hook_count == 1  # pack 1 still holds "c"
        shared.assign(-1)  # must copy "c" with the old value first
        assert shared.hook_count == 0
        assert bytes(snapshot.content(1)) == np.arange(2, dtype="<i8").tobytes()
    finally:
        runtime.close()


class _BulkVariable(FakeVariable):
    """A holder type that registers hooks in bulk, as ``Variable`` does."""

    tables: list = []

    @classmethod
    def _add_mutation_hooks(cls, table, hook):
        entry = (dict(table), hook)
        cls.tables.append(entry)
        return lambda: cls.tables.remove(entry)

    def assign(self, value) -> None:
        for table, hook in list(type(self).tables):
            if id(self) in table:
                hook(table[id(self)])
        super().assign(value)


def test_bulk_guards_are_installed_once_per_type_and_removed_on_close():
    runtime = Runtime()
    try:
        _BulkVariable.tables = []
        variables = [_BulkVariable(np.full(2, i, dtype=np.int64)) for i in range(5)]
        sources = prepare_sources([SaveEntry(f"v{i}", v) for i, v in enumerate(variables)])
        snapshot, _, _ = _snapshot(sources, runtime, 80)
        snapshot.install_guards()
        assert len(_BulkVariable.tables) == 1 and len(_BulkVariable.tables[0][0]) == 5
        assert all(v.hook_count == 0 for v in variables)  # no per-holder hooks
        variables[3].assign(-1)
        assert snapshot.bytes_staged_by_hooks == 16
        assert bytes(snapshot.content(3)) == np.full(2, 3, dtype="<i8").tobytes()
        snapshot.close()
        assert _BulkVariable.tables == []
    finally:
        runtime.close()


class _BrokenCopyVariable(FakeVariable):
    def _snapshot_array(self):
        if self.snapshot_calls >= 1:
            self.snapshot_calls += 1
            raise RuntimeError("device lost while copying")
        return super()._snapshot_array()


def test_a_hook_that_cannot_copy_fails_the_contents_not_the_mutation():
    runtime = Runtime()
    try:
        broken = _BrokenCopyVariable(np.zeros(2, dtype=np.int64))
        snapshot, _, budget = _snapshot(prepare_sources([SaveEntry("v", broken)]), runtime, 16)
        snapshot.install_guards()
        broken.assign(1)  # the copy fails; the mutation still happens
        assert isinstance(snapshot.error, RuntimeError)
        with pytest.raises(RuntimeError, match="device lost"):
            snapshot.content(0).to_bytearray()
        assert _in_use_now(runtime, budget) == 0
    finally:
        runtime.close()


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


def test_readinto_copies_the_file_out_and_holds_nothing_between_calls():
    runtime = Runtime()
    try:
        big = FakeVariable(np.arange(12, dtype=np.int64))  # 96 bytes, one chunk
        snapshot, _, _ = _snapshot(prepare_sources([SaveEntry("big", big)]), runtime, 96, segment_bytes=64,
                                   file_bytes=96)
        snapshot.install_guards()
        content = snapshot.content(0)
        buffer = bytearray(40)
        assert content.readinto(buffer) == 40
        out = bytes(buffer)
        big.assign(-1)  # returns at once: nothing is locked between calls; the rest is copied first
        assert snapshot.bytes_staged_by_hooks == 56
        while got := content.readinto(buffer):
            out += bytes(buffer[:got])
        assert out == np.arange(12, dtype="<i8").tobytes()
        assert snapshot.crcs(0) == (crc32c.crc32c(out),)
        with pytest.raises(RuntimeError, match="once"):
            content.segments()
    finally:
        runtime.close()
