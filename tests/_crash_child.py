"""Writes checkpoints in a loop until killed; used by tests/test_crash.py.

Usage: python _crash_child.py FOLDER MODE FIRST_ITERATION

MODE "same" writes every iteration to FOLDER/ckpt; "alternate" alternates FOLDER/ckpt-a and
FOLDER/ckpt-b. After each commit it prints "committed <path> <iteration>" (flushed), so the parent
knows a lower bound of what must be on disk when it kills this process.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from asyncckpt import io as ckio

SETTINGS = ckio.WriteSettings(
    chunk_bytes=16 * 1024, pack_bytes=4 * 1024, small_array_bytes=1024, staging_budget_bytes=32 * 1024,
    max_concurrent_writes=2,
)


def expected_values(iteration: int) -> dict:
    """The values written at ``iteration``: a chunked array, packed arrays, bytes and a scalar."""
    rng = np.random.default_rng(iteration)
    values = {"big": rng.standard_normal(12_000), "state": f"iteration {iteration}".encode(), "step": np.int64(iteration)}
    for j in range(20):
        values[f"small/{j}"] = rng.integers(-1000, 1000, size=50, dtype=np.int32)
    return values


def path_for(folder: str, mode: str, iteration: int) -> str:
    if mode == "same":
        return os.path.join(folder, "ckpt")
    return os.path.join(folder, "ckpt-a" if iteration % 2 == 0 else "ckpt-b")


def main() -> None:
    folder, mode, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print("ready", flush=True)
    iteration = first
    while True:
        path = path_for(folder, mode, iteration)
        entries = [ckio.SaveEntry(key, value) for key, value in expected_values(iteration).items()]
        ckio.start_write(path, entries, {"iteration": iteration}, settings=SETTINGS).result()
        print(f"committed {path} {iteration}", flush=True)
        iteration += 1


if __name__ == "__main__":
    main()
