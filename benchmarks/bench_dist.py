"""Several ranks saving one data-parallel model: asyncckpt through torch.distributed against DCP.

Spawns ``--ranks`` processes on this machine in a gloo group. Every rank holds the same model
(``--layers`` square ``Linear`` layers, ``--size-mib`` of float32 parameters, after one AdamW step so
both moments exist) and, interleaved over ``--repeat`` rounds:

* **asyncckpt** -- ``Checkpoint(model=..., optimizer=...).save(prefix, options)`` with
  ``MultiWorker.of(TorchDistributedCoordinator())`` and ``enable_async=True``: *stall* until it
  returns on each rank (the slowest rank's is reported), *durable* until every rank's ``sync()``
  returned (each rank writes about 1/N of the bytes, fsyncs them, and the chief commits);
  restore is every rank's ``restore(path)`` into a fresh model and optimizer, checksums verified;
* **DCP** -- ``torch.distributed.checkpoint.async_save`` of ``get_state_dict(model, optimizer)``
  (DCP's planner also splits replicated state between the ranks), *durable* after ``result()`` and
  an fsync of its files; restore is ``dcp.load`` into the fresh pair's state dict and
  ``set_state_dict``.

Restores are cold: the files are dropped from the page cache first. Medians over rounds; each
figure is the slowest rank's.

    python benchmarks/bench_dist.py [--ranks 2] [--size-mib 256] [--layers 32] [--repeat 3] [--dir D] [--output F]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

from bench import evict, files_under, fmt_ratio, fmt_s, fsync_tree, median, positive_int, remove, report_in_workdir

__all__ = ["main"]

MiB = 1 << 20


def _model(size_mib: int, layers: int, seed: int):
    import torch  # noqa: PLC0415

    width = int((size_mib * MiB / 4 / layers) ** 0.5)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def rank_main(args: argparse.Namespace) -> None:
    """One rank: every method, every round; its timings to ``<out>/rank-<r>.json``."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: PLC0415

    import asyncckpt as ac  # noqa: PLC0415

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.ranks)
    coordinator = ac.TorchDistributedCoordinator(timeout_seconds=600)
    options = ac.CheckpointOptions(enable_async=True, multi_worker=ac.MultiWorker.of(coordinator))
    model, optimizer = _model(args.size_mib, args.layers, seed=0)
    timings: dict[str, list[float]] = {}

    def note(name: str, seconds: float) -> None:
        timings.setdefault(name, []).append(seconds)

    def cold(folder: str) -> None:
        dist.barrier()
        if args.rank == 0:
            for path in files_under(folder):
                evict(path)
        dist.barrier()

    for round_index in range(args.repeat):
        folder = os.path.join(args.dir, f"round-{round_index}")
        ours, theirs = os.path.join(folder, "asyncckpt"), os.path.join(folder, "dcp")
        if args.rank == 0:
            os.makedirs(ours, exist_ok=True)
            os.makedirs(theirs, exist_ok=True)
        dist.barrier()

        checkpoint = ac.Checkpoint(model=model, optimizer=optimizer)
        started = time.perf_counter()
        path = checkpoint.save(os.path.join(ours, "ckpt"), options=options)
        note("asyncckpt stall", time.perf_counter() - started)
        checkpoint.sync()
        dist.barrier()
        note("asyncckpt durable", time.perf_counter() - started)
        cold(ours)
        fresh_model, fresh_optimizer = _model(args.size_mib, args.layers, seed=1)
        started = time.perf_counter()
        ac.Checkpoint(model=fresh_model, optimizer=fresh_optimizer).restore(path).assert_consumed()
        dist.barrier()
        note("asyncckpt restore", time.perf_counter() - started)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()))
        del fresh_model, fresh_optimizer

        started = time.perf_counter()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        future = dcp.async_save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=theirs)
        note("dcp stall", time.perf_counter() - started)
        future.result()
        fsync_tree(theirs)
        dist.barrier()
        note("dcp durable", time.perf_counter() - started)
        cold(theirs)
        fresh_model, fresh_optimizer = _model(args.size_mib, args.layers, seed=1)
        started = time.perf_counter()
        model_state, optimizer_state = get_state_dict(fresh_model, fresh_optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=theirs)
        set_state_dict(fresh_model, fresh_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        dist.barrier()
        note("dcp restore", time.perf_counter() - started)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()))
        del fresh_model, fresh_optimizer
        dist.barrier()
        if args.rank == 0:
            remove(folder)
    with open(os.path.join(args.out, f"rank-{args.rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(timings, handle)
    coordinator.close()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure(args: argparse.Namespace, workdir: str) -> list[str]:
    out = os.path.join(workdir, "timings")
    os.makedirs(out, exist_ok=True)
    port = _free_port()
    ranks = [subprocess.Popen([sys.executable, __file__, "--as-rank", str(rank), "--port", str(port), "--ranks",
                               str(args.ranks), "--size-mib", str(args.size_mib), "--layers", str(args.layers),
                               "--repeat", str(args.repeat), "--dir", workdir, "--out", out])
             for rank in range(args.ranks)]
    codes = [process.wait() for process in ranks]
    if any(codes):
        raise SystemExit(f"a rank failed: exit codes {codes}")
    per_rank = [json.load(open(os.path.join(out, f"rank-{rank}.json"), encoding="utf-8")) for rank in range(args.ranks)]
    slowest = {name: [max(rank[name][i] for rank in per_rank) for i in range(args.repeat)] for name in per_rank[0]}
    figures = {name: median(values) for name, values in slowest.items()}
    lines = [
        f"### {args.ranks} ranks, one data-parallel model: {args.size_mib} MiB of float32 parameters in {args.layers} "
        f"layers ({3 * args.size_mib} MiB with AdamW's moments)",
        "",
        f"Medians of {args.repeat} rounds of the slowest rank's figure; restores cold.",
        "",
        "| method | save() stall | until durable | restore (cold) |",
        "|---|---:|---:|---:|",
    ]
    for method in ("asyncckpt", "dcp"):
        label = "asyncckpt, TorchDistributedCoordinator, async" if method == "asyncckpt" else "DCP async_save / load"
        lines.append(f"| {label} | {fmt_s(figures[method + ' stall'])} | {fmt_s(figures[method + ' durable'])} "
                     f"| {fmt_s(figures[method + ' restore'])} |")
    lines += [
        "",
        "Each round (stall / durable / restore, seconds): " + "; ".join(
            f"{method}: " + ", ".join(f"{slowest[method + ' stall'][i]:.3f}/{slowest[method + ' durable'][i]:.2f}/"
                                      f"{slowest[method + ' restore'][i]:.2f}" for i in range(args.repeat))
            for method in ("asyncckpt", "dcp")),
        "",
        f"- DCP stall / asyncckpt stall: {fmt_ratio(figures['dcp stall'], figures['asyncckpt stall'])}",
        f"- DCP durable / asyncckpt durable: {fmt_ratio(figures['dcp durable'], figures['asyncckpt durable'])}",
        f"- DCP restore / asyncckpt restore: {fmt_ratio(figures['dcp restore'], figures['asyncckpt restore'])}",
        "",
    ]
    remove(out)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ranks", type=positive_int, default=2)
    parser.add_argument("--size-mib", type=positive_int, default=256)
    parser.add_argument("--layers", type=positive_int, default=32)
    parser.add_argument("--repeat", type=positive_int, default=3)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--output", default=None)
    parser.add_argument("--as-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return run_rank_or_report(parser.parse_args(argv), rank_main, measure, "bench_dist.py", "asyncckpt-dist-")


def run_rank_or_report(args: argparse.Namespace, rank_main, measure, program: str, prefix: str) -> int:
    """Be one rank (``--as-rank``), or spawn them all and report (what every multi-rank benchmark does)."""
    if args.as_rank is not None:
        args.rank = args.as_rank
        rank_main(args)
        return 0
    try:
        import torch.distributed.checkpoint  # noqa: F401, PLC0415
    except ImportError as exc:
        print(f"{program} needs torch with torch.distributed: {exc}", file=sys.stderr)
        return 2
    return report_in_workdir(args.dir, prefix, args.output, lambda workdir: measure(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
