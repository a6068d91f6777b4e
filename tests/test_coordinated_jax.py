"""Saves of several processes through JAX's distributed runtime: a real 2-process multi-controller program."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")

RANK_PROGRAM = Path(__file__).with_name("_jax_ranks.py")


def test_two_jax_processes_save_together_fail_together_and_name_a_process_that_stays_away(tmp_path):
    scenarios = ["replicated", "sharded", "rank1_raises", "rank1_stays_away"]
    data, out = tmp_path / "data", tmp_path / "out"
    out.mkdir()
    for scenario in scenarios:
        (data / scenario).mkdir(parents=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(RANK_PROGRAM.parent), os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu"}
    ranks = [subprocess.Popen([sys.executable, str(RANK_PROGRAM), str(rank), "2", str(port), str(data), str(out),
                               ",".join(scenarios)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    logs = [process.communicate(timeout=180)[0] for process in ranks]
    assert all(process.returncode == 0 for process in ranks), "\n".join(logs)
    results = {path.stem: json.loads(path.read_text()) for path in out.iterdir()}

    for rank in range(2):
        assert results[f"replicated-{rank}"] == {"ok": {"path": str(data / "replicated" / "ckpt-1"), "same": True}}
        failed = results[f"rank1_raises-{rank}"]
        assert failed["error"] == "CoordinationError" and "rank 1: OSError" in failed["message"]
    assert len([name for name in os.listdir(data / "replicated") if ".data-" in name]) == 2
    sharded = [results[f"sharded-{rank}"] for rank in range(2)]
    assert all(outcome.get("ok", {}).get("same") == [True, True] for outcome in sharded), sharded
    assert sharded[0]["ok"]["devices"] >= 4  # every process's devices, in one global mesh
    with open(data / "sharded" / "ckpt-1.index", "rb") as index:
        record = json.loads(index.read())["tensors"]["params/.ATTRIBUTES/w"]
    assert len(record["shards"]) == sharded[0]["ok"]["devices"]  # each device's rows, written by its process
    assert os.listdir(data / "rank1_raises") == []
    away = results["rank1_stays_away-0"]
    assert away["error"] == "CheckpointTimeoutError" and "rank 1 of 2 had not arrived" in away["message"]
    assert away["seconds"] < 5 + 5  # the coordinator's timeout (5 s), not longer
    assert os.listdir(data / "rank1_stays_away") == []
