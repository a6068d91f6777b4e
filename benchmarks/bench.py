"""Checkpoint write/read benchmark: asyncckpt against the disk and the usual ways of saving arrays.

One command measures, on the same data in one run:

* the disk itself: one sequential write + ``fsync`` of the same byte count, and a sequential read;
* raw TensorStore (``file`` kvstore, one value per array; and ``zarr3``, one array per array);
* ``numpy.savez`` (+ ``fsync``) and ``np.load``;
* ``torch.save``/``torch.load``, torch.distributed.checkpoint and Orbax, each where installed;
* asyncckpt: a blocking save, an asynchronous save (time until ``write()`` returns = the training
  stall, and time until ``sync()`` returns = durable), and restore;

for (a) a large state split into a few big arrays (1 GiB by default) and (b) many small arrays
(10,000 of 4 KiB by default). Every write is durable before its clock stops: the file is fsynced, or
the library fsyncs (TensorStore's ``file`` kvstore with ``file_io_sync``, asyncckpt's commit).
Every read is checked against the original arrays, outside the timed region.

Reads are timed twice: *cold*, after ``fsync`` and ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every
file of the checkpoint (drops this file's clean pages from the page cache; a virtual disk may still
be cached by its host, compare the disk row's cold and warm figures), and *warm*, right after.

Peak extra memory is the peak resident set size during the operation minus the resident set size
before it: ``VmHWM`` from ``/proc/self/status`` after resetting it through ``/proc/self/clear_refs``
(exact, Linux >= 4.0), or, where that reset is refused, ``VmRSS`` sampled every millisecond by a
thread (may miss short peaks). The report says which.

``--scaling`` adds asyncckpt save/restore times from 1 MB to 4 GB and against the number of arrays.
Results are printed as Markdown; ``--output FILE`` also writes them to a file.

    python benchmarks/bench.py --quick
    python benchmarks/bench.py [--size-mb 1024] [--small-arrays 10000] [--dir D]
    python benchmarks/bench.py --scaling [--scaling-sizes-mb 1,16,256,1024,4096]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import importlib
import importlib.metadata
import inspect
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

__all__ = ["main"]

MiB = 1 << 20
GB = 1e9


# ---------------------------------------------------------------------------------------------- state
def iter_large_arrays(total_bytes: int, n_arrays: int, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """``n_arrays`` float32 arrays of shape ``(rows, 1024)`` adding up to about ``total_bytes``, one at a time."""
    rng = np.random.default_rng(seed)
    row_bytes = 1024 * 4
    rows = max(1, total_bytes // n_arrays // row_bytes)
    for i in range(n_arrays):
        yield f"large_{i:02d}", rng.random((rows, 1024), dtype=np.float32)


def large_state(total_bytes: int, n_arrays: int, seed: int = 0) -> dict[str, np.ndarray]:
    return dict(iter_large_arrays(total_bytes, n_arrays, seed))


def small_state(count: int, nbytes: int, seed: int = 1) -> dict[str, np.ndarray]:
    """``count`` float32 arrays of ``nbytes`` bytes each."""
    rng = np.random.default_rng(seed)
    block = rng.random(count * max(1, nbytes // 4), dtype=np.float32).reshape(count, -1)
    return {f"small_{i:05d}": block[i].copy() for i in range(count)}


def state_bytes(state: dict[str, np.ndarray]) -> int:
    return sum(array.nbytes for array in state.values())


def check_equal(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], what: str) -> None:
    """Fail loudly if a read did not return exactly what was written (never part of a timing)."""
    if expected.keys() != actual.keys():
        missing = sorted(set(expected) ^ set(actual))[:5]
        raise AssertionError(f"{what}: read a different set of arrays (first differences: {missing})")
    for name, array in expected.items():
        got = np.asarray(actual[name])
        if got.shape != array.shape or got.dtype != array.dtype or not np.array_equal(got, array):
            raise AssertionError(f"{what}: array {name!r} differs from what was written")


# ---------------------------------------------------------------------------------------------- OS helpers
def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    for name in files_under(path):
        fsync_path(name)


def files_under(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return [os.path.join(top, name) for top, _, names in os.walk(path) for name in names]


def evict(path: str) -> None:
    """Drop the clean page-cache pages of every file under ``path`` (fsync first so all are clean)."""
    for name in files_under(path):
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_proc_kib(field_name: str, path: str = "/proc/self/status") -> int:
    """A ``Name:   123 kB`` field of a /proc file, in KiB."""
    with open(path) as proc:
        for line in proc:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field_name} not in {path}")


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


PEAK_RSS_METHOD = (
    "VmHWM after resetting it through /proc/self/clear_refs (exact)"
    if _can_reset_peak_rss()
    else "VmRSS sampled every 1 ms by a thread (can miss short peaks)"
)


class PeakRSS:
    """Context manager: ``extra_mib`` = peak resident memory inside the block minus memory before it."""

    def __init__(self) -> None:
        self.extra_mib = float("nan")

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self._before = read_proc_kib("VmRSS")
        if PEAK_RSS_METHOD.startswith("VmHWM"):
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        else:
            self._peak = self._before
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, read_proc_kib("VmRSS"))

    def __exit__(self, *exc) -> None:
        if PEAK_RSS_METHOD.startswith("VmHWM"):
            peak = read_proc_kib("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, read_proc_kib("VmRSS"))
        self.extra_mib = max(0, peak - self._before) / 1024


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Row:
    """One method's figures on one state; times in seconds (medians over repeats)."""

    method: str
    nbytes: int
    arrays: int
    write_s: float | None = None
    stall_s: float | None = None
    cold_read_s: float | None = None
    warm_read_s: float | None = None
    write_rss_mib: float | None = None
    read_rss_mib: float | None = None


