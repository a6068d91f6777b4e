"""SIGKILL a CheckpointManager training loop at random moments and at every stage boundary.

Each iteration starts ``_training_child.py`` in the same folder (so it resumes from what the last
crash left, over its debris) and lets it die: at a random moment (the parent kills it), or at the
``N``-th occurrence of one kill point (the child kills itself, reached by injection). After every
kill the folder must satisfy:

* the checkpoint ``latest_checkpoint`` names restores (``assert_consumed``) bit-exact to
  ``expected_values(step)`` for the step it holds, and that step is no older than the last save
  the child reported complete;
* every checkpoint the state file lists exists and passes ``verify()``;
* the next run's saves succeed (a child that fails exits non-zero instead of dying by SIGKILL).

At the end one clean run must leave exactly ``max_to_keep`` checkpoints, all listed in the state
file, and no debris (lock markers, temporary manifests, unreferenced data directories).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import io as ckio
from asyncckpt.naming import parse_data_dir_name, parse_index_tmp_name, parse_lock_name

from ._training_child import KILL_POINTS, MAX_TO_KEEP, build_model, expected_values

CHILD = Path(__file__).with_name("_training_child.py")
TESTS = str(Path(__file__).resolve().parent.parent)
SAVES_PER_RUN = 6


@dataclasses.dataclass
class Tally:
    """What a series of iterations did; printed by the slow run."""

    iterations: int = 0
    kills: int = 0
    random_kills: int = 0
    restores_verified: int = 0
    listed_checkpoints_verified: int = 0
    runs_finished: int = 0
    kills_by_point: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "kills_by_point": dict(sorted(self.kills_by_point.items()))}


def run_child(folder: Path, kind: str = "none", n: int = 0, saves: int = SAVES_PER_RUN,
              kill_after: float | None = None) -> tuple[int, list[str], str]:
    """Run the loop once; with ``kill_after``, SIGKILL it that many seconds after it resumed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(folder), kind, str(n), str(saves)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    lines: list[str] = []
    resumed = threading.Event()

    def read() -> None:
        for line in child.stdout:
            lines.append(line.strip())
            resumed.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        if kill_after is not None:
            resumed.wait()  # the first line comes once the child has restored
            threading.Event().wait(kill_after)
            child.send_signal(signal.SIGKILL)
        stderr = child.stderr.read()
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        reader.join()
        child.stdout.close()
        child.stderr.close()
    return child.returncode, lines, stderr


def last_committed(lines: list[str], previous: int) -> int:
    steps = [int(line.split()[1]) for line in lines if line.startswith("committed ")]
    return max([previous, *steps])


# A manager records the checkpoints it is about to delete, writes the state file without them and
# only then deletes, so no crash can leave the state file naming a deleted checkpoint.


def check_after_crash(folder: Path, committed: int, tally: Tally, killed_at: str | None = None) -> None:
    """The guarantees that must hold whatever killed the writer (see the module docstring)."""
    latest = ac.latest_checkpoint(folder)
    if committed > 0:
        assert latest is not None, f"a save of step {committed} completed, but latest_checkpoint names nothing"
    if latest is not None:
        variables, notes, checkpoint = build_model()
        checkpoint.restore(latest).assert_consumed()
        step = int(variables["step"].numpy())
        assert step >= committed, f"{latest} holds step {step}, older than the completed save of step {committed}"
        for key, value in expected_values(step).items():
            if key == "notes":
                assert notes.value == value, f"{latest}: python state differs"
                continue
            got = variables[key].numpy()
            assert got.dtype == value.dtype and got.tobytes() == np.asarray(value).tobytes(), f"{latest}: {key}"
        tally.restores_verified += 1
    state = ac.get_checkpoint_state(folder)
    for path in state.all_model_checkpoint_paths if state is not None else []:
        assert ckio.checkpoint_exists(path), f"the state file lists {path}, which does not exist ({killed_at})"
        ckio.open_reader(path).verify()
        tally.listed_checkpoints_verified += 1


def assert_clean(folder: Path) -> None:
    """Exactly the managed checkpoints remain, all listed, with no debris of crashed writes."""
    names = set(os.listdir(folder))
    stems = {name[: -len(".index")] for name in names if name.endswith(".index")}
    referenced = {ckio.open_reader(folder / stem).data_dir for stem in stems}
    for name in names:
        assert parse_lock_name(name) is None and parse_index_tmp_name(name) is None, f"debris left: {name}"
        if parse_data_dir_name(name) is not None:
            assert name in referenced, f"unreferenced data directory left: {name}"
    state = ac.get_checkpoint_state(folder)
    listed = {os.path.basename(path) for path in state.all_model_checkpoint_paths}
    assert listed == stems and len(stems) == MAX_TO_KEEP, f"on disk {sorted(stems)}, listed {sorted(listed)}"


def census(folder: Path) -> dict[str, int]:
    """How often one run reaches each kill point (from a fresh folder: a lower bound later on)."""
    code, lines, stderr = run_child(folder)
    assert code == 0, stderr
    counts = json.loads(next(line for line in lines if line.startswith("counts "))[len("counts "):])
    assert set(counts) == set(KILL_POINTS), f"points never reached: {set(KILL_POINTS) - set(counts)}"
    return counts


