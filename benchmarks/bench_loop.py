"""Event-loop responsiveness: how late a caller's 1 ms timer fires while a checkpoint is saved and restored.

An asyncio program (a server, an RL actor, a data pipeline) awaits ``asave``/``arestore`` and
expects its other tasks to keep running. This measures, in one process and one run, a task that
sleeps 1 ms in a loop and records how late each wake-up is:

* **idle** -- nothing else running: the machine's own jitter;
* **plain threads** -- the same bytes written (``pwrite`` + ``fsync``) and read back (``preadv``
  into the same arrays) by a thread pool of as many threads as asyncckpt uses, awaited through
  ``run_in_executor``: what any thread-based checkpointing does to the loop;
* **asyncckpt** -- ``await checkpoint.asave(prefix)`` then ``await checkpoint.arestore(path)``.

Every round writes a new checkpoint, so each restore reads what the save before it wrote (its
direct-I/O writes leave nothing in the page cache: a cold read); a second restore of the same
files is the warm case. Reported: the worst and the 99th-percentile delay per operation, medians
over ``--repeat`` rounds, and the operation's own time.

    python benchmarks/bench_loop.py [--size-mib 256] [--arrays 8] [--repeat 5] [--dir D] [--output F]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import sys
import time

import numpy as np
from bench import evict, files_under, median, positive_int, remove, report_in_workdir

__all__ = ["main"]

MiB = 1 << 20
TICK_SECONDS = 0.001


async def _ticker(delays: list[float], stop: asyncio.Event) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(TICK_SECONDS)
        now = time.perf_counter()
        delays.append(now - last - TICK_SECONDS)
        last = now


async def _watched(operation) -> tuple[float, float, float]:
    """(worst delay, p99 delay, seconds) of the ticker while ``await operation()`` runs."""
    delays: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticker(delays, stop))
    await asyncio.sleep(0.02)  # the ticker is running before the operation starts
    delays.clear()
    started = time.perf_counter()
    await operation()
    seconds = time.perf_counter() - started
    stop.set()
    await ticker
    delays = delays or [0.0]
    return max(delays), float(np.percentile(delays, 99)), seconds


def _write_file(path: str, array: np.ndarray) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(array).cast("B")
        position = 0
        while position < view.nbytes:
            position += os.pwrite(fd, view[position:], position)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_file(path: str, array: np.ndarray) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        view = memoryview(array).cast("B")
        position = 0
        while position < view.nbytes:
            position += os.preadv(fd, [view[position:]], position)
    finally:
        os.close(fd)


async def measure(arrays: list[np.ndarray], workdir: str, repeat: int) -> dict[str, list[tuple]]:
    import asyncckpt as ac  # noqa: PLC0415

    threads = ac.ReadSettings().max_concurrent_reads
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    loop = asyncio.get_running_loop()
    checkpoint = ac.Checkpoint(**{f"v{index}": ac.Variable(array) for index, array in enumerate(arrays)})
    files = [os.path.join(workdir, f"plain-{index}") for index in range(len(arrays))]
    results: dict[str, list[tuple]] = {}

    def record(name: str, figures: tuple) -> None:
        results.setdefault(name, []).append(figures)

    async def plain(function) -> None:
        await asyncio.gather(*(loop.run_in_executor(pool, function, path, array) for path, array in zip(files, arrays)))

    await checkpoint.asave(os.path.join(workdir, "warm-up"))  # starts the runtime: no first-use costs below
    for round_index in range(repeat):
        print(f"... round {round_index + 1}/{repeat}", file=sys.stderr, flush=True)
        record("idle", await _watched(lambda: asyncio.sleep(0.3)))
        record("plain threads: write + fsync", await _watched(lambda: plain(_write_file)))
        for path in files:
            evict(path)
        record("plain threads: read (cold)", await _watched(lambda: plain(_read_file)))
        record("plain threads: read (warm)", await _watched(lambda: plain(_read_file)))
        prefix = os.path.join(workdir, f"ckpt-{round_index}")
        saved: list[str] = []

        async def save() -> None:
            saved.append(await checkpoint.asave(prefix))

        record("asyncckpt asave (until durable)", await _watched(save))
        for path in files_under(workdir):  # what the save wrote, out of the page cache
            evict(path)
        record("asyncckpt arestore (cold)", await _watched(lambda: checkpoint.arestore(saved[0])))
        record("asyncckpt arestore (warm)", await _watched(lambda: checkpoint.arestore(saved[0])))
        for name in os.listdir(workdir):  # this round's checkpoint (and the state file) go
            if name.startswith(("ckpt-", "warm-up", "checkpoint")):
                remove(os.path.join(workdir, name))
    pool.shutdown()
    for path in files:
        remove(path)
    return results


def table(results: dict[str, list[tuple]], nbytes: int, count: int, repeat: int) -> list[str]:
    lines = [
        f"### Event-loop responsiveness: {nbytes / MiB:.0f} MiB in {count} arrays",
        "",
        f"How late a 1 ms `asyncio.sleep` loop in the caller wakes up, medians of {repeat} rounds "
        f"(plain threads: {count} files through a pool of as many threads as asyncckpt reads with).",
        "",
        "| operation | worst delay | p99 delay | operation time |",
        "|---|---:|---:|---:|",
    ]
    for name, rounds in results.items():
        worst, p99, seconds = (median([figures[i] for figures in rounds]) for i in range(3))
        lines.append(f"| {name} | {worst * 1e3:.1f} ms | {p99 * 1e3:.1f} ms | {seconds * 1e3:.0f} ms |")
    lines += ["", "Worst delay per round (ms):", ""]
    for name, rounds in results.items():
        lines.append(f"- {name}: " + ", ".join(f"{figures[0] * 1e3:.1f}" for figures in rounds))
    lines.append("")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mib", type=positive_int, default=256)
    parser.add_argument("--arrays", type=positive_int, default=8)
    parser.add_argument("--repeat", type=positive_int, default=5)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    per_array = args.size_mib * MiB // args.arrays // 4
    arrays = [np.random.default_rng(index).standard_normal(per_array).astype(np.float32) for index in range(args.arrays)]

    def run(workdir: str) -> list[str]:
        results = asyncio.run(measure(arrays, workdir, args.repeat))
        return table(results, sum(array.nbytes for array in arrays), len(arrays), args.repeat)

    return report_in_workdir(args.dir, "asyncckpt-loop-", args.output, run)


if __name__ == "__main__":
    sys.exit(main())
