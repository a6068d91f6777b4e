"""GPU checkpoint benchmark: save stall, device-to-host bandwidth, durable throughput, restore to device.

Everything is measured in one run on the same arrays, next to raw CuPy copies of the same bytes:

* **save stall** -- wall time until ``Stager.stage`` returns (what ``save()`` costs the training
  loop), per policy: ``device_copy`` (device-to-device copy first), ``stream_wait`` (the training
  stream waits for the copies on the device), ``host_copy`` (the fallback that waits);
* **D2H bandwidth** -- bytes / time from ``stage`` until every chunk has been read on the host
  (``DeviceCapture.chunks()``, zero-copy), against a raw ``memcpyAsync`` of the same arrays into
  one pinned buffer on a non-default stream: the target is >= 90 % of the raw figure;
* **durable throughput** -- ``Checkpoint.save`` of device variables with ``enable_async=True``:
  the time until ``save`` returns and until ``sync()`` returns (the checkpoint is durable);
* **restore to device** -- ``Stager.upload`` of host arrays into existing device arrays, and a full
  ``Checkpoint.restore`` into device variables, against raw H2D copies from pinned memory and
  ``ndarray.set`` from pageable memory;
* **disk** -- the same bytes written with plain ``write`` + ``fsync`` into the checkpoint folder,
  and read back into pinned memory and uploaded (``readinto`` + raw H2D): the ceilings of a
  durable save and of a restore on this machine;
* **many small variables** -- the ``save()`` stall of ``--small-count`` device variables of
  ``--small-kib`` each, once the object structure is cached (the first save is reported too).

Times are medians over ``--repeat`` runs, each after a device synchronise, with a warm pinned pool
(allocating pinned memory is a one-time cost per process, reported separately). Prints a Markdown
table. Without CuPy or a CUDA device it prints why and exits with status 2.

    python benchmarks/gpu_bench.py [--size-mib 1024] [--arrays 8] [--repeat 5] [--dir D] [--small-count 10000]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

__all__ = ["main"]

MiB = 1 << 20


def _cupy_or_exit():
    try:
        import cupy  # noqa: PLC0415 - optional dependency
    except Exception as exc:
        sys.stderr.write(f"gpu_bench: needs CuPy and an NVIDIA GPU; CuPy is not importable ({exc}).\n"
                         "Install it with: pip install -e '.[cuda]'\n")
        raise SystemExit(2) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        count, reason = 0, str(exc)
    else:
        reason = "no CUDA device found"
    if count < 1:
        sys.stderr.write(f"gpu_bench: needs an NVIDIA GPU: {reason}.\n")
        raise SystemExit(2)
    return cupy


def _median_seconds(fn, repeat: int, sync) -> float:
    times = []
    for _ in range(repeat):
        sync()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f}" if seconds > 0 else "-"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _small_variables(ac, cp, args, prefix: str, sync) -> list[tuple[str, str, str, str]]:
    """Save stall of many small device variables: first save, then repeat saves of the same structure."""
    count, size = args.small_count, args.small_kib * 1024 // 4
    variables = [ac.Variable(cp.full(size, i, dtype=cp.float32)) for i in range(count)]
    checkpoint = ac.Checkpoint(vs=variables)
    options = ac.CheckpointOptions(enable_async=True)
    sync()
    started = time.perf_counter()
    checkpoint.write(prefix, options=options)
    first = time.perf_counter() - started
    checkpoint.sync()
    stalls, durables = [], []
    for _ in range(args.repeat):
        for variable in variables[:: max(1, count // 100)]:
            variable.assign_add(1.0)  # training changed some values since the last save
        sync()
        started = time.perf_counter()
        checkpoint.write(prefix, options=options)
        stalls.append(time.perf_counter() - started)
        checkpoint.sync()
        durables.append(time.perf_counter() - started)
    restored = [ac.Variable(cp.zeros(size, dtype=cp.float32)) for _ in range(count)]
    ac.Checkpoint(vs=restored).read(prefix).assert_existing_objects_matched()
    assert all(bool((r.array == v.array).all()) for r, v in zip(restored, variables)), "small variables restored wrong"
    label = f"{count} x {args.small_kib} KiB device variables, save()"
    nbytes = count * size * 4
    return [
        (f"{label}: first save (structure not cached)", _ms(first), "-", "-"),
        (f"{label}: repeat saves", _ms(statistics.median(stalls)), _ms(statistics.median(durables)),
         _gbps(nbytes, statistics.median(durables))),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="total bytes of the state (default 1024)")
    parser.add_argument("--arrays", type=int, default=8, help="number of equal arrays (default 8)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement; the median is reported")
    parser.add_argument("--chunk-mib", type=int, default=16, help="pinned chunk size (default 16)")
    parser.add_argument("--pinned-mib", type=int, default=0,
                        help="pinned pool size (default: the state size, so stream_wait can take it all)")
    parser.add_argument("--dir", default=None, help="where the durable-throughput checkpoint goes (default: a temp dir)")
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--small-count", type=int, default=10_000, help="small device variables (0 skips the row)")
    parser.add_argument("--small-kib", type=int, default=4, help="size of each small variable in KiB")
    args = parser.parse_args(argv)
    cp = _cupy_or_exit()

    import asyncckpt as ac  # noqa: PLC0415 - after the GPU check, so its absence is reported first
    from asyncckpt import _cuda  # noqa: PLC0415

    cp.cuda.Device(args.device).use()
    sync = cp.cuda.Device(args.device).synchronize
    per_array = args.size_mib * MiB // args.arrays // 4 * 4
    arrays = [cp.random.default_rng(i).standard_normal(per_array // 4, dtype=cp.float32) for i in range(args.arrays)]
    total = sum(int(a.nbytes) for a in arrays)
    chunk = args.chunk_mib * MiB
    pinned = args.pinned_mib * MiB or math.ceil(total / chunk) * chunk
    backend = _cuda.cupy_backend(args.device)
    rows: list[tuple[str, str, str, str]] = []

    # --- raw baselines --------------------------------------------------------------------
    runtime = cp.cuda.runtime
    raw_stream = cp.cuda.Stream(non_blocking=True)
    started = time.perf_counter()
    raw_host = np.frombuffer(cp.cuda.alloc_pinned_memory(total), np.uint8, total)
    raw_host[::4096] = 0  # touch every page
    pinned_alloc_seconds = time.perf_counter() - started

    def raw_d2h():
        offset = 0
        for a in arrays:
            runtime.memcpyAsync(raw_host.ctypes.data + offset, a.data.ptr, a.nbytes, runtime.memcpyDeviceToHost, raw_stream.ptr)
            offset += a.nbytes
        raw_stream.synchronize()

    def raw_h2d():
        offset = 0
        for a in arrays:
            runtime.memcpyAsync(a.data.ptr, raw_host.ctypes.data + offset, a.nbytes, runtime.memcpyHostToDevice, raw_stream.ptr)
            offset += a.nbytes
        raw_stream.synchronize()

    raw_d2h()  # warm-up; also fills raw_host with the arrays' bytes for the H2D rows
    host_arrays = [raw_host[i * per_array : (i + 1) * per_array].view(np.float32).copy() for i in range(args.arrays)]
    t_raw_d2h = _median_seconds(raw_d2h, args.repeat, sync)
    t_raw_h2d = _median_seconds(raw_h2d, args.repeat, sync)
    t_set = _median_seconds(lambda: ([a.set(h) for a, h in zip(arrays, host_arrays)], sync()), args.repeat, sync)
    rows.append(("raw D2H, pinned memcpyAsync", "-", _ms(t_raw_d2h), _gbps(total, t_raw_d2h)))
    rows.append(("raw H2D, pinned memcpyAsync", "-", _ms(t_raw_h2d), _gbps(total, t_raw_h2d)))
    rows.append(("raw H2D, ndarray.set from pageable", "-", _ms(t_set), _gbps(total, t_set)))

    # --- staging policies -----------------------------------------------------------------
    results = {}
    for policy, safety, pool in (
        (_cuda.DEVICE_COPY, _cuda.DEFAULT_SAFETY_FACTOR, pinned),
        (_cuda.STREAM_WAIT, math.inf, pinned),
        (_cuda.HOST_COPY, math.inf, chunk),
    ):
        stager = _cuda.Stager(backend, pinned_bytes=pool, chunk_bytes=chunk, safety_factor=safety)
        started = time.perf_counter()
        stager.warm_up()
        warm = time.perf_counter() - started
        stalls, totals, chosen = [], [], set()
        for _ in range(args.repeat):
            sync()
            started = time.perf_counter()
            captures = stager.stage(arrays)
            stalls.append(time.perf_counter() - started)
            for capture in captures:
                chosen.add(capture.policy)
                for _offset, _view in capture.chunks():
                    pass
            totals.append(time.perf_counter() - started)
            del captures
        stall, whole = statistics.median(stalls), statistics.median(totals)
        results[policy] = whole
        label = f"stage ({'/'.join(sorted(chosen))}), pinned pool warm-up {_ms(warm)} ms"
        rows.append((label, _ms(stall), _ms(whole), f"{_gbps(total, whole)} ({100 * t_raw_d2h / whole:.0f} % of raw)"))
        stager.close()

    # --- restore to device ------------------------------------------------------------------
    stager = _cuda.Stager(backend, pinned_bytes=pinned, chunk_bytes=chunk)
    stager.warm_up()

    def upload_all():
        for a, h in zip(arrays, host_arrays):
            stager.upload(h, a)
        sync()

    t_upload = _median_seconds(upload_all, args.repeat, sync)
    rows.append(("upload (pinned, chunked, async)", "-", _ms(t_upload), f"{_gbps(total, t_upload)} ({100 * t_raw_h2d / t_upload:.0f} % of raw)"))

    # --- durable throughput through the checkpoint API ----------------------------------------
    folder = args.dir or tempfile.mkdtemp(prefix="asyncckpt-gpu-bench-")
    os.makedirs(folder, exist_ok=True)
    try:
        variables = {f"w{i}": ac.Variable(a) for i, a in enumerate(arrays)}
        checkpoint = ac.Checkpoint(**variables)
        settings = ac.WriteSettings(staging_budget_bytes=max(pinned, 64 * MiB), chunk_bytes=64 * MiB)
        options = ac.CheckpointOptions(enable_async=True, write_settings=settings)
        returns, durables = [], []
        for i in range(args.repeat):
            sync()
            started = time.perf_counter()
            path = checkpoint.save(os.path.join(folder, "ckpt"), options=options)
            returns.append(time.perf_counter() - started)
            checkpoint.sync()
            durables.append(time.perf_counter() - started)
        t_return, t_durable = statistics.median(returns), statistics.median(durables)
        rows.append(("Checkpoint.save async: until save() returns", _ms(t_return), "-", "-"))
        rows.append(("Checkpoint.save async: until durable (sync())", "-", _ms(t_durable), _gbps(total, t_durable)))
        targets = {name: ac.Variable(cp.zeros_like(a)) for name, a in zip(variables, arrays)}
        restore_checkpoint = ac.Checkpoint(**targets)
        t_restore = _median_seconds(lambda: (restore_checkpoint.restore(path), sync()), args.repeat, sync)
        rows.append(("Checkpoint.restore into device variables", "-", _ms(t_restore),
                     f"{_gbps(total, t_restore)} ({100 * t_raw_h2d / t_restore:.0f} % of raw H2D)"))
        for name, a in zip(targets, arrays):
            assert bool((targets[name].array == a).all()), f"{name} restored wrong"
        raw_file = os.path.join(folder, "ckpt-raw.bin")

        def raw_write():
            with open(raw_file, "wb", buffering=0) as out:
                view = memoryview(raw_host)
                for start in range(0, total, 64 * MiB):
                    out.write(view[start : start + 64 * MiB])
                os.fsync(out.fileno())

        def raw_read_upload():
            with open(raw_file, "rb", buffering=0) as source:
                view = memoryview(raw_host)
                for start in range(0, total, 64 * MiB):
                    source.readinto(view[start : start + 64 * MiB])
            raw_h2d()

        t_raw_write = _median_seconds(raw_write, args.repeat, sync)
        t_raw_read = _median_seconds(raw_read_upload, args.repeat, sync)
        rows.append(("raw write + fsync of the same bytes (disk ceiling)", "-", _ms(t_raw_write),
                     f"{_gbps(total, t_raw_write)} (save: {100 * t_raw_write / t_durable:.0f} % of it)"))
        rows.append(("raw read into pinned + H2D (page cache warm)", "-", _ms(t_raw_read),
                     f"{_gbps(total, t_raw_read)} (restore: {100 * t_raw_read / t_restore:.0f} % of it)"))
        os.remove(raw_file)
        if args.small_count:
            rows.extend(_small_variables(ac, cp, args, os.path.join(folder, "small"), sync))
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            for entry in os.listdir(folder):
                if entry.startswith("ckpt") or entry == "checkpoint":
                    target = os.path.join(folder, entry)
                    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)

    props = cp.cuda.runtime.getDeviceProperties(args.device)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"# asyncckpt GPU benchmark: {name}, {args.arrays} x {per_array / MiB:.1f} MiB float32 = {total / MiB:.0f} MiB, "
          f"chunks of {args.chunk_mib} MiB, pinned pool {pinned / MiB:.0f} MiB, median of {args.repeat}")
    print(f"# one-time pinned allocation of {total / MiB:.0f} MiB: {_ms(pinned_alloc_seconds)} ms; CuPy {cp.__version__}")
    print()
    print("| measurement | save stall (ms) | total (ms) | GB/s |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    d2h = results.get(_cuda.STREAM_WAIT)
    if d2h:
        ratio = t_raw_d2h / d2h
        print()
        print(f"stream_wait D2H reaches {100 * ratio:.0f} % of the raw pinned copy (target >= 90 %): "
              f"{'met' if ratio >= 0.9 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
