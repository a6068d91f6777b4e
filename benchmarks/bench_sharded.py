"""Sharded state across ranks, resharded on restore: asyncckpt against torch.distributed.checkpoint (DCP).

A model of ``--layers`` square ``Linear`` layers (``--size-mib`` of float32 parameters) whose weights
and biases are DTensors sharded by rows over every rank, with AdamW's moments (sharded alike; a
step with gradients of ones, so the values do not depend on the slicing). Three groups, in turn:

1. **2 ranks save** it, each library to its own folder: *stall* until ``save()`` /
   ``async_save()`` returns, *durable* until every rank's data is fsynced and committed
   (asyncckpt: ``sync()``; DCP: ``result()`` and an fsync of its files);
2. **4 ranks restore** the 2-rank checkpoints into a model sharded over 4 (2 -> 4, cold: files
   dropped from the page cache first), each rank checking its slices; then save their own;
3. **one process restores** the 4-rank checkpoints into a plain model and optimizer (4 -> 1, cold).

asyncckpt verifies every checksum it reads; DCP has none. Each figure is the slowest rank's,
median over ``--repeat`` rounds (the libraries take turns going first).

    python benchmarks/bench_sharded.py [--size-mib 128] [--layers 16] [--repeat 4] [--dir D] [--output F]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench import evict, files_under, fmt_ratio, fmt_s, fsync_tree, median, positive_int, remove
from bench_dist import _free_port, run_rank_or_report

__all__ = ["main"]

MiB = 1 << 20
LIBRARIES = ("asyncckpt", "dcp")


def _model(size_mib: int, layers: int, seed: int, mesh=None):
    """The model and AdamW after one step, weights row-sharded over ``mesh`` (whole without one)."""
    import torch  # noqa: PLC0415

    width = int((size_mib * MiB / 4 / layers) ** 0.5)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    if mesh is not None:
        from torch.distributed.tensor import Shard, distribute_tensor  # noqa: PLC0415

        for layer in model:
            layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]))
            layer.bias = torch.nn.Parameter(distribute_tensor(layer.bias.detach(), mesh, [Shard(0)]))
    optimizer = torch.optim.AdamW(model.parameters())
    for param in model.parameters():
        param.grad = torch.ones_like(param)  # elementwise from here: the same values whatever the slicing
    optimizer.step()
    return model, optimizer


def _order(round_index: int) -> tuple[str, ...]:
    """The libraries in turn, the other way round every second round (neither always goes first)."""
    return LIBRARIES if round_index % 2 == 0 else LIBRARIES[::-1]


def _whole(tensor):
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach()


def _same(model, expected) -> bool:
    import torch  # noqa: PLC0415

    return all(torch.equal(_whole(a), _whole(b)) for a, b in zip(model.state_dict().values(),
                                                                  expected.state_dict().values()))


def rank_main(args: argparse.Namespace) -> None:
    """One process of a phase; its timings to ``<out>/<phase>-<rank>.json``."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch.distributed as dist  # noqa: PLC0415
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: PLC0415

    import asyncckpt as ac  # noqa: PLC0415
    import asyncckpt.model.adapters.torch_sharded  # noqa: F401, PLC0415 - imported up front, as DCP is

    timings: dict[str, float] = {}
    sharded = args.phase != "whole"
    coordinator = mesh = None
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                                world_size=args.ranks)
        mesh = init_device_mesh("cpu", (args.ranks,))
        coordinator = ac.TorchDistributedCoordinator(timeout_seconds=600)

    def barrier() -> None:
        if sharded:
            dist.barrier()

    def cold(folder: str) -> None:
        barrier()
        if args.rank == 0:
            for path in files_under(folder):
                evict(path)
        barrier()

    def restore(source: str) -> None:
        expected, _ = _model(args.size_mib, args.layers, 0, mesh)
        for library in _order(args.round):
            folder = os.path.join(source, library)
            cold(folder)
            model, optimizer = _model(args.size_mib, args.layers, 1, mesh)
            started = time.perf_counter()
            if library == "asyncckpt":
                ac.Checkpoint(model=model, optimizer=optimizer).restore(ac.latest_checkpoint(folder)).assert_consumed()
            else:
                model_state, optimizer_state = get_state_dict(model, optimizer)
                state = {"model": model_state, "optimizer": optimizer_state}
                dcp.load(state, checkpoint_id=folder)
                set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
            barrier()
            timings[f"{library} restore"] = time.perf_counter() - started
            assert _same(model, expected), f"{library} restored other values"

    def save(target: str) -> None:
        model, optimizer = _model(args.size_mib, args.layers, 0, mesh)
        for library in _order(args.round):
            folder = os.path.join(target, library)
            if args.rank == 0:
                os.makedirs(folder, exist_ok=True)
            barrier()
            started = time.perf_counter()
            if library == "asyncckpt":
                checkpoint = ac.Checkpoint(model=model, optimizer=optimizer)
                options = ac.CheckpointOptions(enable_async=True, multi_worker=ac.MultiWorker.of(coordinator))
                checkpoint.save(os.path.join(folder, "ckpt"), options=options)
                timings[f"{library} stall"] = time.perf_counter() - started
                checkpoint.sync()
            else:
                model_state, optimizer_state = get_state_dict(model, optimizer)
                future = dcp.async_save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
                timings[f"{library} stall"] = time.perf_counter() - started
                future.result()
                fsync_tree(folder)
            barrier()
            timings[f"{library} durable"] = time.perf_counter() - started

    if args.phase == "save":
        save(os.path.join(args.dir, "two"))
    elif args.phase == "reshard":
        restore(os.path.join(args.dir, "two"))
        save(os.path.join(args.dir, "four"))
    else:
        restore(os.path.join(args.dir, "four"))
    with open(os.path.join(args.out, f"{args.phase}-{args.rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(timings, handle)
    if sharded:
        coordinator.close()
        dist.destroy_process_group()


def _phase(args: argparse.Namespace, workdir: str, out: str, phase: str, ranks: int, round_index: int) -> dict[str, float]:
    """Run ``phase`` on ``ranks`` processes; the slowest rank's timings."""
    port = _free_port()
    processes = [subprocess.Popen([sys.executable, __file__, "--as-rank", str(rank), "--phase", phase, "--port",
                                   str(port), "--ranks", str(ranks), "--size-mib", str(args.size_mib), "--layers",
                                   str(args.layers), "--dir", workdir, "--out", out, "--round", str(round_index)])
                 for rank in range(ranks)]
    codes = [process.wait() for process in processes]
    if any(codes):
        raise SystemExit(f"a rank of phase {phase} failed: exit codes {codes}")
    per_rank = []
    for rank in range(ranks):
        with open(os.path.join(out, f"{phase}-{rank}.json"), encoding="utf-8") as handle:
            per_rank.append(json.load(handle))
    return {name: max(rank[name] for rank in per_rank) for name in per_rank[0]}


def measure(args: argparse.Namespace, workdir: str) -> list[str]:
    out = os.path.join(workdir, "timings")
    os.makedirs(out, exist_ok=True)
    rounds: list[dict[tuple[str, str], float]] = []
    # (phase, ranks, how each of its timings is reported): "<library> <what>" -> "<label> <what>"
    phases = (("save", 2, "2 ranks"), ("reshard", 4, None), ("whole", 1, None))
    for round_index in range(args.repeat):
        figures: dict[tuple[str, str], float] = {}
        for phase, ranks, label in phases:
            for name, seconds in _phase(args, workdir, out, phase, ranks, round_index).items():
                library, what = name.split(" ")
                if what == "restore":
                    stage = "2->4 restore" if phase == "reshard" else "4->1 restore"
                else:
                    stage = f"{label or '4 ranks'} {what}"
                figures[(stage, library)] = seconds
        rounds.append(figures)
        remove(os.path.join(workdir, "two"))
        remove(os.path.join(workdir, "four"))
    med = {key: median([figures[key] for figures in rounds]) for key in rounds[0]}
    lines = [
        f"### Sharded state (DTensor rows over every rank): {args.size_mib} MiB of float32 parameters in "
        f"{args.layers} layers ({3 * args.size_mib} MiB with AdamW's moments)",
        "",
        f"Medians of {args.repeat} rounds of the slowest rank's figure; restores cold. asyncckpt verifies "
        "every checksum it reads (DCP keeps none).",
        "",
        "| measure | asyncckpt | DCP | DCP / asyncckpt |",
        "|---|---:|---:|---:|",
    ]
    for stage in ("2 ranks stall", "2 ranks durable", "4 ranks stall", "4 ranks durable", "2->4 restore",
                  "4->1 restore"):
        ours, theirs = med[(stage, "asyncckpt")], med[(stage, "dcp")]
        lines.append(f"| {stage} | {fmt_s(ours)} | {fmt_s(theirs)} | {fmt_ratio(theirs, ours)} |")
    lines.append("")
    remove(out)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mib", type=positive_int, default=128)
    parser.add_argument("--layers", type=positive_int, default=16)
    parser.add_argument("--repeat", type=positive_int, default=4)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--output", default=None)
    parser.add_argument("--as-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=("save", "reshard", "whole"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    return run_rank_or_report(parser.parse_args(argv), rank_main, measure, "bench_sharded.py", "asyncckpt-sharded-")

if __name__ == "__main__":
    sys.exit(main())
