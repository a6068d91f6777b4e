"""Crash consistency: SIGKILL a writer at random moments; the last commit must read back bit-exact.

Each round starts ``_crash_child.py`` (which writes checkpoints in a loop), kills it after a random
delay, and then checks every checkpoint path: it is either absent (never committed) or complete,
holds an iteration no older than the last one the child reported committed, and every value equals
what that iteration wrote. The next round's writes run over the previous round's debris, and a
final write must leave no debris behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from _crash_child import expected_values

from asyncckpt import io as ckio
from asyncckpt.naming import parse_data_dir_name, parse_index_tmp_name, parse_lock_name

CHILD = Path(__file__).with_name("_crash_child.py")
PATHS = {"same": ["ckpt"], "alternate": ["ckpt-a", "ckpt-b"]}


def _run_and_kill(folder: Path, mode: str, first: int, delay: float) -> list[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CHILD.parent), os.environ.get("PYTHONPATH", "")]))
    lines: list[str] = []
    ready = threading.Event()
    with tempfile.TemporaryFile("w+") as errors, subprocess.Popen(
        [sys.executable, str(CHILD), str(folder), mode, str(first)],
        stdout=subprocess.PIPE, stderr=errors, text=True, env=env,
    ) as child:

        def read() -> None:
            for line in child.stdout:
                lines.append(line.strip())
                ready.set()

        reader = threading.Thread(target=read)
        reader.start()
        try:
            if not ready.wait(120) or child.poll() is not None:
                errors.seek(0)
                raise AssertionError(f"the writer did not start: {errors.read()}")
            threading.Event().wait(delay)
            child.send_signal(signal.SIGKILL)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
            reader.join()
        errors.seek(0)
        assert child.returncode == -signal.SIGKILL, f"the writer stopped on its own: {errors.read()}"
    return lines


def _check(folder: Path, mode: str, last_committed: dict) -> None:
    for name in PATHS[mode]:
        path = folder / name
        if name not in last_committed and not ckio.checkpoint_exists(path):
            continue
        reader = ckio.open_reader(path)
        iteration = reader.object_graph["iteration"]
        assert iteration >= last_committed.get(name, -1), f"{name} went back to iteration {iteration}"
        expected = expected_values(iteration)
        values = reader.read_many(list(expected))
        for key, value in expected.items():
            if isinstance(value, bytes):
                assert values[key] == value
            else:
                assert values[key].dtype == value.dtype and values[key].tobytes() == np.asarray(value).tobytes(), key
        reader.verify()


def _crash_rounds(tmp_path: Path, mode: str, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    last_committed: dict[str, int] = {}
    first = 0
    for _ in range(rounds):
        lines = _run_and_kill(tmp_path, mode, first, rng.uniform(0.0, 0.4))
        for line in lines:
            if line.startswith("committed "):
                _, path, iteration = line.split(" ")
                last_committed[Path(path).name] = int(iteration)
        _check(tmp_path, mode, last_committed)
        first += 1000  # each child writes iterations of its own
    # One clean write in the folder removes every leftover of the crashed ones.
    ckio.start_write(tmp_path / "final", [ckio.SaveEntry("v", np.zeros(1))], {}).result()
    referenced = {ckio.open_reader(tmp_path / p.stem).data_dir for p in tmp_path.glob("*.index")}
    for entry in tmp_path.iterdir():
        name = entry.name
        assert parse_lock_name(name) is None and parse_index_tmp_name(name) is None, f"debris left: {name}"
        if parse_data_dir_name(name) is not None:
            assert name in referenced, f"unreferenced data directory left: {name}"


# Two rounds: the second writer starts over the first one's debris. The 60-round soak is in the slow tier.
@pytest.mark.parametrize("mode", ["same", "alternate"])
def test_sigkill_during_writes_leaves_a_complete_checkpoint(tmp_path, mode):
    _crash_rounds(tmp_path, mode, rounds=2, seed=hash(mode) & 0xFFFF)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a hang guard for 60 interpreter launches in a row, not a time limit
@pytest.mark.parametrize("mode", ["same", "alternate"])
def test_sigkill_soak(tmp_path, mode):
    _crash_rounds(tmp_path, mode, rounds=60, seed=12345)
