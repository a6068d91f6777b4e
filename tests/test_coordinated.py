"""Saves of several ranks through a coordinator: in-process ranks as threads of this process.

Each rank runs its own ``Checkpoint`` over its own objects holding the same values (data
parallelism) and saves to one path; the chief commits one checkpoint naming every rank's data.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt.io.coordinator import InProcessCoordinator
from asyncckpt.io.storage import FileStorage
from asyncckpt.testing.storage import FailingStorage


def _state(extra: int = 0) -> dict[str, ac.Variable]:
    values = {f"layer{i}": ac.Variable(np.arange(1000 + 10 * i, dtype=np.float32) * (i + 1)) for i in range(6)}
    values.update({f"extra{i}": ac.Variable(np.zeros(3)) for i in range(extra)})
    return values


def _save_on_every_rank(path, count, *, state=_state, settings=None, skip=(), timeout=20.0, enable_async=False,
                        check_replicas=False):
    """Run rank ``r``'s save on a thread of its own; return each rank's path or exception."""
    coordinators = InProcessCoordinator.group(count, timeout_seconds=timeout)
    outcomes: dict[int, object] = {}

    def rank(coordinator):
        checkpoint = ac.Checkpoint(**state(coordinator.rank))
        write_settings = (settings or {}).get(coordinator.rank) or ac.WriteSettings()
        worker = ac.MultiWorker.of(coordinator, check_replicas=check_replicas)
        options = ac.CheckpointOptions(multi_worker=worker, write_settings=write_settings,
                                       enable_async=enable_async)
        try:
            saved = checkpoint.save(path, options=options)
            checkpoint.sync()
            outcomes[coordinator.rank] = saved
        except Exception as exc:  # noqa: BLE001 - the test looks at every rank's outcome
            outcomes[coordinator.rank] = exc

    threads = [threading.Thread(target=rank, args=(c,)) for c in coordinators if c.rank not in skip]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return outcomes


def _data_dirs(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if ".data-" in name)


@pytest.mark.parametrize("enable_async", [False, True])
def test_every_rank_writes_its_share_and_the_chief_commits_one_checkpoint(tmp_path, enable_async):
    outcomes = _save_on_every_rank(tmp_path / "ckpt", 3, state=lambda rank: _state(), enable_async=enable_async)
    assert set(outcomes.values()) == {str(tmp_path / "ckpt-1")}
    assert len(_data_dirs(tmp_path)) == 3  # one per rank, every one named by the index
    reader = ac.load_checkpoint(str(tmp_path / "ckpt-1"))
    expected = _state()
    for name, variable in expected.items():
        np.testing.assert_array_equal(reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE"), variable.numpy())
    reader.verify()
    fresh = ac.Checkpoint(**{name: ac.Variable(np.zeros_like(v.numpy())) for name, v in expected.items()})
    fresh.restore(str(tmp_path / "ckpt-1")).assert_consumed()
    assert ac.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-1")


def test_an_error_on_one_rank_fails_the_save_on_every_rank_and_leaves_no_data(tmp_path):
    failing = {1: ac.WriteSettings(storage=FailingStorage(FileStorage(), fail_on=1))}
    outcomes = _save_on_every_rank(tmp_path / "ckpt", 3, state=lambda rank: _state(), settings=failing)
    for rank in range(3):
        error = outcomes[rank]
        assert isinstance(error, ac.CoordinationError), error
        assert "rank 1" in str(error) and "No space left on device" in str(error)
    assert not (tmp_path / "ckpt-1.index").exists()
    assert _data_dirs(tmp_path) == []


def test_ranks_saving_other_values_are_refused_on_every_rank(tmp_path):
    outcomes = _save_on_every_rank(tmp_path / "ckpt", 3, state=lambda rank: _state(extra=1 if rank == 2 else 0))
    for rank in range(3):
        assert isinstance(outcomes[rank], ac.CoordinationError), outcomes[rank]
        assert "rank 2 saved other values than rank 0" in str(outcomes[rank])
    assert not (tmp_path / "ckpt-1.index").exists()
    assert _data_dirs(tmp_path) == []


def test_a_rank_that_never_saves_fails_the_others_within_the_timeout_naming_it(tmp_path):
    outcomes = _save_on_every_rank(tmp_path / "ckpt", 3, state=lambda rank: _state(), skip={2}, timeout=2.0)
    assert isinstance(outcomes[0], ac.CheckpointTimeoutError) and "rank(s) 2 of 3" in str(outcomes[0])
    assert isinstance(outcomes[1], ac.CoordinationError) and "rank(s) 2 of 3" in str(outcomes[1])
    assert not (tmp_path / "ckpt-1.index").exists()
    assert _data_dirs(tmp_path) == []


def test_a_coordinated_save_replaces_the_last_one_and_removes_its_data(tmp_path):
    for _ in range(2):
        outcomes = _save_on_every_rank(tmp_path / "ckpt", 2, state=lambda rank: _state())
        assert all(isinstance(value, str) for value in outcomes.values()), outcomes
    # each round is a new Checkpoint (save_counter 1): the second replaced the first
    assert sorted(name for name in os.listdir(tmp_path) if name.endswith(".index")) == ["ckpt-1.index"]
    assert len(_data_dirs(tmp_path)) == 2
    ac.load_checkpoint(str(tmp_path / "ckpt-1")).verify()


def test_a_multi_worker_place_must_agree_with_its_coordinator():
    coordinators = InProcessCoordinator.group(2)
    with pytest.raises(ValueError, match="coordinator is rank 1 of 2"):
        ac.MultiWorker(0, 2, coordinator=coordinators[1])
    assert ac.MultiWorker.of(coordinators[1]) == ac.MultiWorker(1, 2, 60.0)


def _drifted_state(rank: int) -> dict[str, ac.Variable]:
    """Rank 2's replica of ``layer3`` has drifted (same dtype and shape, other values)."""
    state = _state()
    if rank == 2:
        state["layer3"].assign(state["layer3"].numpy() + 1)
    return state


def test_replicas_that_differ_are_refused_with_check_replicas_naming_rank_and_key(tmp_path):
    outcomes = _save_on_every_rank(tmp_path / "ckpt", 3, state=_drifted_state, check_replicas=True)
    for rank in range(3):
        assert isinstance(outcomes[rank], ac.CoordinationError), outcomes[rank]
        assert "rank 2 differs from rank 0 at 'layer3/.ATTRIBUTES/VARIABLE_VALUE'" in str(outcomes[rank])
    assert not (tmp_path / "ckpt-1.index").exists() and _data_dirs(tmp_path) == []
    # Agreeing replicas pass the check.
    outcomes = _save_on_every_rank(tmp_path / "ckpt", 3, state=lambda rank: _state(), check_replicas=True)
    assert set(outcomes.values()) == {str(tmp_path / "ckpt-1")}


def test_without_check_replicas_each_key_is_taken_from_the_rank_that_wrote_it(tmp_path):
    outcomes = _save_on_every_rank(tmp_path / "ckpt", 3, state=_drifted_state)
    assert set(outcomes.values()) == {str(tmp_path / "ckpt-1")}  # not compared: the default costs nothing
    ac.load_checkpoint(str(tmp_path / "ckpt-1")).verify()