@dataclass
class Case:
    title: str
    state: dict[str, np.ndarray]
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def row(self, method: str) -> Row | None:
        return next((row for row in self.rows if row.method == method), None)


def timed(function: Callable, *args) -> tuple[float, object]:
    """Seconds taken by ``function(*args)``, and its result."""
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------------------------- methods
# A method is (write, read): write(target, state) makes a durable copy of ``state`` at ``target``
# (a path that does not exist yet); read(target, state) returns a dict of arrays equal to ``state``.


def disk_write(target: str, state: dict[str, np.ndarray]) -> None:
    with open(target, "wb", buffering=0) as handle:
        for array in state.values():
            handle.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        os.fsync(handle.fileno())


def disk_read(target: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    with open(target, "rb", buffering=0) as handle:
        for name, like in state.items():
            array = np.empty_like(like)
            view = memoryview(array).cast("B")
            filled = 0
            while filled < len(view):
                filled += handle.readinto(view[filled:])
            out[name] = array
    return out


def savez_write(target: str, state: dict[str, np.ndarray]) -> None:
    np.savez(target, **state)
    fsync_path(target + ".npz")


def savez_read(target: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with np.load(target + ".npz") as archive:
        return {name: archive[name] for name in archive.files}


def _tensorstore():
    import tensorstore as ts  # noqa: PLC0415 - benchmark-only import

    return ts


def ts_kvstore_write(target: str, state: dict[str, np.ndarray]) -> None:
    ts = _tensorstore()
    kvstore = ts.KvStore.open({"driver": "file", "path": target + "/"}).result()
    futures = [kvstore.write(name, array.tobytes()) for name, array in state.items()]
    for future in futures:
        future.result()


def ts_kvstore_read(target: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ts = _tensorstore()
    kvstore = ts.KvStore.open({"driver": "file", "path": target + "/"}).result()
    futures = {name: kvstore.read(name) for name in state}
    return {
        name: np.frombuffer(future.result().value, dtype=state[name].dtype).reshape(state[name].shape)
        for name, future in futures.items()
    }


def _zarr_spec(target: str, name: str) -> dict:
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{target}/{name}/"}}


def ts_zarr_write(target: str, state: dict[str, np.ndarray]) -> None:
    ts = _tensorstore()
    opened = []
    for name, array in state.items():
        # Chunks of at most 64 MiB along the first axis, one chunk for small arrays.
        rows_per_chunk = max(1, min(array.shape[0], (64 * MiB) // max(1, array[:1].nbytes)))
        chunk = (rows_per_chunk, *array.shape[1:])
        layout = ts.ChunkLayout(write_chunk_shape=chunk)
        future = ts.open(
            _zarr_spec(target, name), create=True, dtype=array.dtype, shape=array.shape, chunk_layout=layout
        )
        opened.append((future, array))
    writes = [future.result().write(array) for future, array in opened]
    for write in writes:
        write.result()


def ts_zarr_read(target: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ts = _tensorstore()
    opened = {name: ts.open(_zarr_spec(target, name)) for name in state}
    reads = {name: future.result().read() for name, future in opened.items()}
    return {name: future.result() for name, future in reads.items()}


def torch_save_write(target: str, state: dict[str, np.ndarray]) -> None:
    import torch  # noqa: PLC0415 - optional

    torch.save({name: torch.from_numpy(array) for name, array in state.items()}, target)
    fsync_path(target)


def torch_save_read(target: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch  # noqa: PLC0415 - optional

    loaded = torch.load(target, weights_only=True)
    return {name: tensor.numpy() for name, tensor in loaded.items()}


def _no_dist(function) -> dict:
    """``no_dist=True`` where supported: one process, no process group, and no warning about it."""
    return {"no_dist": True} if "no_dist" in inspect.signature(function).parameters else {}


def dcp_write(target: str, state: dict[str, np.ndarray]) -> None:
    import torch  # noqa: PLC0415 - optional
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415 - optional

    tensors = {name: torch.from_numpy(array) for name, array in state.items()}
    dcp.save(tensors, checkpoint_id=target, **_no_dist(dcp.save))
    fsync_tree(target)


def dcp_read(target: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch  # noqa: PLC0415 - optional
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415 - optional

    into = {name: torch.from_numpy(np.empty_like(array)) for name, array in state.items()}
    dcp.load(into, checkpoint_id=target, **_no_dist(dcp.load))
    return {name: tensor.numpy() for name, tensor in into.items()}


def orbax_write(target: str, state: dict[str, np.ndarray]) -> None:
    import orbax.checkpoint as ocp  # noqa: PLC0415 - optional

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(target, state)
        checkpointer.wait_until_finished()
    fsync_tree(target)


def orbax_read(target: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp  # noqa: PLC0415 - optional

    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(target, state)
    return {name: np.asarray(value) for name, value in restored.items()}


def optional_module(name: str) -> str | None:
    """``None`` if ``name`` imports, else why not."""
    try:
        importlib.import_module(name)
    except Exception as error:  # ImportError, or a broken install raising something else
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None


BASELINES: list[tuple[str, Callable, Callable, str | None]] = [
    # (name, write, read, module that must import)
    ("disk: sequential write+fsync / read", disk_write, disk_read, None),
    ("numpy.savez+fsync / np.load", savez_write, savez_read, None),
    ("tensorstore kvstore (file)", ts_kvstore_write, ts_kvstore_read, "tensorstore"),
    ("tensorstore zarr3 (file)", ts_zarr_write, ts_zarr_read, "tensorstore"),
    ("torch.save+fsync / torch.load", torch_save_write, torch_save_read, "torch"),
    ("torch.distributed.checkpoint", dcp_write, dcp_read, "torch.distributed.checkpoint"),
    ("orbax StandardCheckpointer", orbax_write, orbax_read, "orbax.checkpoint"),
]


def run_baseline(case: Case, workdir: str, name: str, write, read, repeat: int) -> Row:
    writes, colds, warms, write_rss, read_rss = [], [], [], [], []
    for attempt in range(repeat):
        target = os.path.join(workdir, f"{write.__name__}-{attempt}")
        with PeakRSS() as rss:
            seconds, _ = timed(write, target, case.state)
        writes.append(seconds)
        write_rss.append(rss.extra_mib)
        actual_target = target + ".npz" if write is savez_write else target
        evict(actual_target)
        with PeakRSS() as rss:
            seconds, out = timed(read, target, case.state)
        colds.append(seconds)
        read_rss.append(rss.extra_mib)
        check_equal(case.state, out, name)
        del out
        seconds, out = timed(read, target, case.state)
        warms.append(seconds)
        check_equal(case.state, out, name)
        del out
        remove(actual_target)
    return Row(
        name,
        state_bytes(case.state),
        len(case.state),
        write_s=median(writes),
        cold_read_s=median(colds),
        warm_read_s=median(warms),
        write_rss_mib=max(write_rss),
        read_rss_mib=max(read_rss),
    )


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


# ---------------------------------------------------------------------------------------------- asyncckpt
def digest(array: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(array).data, digest_size=16).digest()


def build_checkpoint(arrays: Iterable[tuple[str, np.ndarray]]):
    """A ``Checkpoint`` tracking one ``Variable`` per array, and a digest of each array to verify restores.

    The Variables copy the arrays, so ``arrays`` may be a generator whose arrays are dropped at once.
    """
    import asyncckpt as ac  # noqa: PLC0415 - imported late so --help works without the package

    variables, digests = {}, {}
    for name, array in arrays:
        variables[name] = ac.Variable(array)
        digests[name] = digest(array)
    return ac.Checkpoint(**variables), variables, digests


def verify_variables(variables: dict, digests: dict[str, bytes], what: str) -> None:
    """Fail loudly unless every Variable holds exactly the bytes it was built from (never timed)."""
    differing = [name for name, variable in variables.items() if digest(variable.numpy()) != digests[name]]
    if differing:
        raise AssertionError(f"{what}: {len(differing)} arrays differ from what was saved, e.g. {differing[:3]}")


def asyncckpt_files(prefix: str) -> list[str]:
    """Every path belonging to checkpoint ``prefix`` (``P.index``, ``P.data-*``)."""
    directory, stem = os.path.split(prefix)
    return [os.path.join(directory, name) for name in os.listdir(directory) if name.startswith(stem + ".")]


def run_asyncckpt(arrays: Iterable[tuple[str, np.ndarray]], workdir: str, repeat: int) -> list[Row]:
    import asyncckpt as ac  # noqa: PLC0415

    checkpoint, variables, digests = build_checkpoint(arrays)
    async_options = ac.CheckpointOptions(enable_async=True)
    nbytes, count = sum(variable.nbytes for variable in variables.values()), len(variables)
    sync_writes, sync_rss, stalls, durables, async_rss = [], [], [], [], []
    colds, warms, read_rss = [], [], []
    for attempt in range(repeat):
        prefix = os.path.join(workdir, f"sync-{attempt}", "ckpt")
        os.makedirs(os.path.dirname(prefix))
        with PeakRSS() as rss:
            seconds, _ = timed(checkpoint.write, prefix)
        sync_writes.append(seconds)
        sync_rss.append(rss.extra_mib)
        shutil.rmtree(os.path.dirname(prefix))

        prefix = os.path.join(workdir, f"async-{attempt}", "ckpt")
        os.makedirs(os.path.dirname(prefix))
        with PeakRSS() as rss:
            start = time.perf_counter()
            checkpoint.write(prefix, options=async_options)
            stalls.append(time.perf_counter() - start)
            checkpoint.sync()
            durables.append(time.perf_counter() - start)
        async_rss.append(rss.extra_mib)

        for variable in variables.values():  # so that the check below proves the restore happened
            variable.assign(np.zeros(variable.shape, variable.dtype))
        for path in asyncckpt_files(prefix):
            evict(path)
        with PeakRSS() as rss:
            seconds, _ = timed(checkpoint.read, prefix)
        colds.append(seconds)
        read_rss.append(rss.extra_mib)
        verify_variables(variables, digests, "asyncckpt restore")
        seconds, _ = timed(checkpoint.read, prefix)
        warms.append(seconds)
        shutil.rmtree(os.path.dirname(prefix))
    return [
        Row("asyncckpt save (blocking) / restore", nbytes, count, write_s=median(sync_writes),
            cold_read_s=median(colds), warm_read_s=median(warms), write_rss_mib=max(sync_rss),
            read_rss_mib=max(read_rss)),
        Row("asyncckpt save (async): until durable", nbytes, count, write_s=median(durables), stall_s=median(stalls),
            write_rss_mib=max(async_rss)),
    ]  # fmt: skip


def training_overhead(args, workdir: str) -> list[dict]:
    """Per-step time of a NumPy loop that mutates its state, saving never / every step / every k steps.

    Besides fixed intervals, one mode saves every ``n`` steps with ``n`` chosen so that the compute
    between saves lasts at least 1.5 times one blocking save (measured first): the disk keeps up, so
    what remains is the cost the writes put on the loop. That mode is measured in paired rounds --
    ``4n`` steps without checkpointing, then ``4n`` steps saving after steps ``n``, ``2n`` and ``3n``
    (the last write has ``n`` steps to finish before the final ``sync()``, which is timed) -- and
    its overhead is the median over the rounds of the ratio within each pair, since the shared
    machine drifts by more than the effect being measured. The fixed modes run once each, against
    the mean of a run without checkpointing before them and one after.
    """
    import asyncckpt as ac  # noqa: PLC0415

    checkpoint, variables, _ = build_checkpoint(iter_large_arrays(args.train_state_mb * MiB, n_arrays=8, seed=3))
    names = list(variables)
    rng = np.random.default_rng(4)
    matrix = rng.random((args.train_matmul, args.train_matmul), dtype=np.float32)

    def step(index: int) -> None:
        product = matrix @ matrix  # the "compute" of the step
        variables[names[index % len(names)]].assign_add(float(product[0, 0] * 1e-9))  # an optimizer update

    def run(label: str, every: int | None, options, steps: int, last_save: int | None = None) -> dict:
        directory = os.path.join(workdir, "train", label.replace(" ", "-").replace("(", "").replace(")", ""))
        manager = ac.CheckpointManager(checkpoint, directory, max_to_keep=2)
        step(0)  # warm up BLAS threads and caches
        stalls = []
        start, cpu_start = time.perf_counter(), time.process_time()
        for index in range(steps):
            step(index)
            if every is not None and (index + 1) % every == 0 and (last_save is None or index + 1 <= last_save):
                before = time.perf_counter()
                manager.save(options=options)
                stalls.append(time.perf_counter() - before)
        loop_s = time.perf_counter() - start
        checkpoint.sync()
        total_s, total_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        shutil.rmtree(directory, ignore_errors=True)
        return {"mode": label, "every": every, "steps": steps, "per_step_s": loop_s / steps,
                "cpu_per_step_s": total_cpu / steps, "with_final_sync_s": total_s, "saves": len(stalls),
                "stall_s": statistics.median(stalls) if stalls else None}

    asynchronous, blocking = ac.CheckpointOptions(enable_async=True), ac.CheckpointOptions(enable_async=False)
    steps = args.train_steps
    first = run("no checkpointing", None, None, steps)
    save_s = run("one blocking save", 1, blocking, 1)["stall_s"]  # the whole save: it blocks
    keeps_up = max(2, math.ceil(1.5 * save_s / first["per_step_s"]))
    fixed = [
        run("async save every step", 1, asynchronous, steps),
        run("blocking save every step", 1, blocking, steps),
        run("async save every 10 steps", 10, asynchronous, steps),
    ]
    last = run("no checkpointing (again)", None, None, steps)
    base = statistics.fmean([first["per_step_s"], last["per_step_s"]])
    base_cpu = statistics.fmean([first["cpu_per_step_s"], last["cpu_per_step_s"]])
    for result in [first, *fixed, last]:
        result["overhead"] = result["with_final_sync_s"] / result["steps"] / base - 1 if result["every"] else None
        result["extra_cpu_s"] = (
            (result["cpu_per_step_s"] - base_cpu) * result["steps"] / result["saves"] if result["saves"] else None
        )
    def paired(every: int, why: str) -> dict:
        pairs = []
        for _ in range(max(1, args.repeat)):
            plain = run("paired: no checkpointing", None, None, 4 * every)
            saving = run("paired: saving", every, asynchronous, 4 * every, last_save=3 * every)
            pairs.append((plain, saving))
        ratios = [saving["with_final_sync_s"] / plain["with_final_sync_s"] for plain, saving in pairs]
        plain, saving = sorted(zip(ratios, pairs), key=lambda item: item[0])[len(pairs) // 2][1]
        return {
            **saving,
            "mode": f"async save every {every} steps, paired rounds ({why})",
            "per_step_s": saving["with_final_sync_s"] / saving["steps"],
            "overhead": statistics.median(ratios) - 1,
            "extra_cpu_s": (saving["cpu_per_step_s"] - plain["cpu_per_step_s"]) * saving["steps"] / max(1, saving["saves"]),
            "rounds": [ratio - 1 for ratio in ratios],
        }

    kept = [paired(keeps_up, "disk keeps up")]
    if args.train_long_every > keeps_up:
        kept.append(paired(args.train_long_every, "longer interval"))
    results = [first, *fixed, *kept, last]
    for result in results:
        result["save_s"] = save_s
    return results


def scaling(args, workdir: str) -> tuple[list[dict], list[dict]]:
    """asyncckpt save/restore time against total size, and against the number of 4 KiB arrays."""
    by_size = [
        scaling_point(iter_large_arrays(size_mb * MiB, n_arrays=4, seed=5), workdir)
        for size_mb in args.scaling_sizes_mb
    ]
    by_count = [
        scaling_point(small_state(count, args.small_kb * 1024, seed=6).items(), workdir)
        for count in args.scaling_counts
    ]
    return by_size, by_count


def scaling_point(arrays: Iterable[tuple[str, np.ndarray]], workdir: str) -> dict:
    """One asyncckpt measurement; only the Variables hold the state (arrays may come from a generator)."""
    sync_row, async_row = run_asyncckpt(arrays, os.path.join(workdir, "scaling"), repeat=1)
    gc.collect()
    return {
        "nbytes": sync_row.nbytes,
        "arrays": sync_row.arrays,
        "stall_s": async_row.stall_s,
        "durable_s": async_row.write_s,
        "blocking_s": sync_row.write_s,
        "cold_restore_s": sync_row.cold_read_s,
        "warm_restore_s": sync_row.warm_read_s,
    }


# ---------------------------------------------------------------------------------------------- report
def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_bw(nbytes: int, seconds: float | None) -> str:
    return "–" if not seconds else f"{nbytes / seconds / GB:.2f} GB/s"


def fmt_mib(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def fmt_ratio(numerator: float | None, denominator: float | None) -> str:
    return "–" if not numerator or not denominator else f"{numerator / denominator:.2f}×"


def machine_description(workdir: str) -> list[str]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    ram_gib = read_proc_kib("MemTotal", "/proc/meminfo") / MiB
    versions = []
    for package in ("numpy", "tensorstore", "asyncckpt", "torch", "orbax-checkpoint", "jax"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{package} {importlib.metadata.version(package)}")
    blas = [f"{name}={os.environ[name]}" for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if name in os.environ]
    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- CPU: {cpu}, {os.cpu_count()} cores; RAM: {ram_gib:.1f} GiB",
        f"- disk for `{workdir}`: {describe_disk(workdir)}",
        f"- OS: {platform.platform()}; Python {platform.python_version()}",
        f"- packages: {', '.join(versions)}" + (f"; BLAS env: {' '.join(blas)}" if blas else ""),
        f"- asyncckpt source: {source_revision()}",
        f"- peak extra memory: {PEAK_RSS_METHOD}",
        f"- load average at start (1/5/15 min): {load_average()} (other processes share the CPUs and the disk)",
    ]


def source_revision() -> str:
    """The git commit of the imported asyncckpt, and whether its package files have uncommitted changes."""
    try:
        import asyncckpt  # noqa: PLC0415

        package = os.path.dirname(asyncckpt.__file__)
        git = ["git", "-C", package]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "."], capture_output=True, text=True, check=True)
    except (ImportError, OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def load_average() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def describe_disk(path: str) -> str:
    """File system type and mount point, block device and whether the kernel calls it rotational."""
    path = os.path.realpath(path)
    mount, fstype, source = "/", "?", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            device, point, kind = line.split()[:3]
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(mount):
                mount, fstype, source = point, kind, device
    description = f"{fstype} on {source} (mounted at {mount})"
    dev = os.stat(path).st_dev
    sys_block = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    with contextlib.suppress(OSError):
        device = os.path.basename(os.path.realpath(sys_block))
        queue = os.path.join(os.path.realpath(sys_block), "queue", "rotational")
        if not os.path.exists(queue):  # a partition: the queue belongs to the parent device
            queue = os.path.join(os.path.dirname(os.path.realpath(sys_block)), "queue", "rotational")
        with open(queue) as rotational:
            kind = "rotational" if rotational.read().strip() == "1" else "non-rotational"
        description += f", block device {device} reported {kind} (virtual disks often report rotational)"
    return description


def case_table(case: Case) -> list[str]:
    nbytes = state_bytes(case.state)
    lines = [
        f"### {case.title}: {len(case.state)} arrays, {nbytes / MiB:.1f} MiB",
        "",
        "| method | write (durable) | write bandwidth | save() stall | cold read | cold read bandwidth | warm read "
        "| peak extra MiB write / read |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in case.rows:
        lines.append(
            f"| {row.method} | {fmt_s(row.write_s)} | {fmt_bw(nbytes, row.write_s)} | {fmt_s(row.stall_s)} "
            f"| {fmt_s(row.cold_read_s)} | {fmt_bw(nbytes, row.cold_read_s)} | {fmt_s(row.warm_read_s)} "
            f"| {fmt_mib(row.write_rss_mib)} / {fmt_mib(row.read_rss_mib)} |"
        )
    if case.skipped:
        lines += ["", "Skipped: " + "; ".join(case.skipped) + "."]
    lines += ["", *ratio_lines(case), ""]
    return lines


def ratio_lines(case: Case) -> list[str]:
    disk = case.row("disk: sequential write+fsync / read")
    savez = case.row("numpy.savez+fsync / np.load")
    kv = case.row("tensorstore kvstore (file)")
    blocking = case.row("asyncckpt save (blocking) / restore")
    durable = case.row("asyncckpt save (async): until durable")
    if blocking is None or durable is None:
        return []

    def other(row: Row | None, attribute: str) -> float | None:
        return getattr(row, attribute) if row is not None else None

    # (what, numerator, denominator): times, so "other / asyncckpt" reads as asyncckpt's speed-up.
    ratios = [
        ("disk write time / asyncckpt async durable time", other(disk, "write_s"), durable.write_s),
        ("disk write time / asyncckpt blocking save time", other(disk, "write_s"), blocking.write_s),
        ("disk cold read time / asyncckpt cold restore time", other(disk, "cold_read_s"), blocking.cold_read_s),
        ("savez+fsync time / asyncckpt async durable time", other(savez, "write_s"), durable.write_s),
        ("np.load cold time / asyncckpt cold restore time", other(savez, "cold_read_s"), blocking.cold_read_s),
        ("TensorStore kvstore write time / asyncckpt async durable time", other(kv, "write_s"), durable.write_s),
        ("TensorStore kvstore cold read time / asyncckpt cold restore time", other(kv, "cold_read_s"),
         blocking.cold_read_s),
    ]  # fmt: skip
    n = len(case.state)
    return [
        "Ratios (above 1× means asyncckpt was faster; against the disk, 1× means asyncckpt ran at disk speed):",
        "",
        *(f"- {what}: {fmt_ratio(numerator, denominator)}" for what, numerator, denominator in ratios),
        f"- training stall: save() returned after {fmt_s(durable.stall_s)}, "
        f"{durable.stall_s / durable.write_s:.1%} of the time until durable",
    ] + (
        [f"- per array: async durable save {durable.write_s / n * 1e6:.0f} µs, "
         f"cold restore {blocking.cold_read_s / n * 1e6:.0f} µs"]
        if n >= 100 else []
    )  # fmt: skip


def overhead_table(results: list[dict], args) -> list[str]:
    baselines = [result for result in results if result["every"] is None]
    base = statistics.fmean(result["per_step_s"] for result in baselines)
    rounds = "; ".join(
        f"every {result['every']}: " + ", ".join(f"{value:+.1%}" for value in result["rounds"])
        for result in results if "rounds" in result
    )
    lines = [
        f"### Training overhead: {args.train_state_mb} MiB state in 8 Variables, each step a "
        f"{args.train_matmul}² float32 matmul plus one Variable update; CheckpointManager(max_to_keep=2)",
        "",
        f"One blocking save of the state took {fmt_s(results[0]['save_s'])}. Time per step includes the final "
        f"sync(). Fixed intervals are against the mean of the two runs without checkpointing ({fmt_s(base)} per "
        f"step); paired modes against the run just before each round (medians of rounds -- {rounds}). Extra CPU "
        "is the process's CPU time per save beyond the loop's own (on a loop using every core it includes "
        "cores waiting for each other).",
        "",
        "| mode | steps | time per step | overhead vs no checkpointing | save() stall (median) | extra CPU per save |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        overhead = f"{result['overhead']:+.1%}" if result["overhead"] is not None else "–"
        extra_cpu = fmt_s(result["extra_cpu_s"]) if result["extra_cpu_s"] is not None else "–"
        lines.append(
            f"| {result['mode']} | {result['steps']} | {fmt_s(result['per_step_s'])} | {overhead} "
            f"| {fmt_s(result['stall_s'])} | {extra_cpu} |"
        )
    return lines + [""]


def scaling_tables(by_size: list[dict], by_count: list[dict]) -> list[str]:
    lines = [
        "### asyncckpt scaling with total size (4 arrays)",
        "",
        "| size | save() stall | until durable | durable bandwidth | blocking save | cold restore | warm restore |",
        "|---|---|---|---|---|---|---|",
    ]
    for point in by_size:
        lines.append(
            f"| {point['nbytes'] / MiB:.0f} MiB | {fmt_s(point['stall_s'])} | {fmt_s(point['durable_s'])} "
            f"| {fmt_bw(point['nbytes'], point['durable_s'])} | {fmt_s(point['blocking_s'])} "
            f"| {fmt_s(point['cold_restore_s'])} | {fmt_s(point['warm_restore_s'])} |"
        )
    lines += [
        "",
        "### asyncckpt scaling with the number of arrays",
        "",
        "| arrays | bytes | save() stall | until durable | per array | cold restore | per array |",
        "|---|---|---|---|---|---|---|",
    ]
    for point in by_count:
        lines.append(
            f"| {point['arrays']} | {point['nbytes'] / 1024:.0f} KiB | {fmt_s(point['stall_s'])} "
            f"| {fmt_s(point['durable_s'])} | {point['durable_s'] / point['arrays'] * 1e6:.0f} µs "
            f"| {fmt_s(point['cold_restore_s'])} | {point['cold_restore_s'] / point['arrays'] * 1e6:.0f} µs |"
        )
    return lines + [""]


# ---------------------------------------------------------------------------------------------- main
def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark asyncckpt against the disk, TensorStore, numpy.savez and others.",
        epilog="All sizes are MiB (2**20 bytes). Results go to stdout as Markdown.",
    )
    parser.add_argument("--size-mb", type=positive_int, default=None, help="large state size (default 1024)")
    parser.add_argument("--large-arrays", type=positive_int, default=4, help="arrays in the large state (default 4)")
    parser.add_argument("--small-arrays", type=positive_int, default=None, help="small arrays (default 10000)")
    parser.add_argument("--small-kb", type=positive_int, default=4, help="KiB per small array (default 4)")
    parser.add_argument("--dir", default=None, help="where to write (default: a new temporary directory)")
    parser.add_argument(
        "--repeat", type=positive_int, default=None, help="repeats, median reported (default 3 with --quick, else 1)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: 64 MiB, 1000 small arrays, short loops")
    parser.add_argument("--scaling", action="store_true", help="also measure asyncckpt vs size and array count")
    parser.add_argument("--scaling-only", action="store_true", help="run only the scaling measurements")
    parser.add_argument("--scaling-sizes-mb", type=int_list, default=None, help="default 1,16,256,1024,4096")
    parser.add_argument("--scaling-counts", type=int_list, default=None, help="default 1,10,100,1000,10000")
    parser.add_argument("--train-state-mb", type=positive_int, default=None, help="training-loop state (default 256)")
    parser.add_argument("--train-steps", type=positive_int, default=None, help="training-loop steps (default 30)")
    parser.add_argument("--train-matmul", type=positive_int, default=1024, help="matmul size per step (default 1024)")
    parser.add_argument("--train-long-every", type=positive_int, default=None,
                        help="also measure saving every N steps in paired rounds (default 150)")
    parser.add_argument("--skip", default="", help="comma-separated method names to skip: disk,savez,kvstore,zarr,"
                        "torch,dcp,orbax,asyncckpt,training")  # fmt: skip
    parser.add_argument("--output", default=None, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "size_mb": 64 if quick else 1024,
        "small_arrays": 1000 if quick else 10000,
        "repeat": 3 if quick else 1,
        "scaling_sizes_mb": [1, 4, 16, 64] if quick else [1, 16, 256, 1024, 4096],
        "scaling_counts": [1, 10, 100, 1000] if quick else [1, 10, 100, 1000, 10000],
        "train_state_mb": 16 if quick else 256,
        "train_steps": 10 if quick else 30,
        "train_long_every": 20 if quick else 150,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    known = {"disk", "savez", "kvstore", "zarr", "torch", "dcp", "orbax", "asyncckpt", "training"}
    if args.skip - known:
        parser.error(f"unknown --skip name(s) {sorted(args.skip - known)}; known: {sorted(known)}")
    return args


SKIP_NAMES = {
    disk_write: "disk",
    savez_write: "savez",
    ts_kvstore_write: "kvstore",
    ts_zarr_write: "zarr",
    torch_save_write: "torch",
    dcp_write: "dcp",
    orbax_write: "orbax",
}


def warm_up(workdir: str, nbytes: int, with_asyncckpt: bool) -> None:
    """Untimed: one durable write to the disk and one tiny asyncckpt round trip (starts its I/O thread).

    Without it the first method measured pays for first-touch costs that later ones do not.
    """
    target = os.path.join(workdir, "warm-up")
    disk_write(target, large_state(nbytes, n_arrays=1, seed=9))
    remove(target)
    if with_asyncckpt:
        run_asyncckpt(small_state(4, 1024).items(), os.path.join(workdir, "warm-up-asyncckpt"), repeat=1)


def free_disk_check(workdir: str, needed: int) -> None:
    free = shutil.disk_usage(workdir).free
    if free < needed:
        raise SystemExit(f"error: {workdir} has {free / GB:.1f} GB free; this run needs about {needed / GB:.1f} GB")


def report_in_workdir(directory: str | None, prefix: str, output: str | None,
                      measure: Callable[[str], list[str]]) -> int:
    """Print the machine section, then the lines ``measure(workdir)`` returns; also write both to ``output``.

    For the other benchmark scripts. Without ``directory``, the work happens in a new temporary
    directory, deleted afterwards.
    """
    owned = directory is None
    workdir = tempfile.mkdtemp(prefix=prefix) if owned else os.path.abspath(directory)
    os.makedirs(workdir, exist_ok=True)
    try:
        lines = ["## Machine", "", *machine_description(workdir), ""]
        print("\n".join(lines), flush=True)
        measured = [*measure(workdir), f"Load average at end (1/5/15 min): {load_average()}", ""]
        print("\n".join(measured), flush=True)
        lines += measured
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
    if output:
        with open(output, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    owned = args.dir is None
    workdir = tempfile.mkdtemp(prefix="asyncckpt-bench-") if owned else os.path.abspath(args.dir)
    os.makedirs(workdir, exist_ok=True)
    report: list[str] = []

    def emit(lines: list[str]) -> None:
        text = "\n".join(lines)
        print(text, flush=True)
        report.append(text)

    try:
        free_disk_check(workdir, 3 * max(args.size_mb, max(args.scaling_sizes_mb) if args.scaling else 0) * MiB)
        emit(["## Machine", "", *machine_description(workdir), ""])
        warm_up(workdir, min(args.size_mb, 256) * MiB, with_asyncckpt="asyncckpt" not in args.skip)
        if not args.scaling_only:
            cases = [
                Case("(a) large arrays", large_state(args.size_mb * MiB, args.large_arrays)),
                Case(f"(b) small arrays of {args.small_kb} KiB", small_state(args.small_arrays, args.small_kb * 1024)),
            ]
            for case in cases:
                print(f"... measuring {case.title}", file=sys.stderr, flush=True)
                for name, write, read, module in BASELINES:
                    if SKIP_NAMES[write] in args.skip:
                        continue
                    why = optional_module(module) if module else None
                    if why is not None:
                        case.skipped.append(f"{name} (not installed: {why})")
                        continue
                    case.rows.append(run_baseline(case, workdir, name, write, read, args.repeat))
                if "asyncckpt" not in args.skip:
                    case.rows.extend(run_asyncckpt(case.state.items(), workdir, args.repeat))
                emit(case_table(case))
                case.state.clear()
                gc.collect()
            if "training" not in args.skip:
                print("... measuring training overhead", file=sys.stderr, flush=True)
                emit(overhead_table(training_overhead(args, workdir), args))
        if args.scaling or args.scaling_only:
            print("... measuring scaling", file=sys.stderr, flush=True)
            emit(scaling_tables(*scaling(args, workdir)))
        emit([f"Load average at end (1/5/15 min): {load_average()}", ""])
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
