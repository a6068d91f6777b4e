"""Unit tests of the byte budget, source preparation, host byte views and the staging guard."""

from __future__ import annotations

import asyncio
import threading

import crc32c
import numpy as np
import pytest
from _fakes import FakeVariable

from asyncckpt._runtime import Runtime
from asyncckpt.format import OBJECT_GRAPH_KEY
from asyncckpt.plan import PlanItem, plan_write
from asyncckpt.snapshot import (
    BudgetClosedError,
    ByteBudget,
    SaveEntry,
    Snapshot,
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
# Snapshot staging and the copy-on-write guard


def _snapshot(sources, runtime, capacity, *, instant_writer=True):
    """A Snapshot whose files hold at most 16 bytes; delivered files are kept in ``staged``.

    With ``instant_writer`` each delivered file's budget is released at once, as a writer would
    after a (very fast) durable write.
    """
    plan = plan_write([PlanItem(s.key, s.nbytes) for s in sources], small_array_bytes=17, pack_bytes=16,
                      chunk_bytes=16)
    staged = []
    budget = ByteBudget(capacity)

    def deliver(item):
        staged.append(item)
        if instant_writer:
            budget.release(len(item.buffer))

    snapshot = Snapshot(sources, plan, budget, runtime.loop, deliver)
    return snapshot, plan, budget, staged


def test_staging_builds_each_file_once_with_piece_checksums():
    runtime = Runtime()
    try:
        a = FakeVariable(np.arange(2, dtype=np.int32))  # 8 bytes
        b = FakeVariable(np.arange(2, 4, dtype=np.int32))
        sources = prepare_sources([SaveEntry("a", a), SaveEntry("b", b), SaveEntry("c", b"xyz")])
        snapshot, plan, budget, staged = _snapshot(sources, runtime, 32, instant_writer=False)
        snapshot.install_guards()
        assert a.hook_count == b.hook_count == 1
        runtime.run(snapshot.run_copier())
        assert [f.name for f in plan.files] == ["pack-00000", "pack-00001"]
        assert [s.name for s in staged] == ["pack-00000", "pack-00001"]
        assert bytes(staged[0].buffer) == np.arange(4, dtype="<i4").tobytes()
        assert staged[0].crcs == (crc32c.crc32c(np.arange(2, dtype="<i4").tobytes()),
                                  crc32c.crc32c(np.arange(2, 4, dtype="<i4").tobytes()))
        assert bytes(staged[1].buffer) == b"xyz"
        assert a.hook_count == b.hook_count == 0  # staged: the guards are gone
        assert budget.in_use == 16 + 3  # the copier reserved both files; the writer releases them
        assert snapshot.stage(0) is None  # a file is never staged twice
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


def test_mutation_waits_for_an_in_progress_background_copy_of_the_same_holder():
    runtime = Runtime()
    try:
        slow = _SlowVariable(np.arange(4, dtype=np.float32))
        sources = prepare_sources([SaveEntry("slow", slow)])
        snapshot, _, _, staged = _snapshot(sources, runtime, 16)
        snapshot.install_guards()
        copier = runtime.submit(snapshot.run_copier())
        assert slow.copy_started.wait(10)
        mutated = threading.Event()
        mutator = threading.Thread(target=lambda: (slow.assign(-1), mutated.set()))
        mutator.start()
        assert not mutated.wait(0.1)  # the hook waits for the copy of the file it needs
        slow.release_copy.set()
        mutator.join(10)
        copier.result(10)
        assert mutated.is_set()
        assert len(staged) == 1
        assert bytes(staged[0].buffer) == np.arange(4, dtype="<f4").tobytes()
        assert snapshot.staged_by_hooks == 0  # the background copy did it; the hook found it done
    finally:
        runtime.close()


def test_hook_stages_before_the_copier_when_budget_allows():
    runtime = Runtime()
    try:
        variables = [FakeVariable(np.full(4, i, dtype=np.int32)) for i in range(3)]  # 16 bytes each
        sources = prepare_sources([SaveEntry(f"v{i}", v) for i, v in enumerate(variables)])
        snapshot, _, _, staged = _snapshot(sources, runtime, 48)
        snapshot.install_guards()
        variables[2].assign(99)  # no copier running: the hook stages file 2 itself
        runtime.run(asyncio.sleep(0))  # let the delivery callback run on the loop
        assert [s.name for s in staged] == ["pack-00002"]
        assert bytes(staged[0].buffer) == np.full(4, 2, dtype="<i4").tobytes()
        assert variables[2].hook_count == 0 and variables[0].hook_count == 1
        assert snapshot.staged_by_hooks == 1
        runtime.run(snapshot.run_copier())
        assert sorted(s.name for s in staged) == ["pack-00000", "pack-00001", "pack-00002"]
    finally:
        runtime.close()


def test_closed_snapshot_removes_hooks_and_lets_mutations_through():
    runtime = Runtime()
    try:
        variable = FakeVariable(np.zeros(4, dtype=np.int32))
        sources = prepare_sources([SaveEntry("v", variable)])
        snapshot, _, budget, staged = _snapshot(sources, runtime, 16, instant_writer=False)
        snapshot.install_guards()
        runtime.run(budget.acquire(16))  # someone else holds the whole budget
        snapshot.close()
        assert variable.hook_count == 0
        variable.assign(5)  # no hook left: does not block
        assert staged == []
    finally:
        runtime.close()


def test_a_holder_saved_under_several_keys_stays_guarded_until_all_its_files_are_staged():
    runtime = Runtime()
    try:
        shared = FakeVariable(np.arange(2, dtype=np.int64))  # 16 bytes: "a" and "b" fill pack 0
        sources = prepare_sources([SaveEntry("a", shared), SaveEntry("b", shared), SaveEntry("c", shared)])
        plan = plan_write([PlanItem(s.key, s.nbytes) for s in sources], small_array_bytes=17, pack_bytes=32,
                          chunk_bytes=32)
        assert [len(f.pieces) for f in plan.files] == [2, 1]
        staged = []
        snapshot = Snapshot(sources, plan, ByteBudget(64), runtime.loop, staged.append)
        snapshot.install_guards()
        assert snapshot.stage(0) is not None
        assert shared.hook_count == 1  # pack 1 still holds "c"
        shared.assign(-1)  # must stage pack 1 with the old value first
        runtime.run(asyncio.sleep(0))
        assert shared.hook_count == 0
        assert [s.name for s in staged] == ["pack-00001"]
        assert bytes(staged[0].buffer) == np.arange(2, dtype="<i8").tobytes()
    finally:
        runtime.close()