def iterate(folder: Path, plan: list[tuple[str, int | float]], tally: Tally, rng: random.Random) -> None:
    """Run ``plan``: ``(kill point, N)`` pairs, or ``("random", seconds)`` for a kill from outside."""
    committed = last_committed([], 0)
    committed = check_after_crash_and_count(folder, committed, tally, [])
    for kind, value in plan:
        if kind == "random":
            code, lines, stderr = run_child(folder, saves=10_000, kill_after=value)
        else:
            code, lines, stderr = run_child(folder, kind, int(value))
        tally.iterations += 1
        if code == -signal.SIGKILL:
            tally.kills += 1
            if kind == "random":
                tally.random_kills += 1
            else:
                assert f"killing {kind} {value}" in lines, f"{kind} #{value}: killed, but not at the point: {lines}"
                tally.kills_by_point[kind] += 1
        else:
            assert code == 0, f"{kind} #{value}: the loop failed after a crash (exit {code}):\n{stderr}"
            tally.runs_finished += 1
        killed_at = kind if code == -signal.SIGKILL else None
        committed = check_after_crash_and_count(folder, committed, tally, lines, killed_at)
    code, lines, stderr = run_child(folder, saves=3)
    assert code == 0, f"the save after the last crash failed:\n{stderr}"
    check_after_crash_and_count(folder, committed, tally, lines)
    assert_clean(folder)


def check_after_crash_and_count(folder: Path, committed: int, tally: Tally, lines: list[str],
                                killed_at: str | None = None) -> int:
    committed = last_committed(lines, committed)
    check_after_crash(folder, committed, tally, killed_at)
    return committed


def kill_plan(counts: dict[str, int], rng: random.Random, *, per_point: int | None, random_kills: int,
              max_delay: float) -> list:
    """Every kill point (each of its occurrences when ``per_point`` is None), plus random kills, shuffled."""
    plan: list = []
    for point in KILL_POINTS:
        occurrences = range(1, counts[point] + 1)
        chosen = list(occurrences) if per_point is None else rng.sample(occurrences, min(per_point, len(occurrences)))
        plan.extend((point, n) for n in chosen)
    plan.extend(("random", rng.uniform(0.0, max_delay)) for _ in range(random_kills))
    rng.shuffle(plan)
    return plan


# One point per injection mechanism (variable read, storage wrapper, audit hook on os.rename, write
# callback); rename-state and delete-after have tests of their own below. Every point, at every
# occurrence, and 80+ random kills run in the slow tier (test_kill_points_every_occurrence).
SAMPLED_POINTS = ("snapshot", "write-after", "rename-index", "callback")


def test_kill_points_fast(tmp_path):
    rng = random.Random(20240531)
    counts = census(tmp_path)
    tally = Tally()
    assert set(SAMPLED_POINTS) <= set(KILL_POINTS)
    plan = [(point, rng.randint(1, counts[point])) for point in SAMPLED_POINTS] + [("random", rng.uniform(0.0, 0.4))]
    iterate(tmp_path, plan, tally, rng)
    assert tally.iterations == len(SAMPLED_POINTS) + 1
    assert sum(tally.kills_by_point.values()) == len(SAMPLED_POINTS), tally  # every injected kill hit its point
    assert tally.restores_verified >= tally.iterations


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a hang guard for 200+ interpreter launches in a row, not a time limit
def test_kill_points_every_occurrence(tmp_path, capsys):
    rng = random.Random(7)
    counts = census(tmp_path)
    tally = Tally()
    injected = sum(counts.values())
    random_kills = max(80, 200 - injected)  # at least 200 iterations however the pipeline evolves
    plan = kill_plan(counts, rng, per_point=None, random_kills=random_kills, max_delay=0.6)
    iterate(tmp_path, plan, tally, rng)
    assert tally.iterations == injected + random_kills >= 200
    assert sum(tally.kills_by_point.values()) == injected, tally
    with capsys.disabled():
        print(f"\nkill-point harness: {json.dumps(tally.as_dict())}")


def test_kill_during_deletion_leaves_no_dangling_state_entry(tmp_path):
    code, _, stderr = run_child(tmp_path, saves=MAX_TO_KEEP)
    assert code == 0, stderr
    # The next save expires the oldest checkpoint: die right after its P.index is removed.
    code, lines, stderr = run_child(tmp_path, "delete-after", 1)
    assert code == -signal.SIGKILL and "killing delete-after 1" in lines, stderr
    state = ac.get_checkpoint_state(tmp_path)
    missing = [path for path in state.all_model_checkpoint_paths if not ckio.checkpoint_exists(path)]
    assert missing == [], f"the state file lists deleted checkpoints {missing}"


def test_state_file_temporary_left_by_a_crash_is_removed(tmp_path):
    code, lines, stderr = run_child(tmp_path, "rename-state", 1)
    assert code == -signal.SIGKILL and "killing rename-state 1" in lines, stderr
    assert any(name.endswith(".tmp") for name in os.listdir(tmp_path))  # the crash left the temporary
    code, _, stderr = run_child(tmp_path, saves=2)
    assert code == 0, stderr
    leftovers = [name for name in os.listdir(tmp_path) if name.startswith(".checkpoint.") and name.endswith(".tmp")]
    assert leftovers == [], f"state-file temporaries left by the crash: {leftovers}"
