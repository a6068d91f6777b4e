"""Saves of several ranks through ``torch.distributed``: real gloo groups of 2 and 4 processes on this machine.

Every rank runs ``tests/_torch_ranks.py`` (one process each, over TCP on 127.0.0.1); the scenarios
run one after another in the same group, so torch is imported once per rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("torch.distributed")

RANK_PROGRAM = Path(__file__).with_name("_torch_ranks.py")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_group(tmp_path: Path, world: int, scenarios: list[str]) -> dict[tuple[str, int], dict]:
    data, out = tmp_path / "data", tmp_path / "out"
    out.mkdir()
    for scenario in scenarios:
        (data / scenario).mkdir(parents=True)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(RANK_PROGRAM.parent), os.environ.get("PYTHONPATH", "")])}
    ranks = [
        subprocess.Popen([sys.executable, str(RANK_PROGRAM), str(rank), str(world), str(port), str(data), str(out),
                          ",".join(scenarios)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(world)
    ]
    logs = []
    for process in ranks:
        try:
            logs.append(process.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for other in ranks:
                other.kill()
            raise
    assert all(process.returncode == 0 for process in ranks), "\n".join(logs)
    return {(path.stem.rsplit("-", 1)[0], int(path.stem.rsplit("-", 1)[1])): json.loads(path.read_text())
            for path in out.iterdir()}


def _data_dirs(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if ".data-" in name)


def _check_replicated(tmp_path: Path, results: dict, world: int) -> None:
    import asyncckpt as ac

    for rank in range(world):
        assert results[("replicated", rank)] == {"ok": {"path": str(tmp_path / "data/replicated/ckpt-1"), "same": True}}
    folder = tmp_path / "data" / "replicated"
    assert len(_data_dirs(folder)) == world  # each rank wrote its share; one index names them all
    reader = ac.load_checkpoint(str(folder / "ckpt-1"))
    reader.verify()
    assert "model/.ATTRIBUTES/0..weight" in reader.get_variable_to_shape_map()


def _check_rank1_raises(tmp_path: Path, results: dict, world: int) -> None:
    for rank in range(world):
        outcome = results[("rank1_raises", rank)]
        assert outcome["error"] == "CoordinationError", outcome
        assert "rank 1: OSError" in outcome["message"] and "No space left on device" in outcome["message"]
    assert os.listdir(tmp_path / "data" / "rank1_raises") == []  # no index, no data directory


def test_two_gloo_ranks_save_replicated_state_fail_together_and_name_a_dead_rank(tmp_path):
    results = _run_group(tmp_path, 2, ["replicated", "rank1_raises", "rank1_exits"])
    _check_replicated(tmp_path, results, 2)
    _check_rank1_raises(tmp_path, results, 2)
    dead = results[("rank1_exits", 0)]
    assert dead["error"] == "CheckpointTimeoutError" and "rank(s) 1 of 2 did not reach" in dead["message"]
    assert dead["seconds"] < 20 + 5  # within the coordinator's timeout (20 s), not after some other wait
    assert os.listdir(tmp_path / "data" / "rank1_exits") == []


@pytest.mark.slow  # four processes importing torch on 2 cores: ~15 s
def test_four_gloo_ranks_save_replicated_state_and_fail_together(tmp_path):
    results = _run_group(tmp_path, 4, ["replicated", "rank1_raises"])
    _check_replicated(tmp_path, results, 4)
    _check_rank1_raises(tmp_path, results, 4)
