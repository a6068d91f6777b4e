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


def _run_group(tmp_path: Path, world: int, scenarios: list[str], out: str = "out") -> dict[tuple[str, int], dict]:
    data, out = tmp_path / "data", tmp_path / out
    out.mkdir()
    data.mkdir(exist_ok=True)
    for scenario in scenarios:
        if ":" not in scenario:
            (data / scenario).mkdir()
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


def _check_sharded_save(results: dict, world: int, store: str = "") -> tuple[str, dict]:
    """The path all ranks saved (``store``: "" for files, "-s3"), and the digests of the values they saved."""
    saved = [results[(f"shard-save{store}", rank)] for rank in range(world)]
    assert all("ok" in outcome for outcome in saved), saved
    assert len({outcome["ok"]["path"] for outcome in saved}) == 1
    assert len({json.dumps(outcome["ok"]["fingerprints"], sort_keys=True) for outcome in saved}) == 1
    return saved[0]["ok"]["path"], saved[0]["ok"]["fingerprints"]


def _check_restored_in_one_process(path: str, expected: dict) -> None:
    """A checkpoint of DTensors restores into a plain, unsharded model and optimizer in this process."""
    import hashlib

    import torch

    import asyncckpt as ac

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 6))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 32)).sum().backward()
    optimizer.step()  # so that the moments exist to be read into
    ac.Checkpoint(model=model, optimizer=optimizer).restore(path).assert_consumed()
    digests = {f"model.{name}": value for name, value in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        digests.update({f"optimizer.{index}.{name}": value for name, value in state.items()})
    got = {name: hashlib.sha256(value.detach().contiguous().numpy().tobytes()).hexdigest()
           for name, value in digests.items()}
    assert got == expected
    ac.load_checkpoint(path).verify()
    from asyncckpt import state_object

    stored = json.loads(state_object.read_bytes(path + ".index", 1 << 24) if path.startswith("s3://")
                        else Path(path + ".index").read_bytes())
    assert stored["format_version"] == 2  # the DTensors were stored as shards, not gathered
    assert "shards" in stored["tensors"]["model/.ATTRIBUTES/0..weight"]


def test_two_gloo_ranks_save_replicated_and_sharded_state_on_files_and_s3_fail_together_and_name_a_dead_rank(
        tmp_path, bucket):
    results = _run_group(tmp_path, 2, [
        "replicated", "rank1_raises",
        "shard-save:sharded", f"shard-restore:{tmp_path}/data/sharded/ckpt-1",
        f"shard-save:s3://{bucket}/sharded", f"shard-restore:s3://{bucket}/sharded/ckpt-1",
        "rank1_exits",
    ])
    for store in ("", "-s3"):
        path, expected = _check_sharded_save(results, 2, store)
        assert [results[(f"shard-restore{store}", rank)] for rank in range(2)] == [{"ok": {"same": True}}] * 2
        _check_restored_in_one_process(path, expected)  # 2 -> 1
    assert path == f"s3://{bucket}/sharded/ckpt-1"
    _check_replicated(tmp_path, results, 2)
    _check_rank1_raises(tmp_path, results, 2)
    dead = results[("rank1_exits", 0)]
    assert dead["error"] == "CheckpointTimeoutError" and "rank(s) 1 of 2 did not reach" in dead["message"]
    assert dead["seconds"] < 20 + 5  # within the coordinator's timeout (20 s), not after some other wait
    assert os.listdir(tmp_path / "data" / "rank1_exits") == []


@pytest.mark.slow  # four processes importing torch on 2 cores: ~20 s
def test_four_gloo_ranks_save_replicated_and_sharded_state_on_s3_and_fail_together(tmp_path, bucket):
    results = _run_group(tmp_path, 4, ["replicated", "rank1_raises", f"shard-save:s3://{bucket}/sharded",
                                       f"shard-restore:s3://{bucket}/sharded/ckpt-1", "shard-save-hsdp:hsdp",
                                       f"shard-restore:{tmp_path}/data/hsdp/ckpt-1"])
    _check_replicated(tmp_path, results, 4)
    _check_rank1_raises(tmp_path, results, 4)
    path, expected = _check_sharded_save(results, 4, "-s3")
    assert [results[("shard-restore-s3", rank)] for rank in range(4)] == [{"ok": {"same": True}}] * 4
    _check_restored_in_one_process(path, expected)  # 4 -> 1, from the bucket
    # A 2 x 2 mesh (replicated, rows): each of the two row slices was held by two ranks and written once.
    hsdp, hsdp_expected = _check_sharded_save(results, 4, "-hsdp")
    with open(hsdp + ".index", "rb") as index:
        weight = json.loads(index.read())["tensors"]["model/.ATTRIBUTES/0..weight"]
    assert [shard["offset"] for shard in weight["shards"]] == [[0, 0], [32, 0]]
    assert [results[("shard-restore", rank)] for rank in range(4)] == [{"ok": {"same": True}}] * 4  # -> 4 columns
    _check_restored_in_one_process(hsdp, hsdp_expected)


@pytest.mark.slow  # three groups (2, 4 and 2 processes) importing torch: ~40 s
def test_sharded_checkpoints_restore_from_two_ranks_into_four_and_back(tmp_path):
    two = _run_group(tmp_path, 2, ["shard-save:two"], out="out2")
    two_path, expected = _check_sharded_save(two, 2)
    four = _run_group(tmp_path, 4, [f"shard-restore:{two_path}", "shard-save:four"], out="out4")
    assert [four[("shard-restore", rank)] for rank in range(4)] == [{"ok": {"same": True}}] * 4  # 2 -> 4
    four_path, four_expected = _check_sharded_save(four, 4)
    back = _run_group(tmp_path, 2, [f"shard-restore:{four_path}"], out="back")
    assert [back[("shard-restore", rank)] for rank in range(2)] == [{"ok": {"same": True}}] * 2  # 4 -> 2
    _check_restored_in_one_process(four_path, four_expected)  # 4 -> 1
