"""Soak: many consecutive asynchronous saves leak nothing and leave exactly the kept checkpoints.

A ``CheckpointManager`` (``max_to_keep=3``) saves asynchronously after every change of a few hundred
KB of state. After a warm-up the test samples open file descriptors (``/proc/self/fd``), threads
(``threading.enumerate`` and ``/proc/self/task``) and resident memory (``VmRSS``); none may grow with
the number of saves, and at the end the directory holds the three newest checkpoints, the state
file and its lock file, and nothing else. 50 saves in the fast tier, 1,000 in the slow one.
"""

from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import io as ckio


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _sample() -> dict[str, int]:
    gc.collect()
    return {"fds": _open_fds(), "threads": threading.active_count(), "tasks": _tasks(), "rss": _rss_bytes()}


def soak(directory, saves: int, warmup: int) -> dict:
    rng = np.random.default_rng(0)
    weights = ac.Variable(rng.standard_normal((256, 256)).astype(np.float32))  # 256 KiB
    bias = ac.Variable(np.zeros(256, np.float64))
    step = ac.Variable(np.int64(0))
    checkpoint = ac.Checkpoint(weights=weights, bias=bias, step=step)
    manager = ac.CheckpointManager(checkpoint, directory, max_to_keep=3)
    options = ac.CheckpointOptions(enable_async=True)
    samples = []
    for n in range(1, saves + 1):
        weights.assign_add(np.float32(1.0))  # in place while the previous save may still be writing
        bias.assign(np.full(256, n, np.float64))
        step.assign(n)
        manager.save(options=options)
        if n >= warmup and (n - warmup) % max(1, (saves - warmup) // 10) == 0:
            manager.sync()
            samples.append(_sample())
    manager.sync()
    samples.append(_sample())
    return {"samples": samples, "manager": manager, "last": saves, "weights": weights.numpy()}


def check_soak(directory, result: dict, rss_slack: int) -> None:
    first, last = result["samples"][0], result["samples"][-1]
    peak = {key: max(sample[key] for sample in result["samples"]) for key in first}
    assert last["fds"] <= first["fds"], f"file descriptors grew: {first['fds']} -> {last['fds']}"
    # The loop's to_thread pool may still add workers up to its fixed size after the warm-up.
    assert peak["threads"] <= first["threads"] + 4 and peak["tasks"] <= first["tasks"] + 4, result["samples"]
    assert last["rss"] <= first["rss"] + rss_slack, f"RSS grew by {(last['rss'] - first['rss']) >> 20} MiB"
    n = result["last"]
    expected = {f"ckpt-{i}" for i in range(n - 2, n + 1)}
    names = set(os.listdir(directory))
    indexes = {name[: -len(".index")] for name in names if name.endswith(".index")}
    assert indexes == expected
    data_dirs = {ckio.open_reader(directory / stem).data_dir for stem in expected}
    assert names == {f"{stem}.index" for stem in expected} | data_dirs | {"checkpoint", ".checkpoint.lock"}, names
    assert ac.latest_checkpoint(directory) == str(directory / f"ckpt-{n}")
    assert [os.path.basename(p) for p in ac.get_checkpoint_state(directory).all_model_checkpoint_paths] == sorted(
        expected, key=lambda stem: int(stem.split("-")[1]))
    restored = {"weights": ac.Variable(np.zeros((256, 256), np.float32)), "bias": ac.Variable(np.zeros(256)),
                "step": ac.Variable(np.int64(0))}
    ac.Checkpoint(**restored).restore(ac.latest_checkpoint(directory)).assert_existing_objects_matched()
    assert restored["weights"].numpy().tobytes() == result["weights"].tobytes()
    assert int(restored["step"].numpy()) == n and np.all(restored["bias"].numpy() == n)


def test_fifty_async_saves_leak_nothing(tmp_path):
    check_soak(tmp_path, soak(tmp_path, saves=50, warmup=10), rss_slack=64 << 20)


@pytest.mark.slow
def test_a_thousand_async_saves_leak_nothing(tmp_path, capsys):
    result = soak(tmp_path, saves=1000, warmup=100)
    check_soak(tmp_path, result, rss_slack=64 << 20)
    first, last = result["samples"][0], result["samples"][-1]
    with capsys.disabled():
        print(f"\nsoak: 1000 async saves; after warm-up -> end: fds {first['fds']} -> {last['fds']}, threads "
              f"{first['threads']} -> {last['threads']}, tasks {first['tasks']} -> {last['tasks']}, RSS "
              f"{first['rss'] >> 20} -> {last['rss'] >> 20} MiB")
