"""GPU checkpointing side by side: asyncckpt, Orbax, torch.distributed.checkpoint and torch.save.

Each library saves its own framework's GPU arrays -- CuPy for asyncckpt, JAX for Orbax, PyTorch
tensors for the other two -- of the same sizes (``--size-mib`` split into ``--arrays`` float32
arrays), to the same folder, on the same machine, and restores them onto the GPU:

* **stall** -- time until ``save`` returns control to the training loop;
* **durable** -- time until the checkpoint is complete on disk (``sync()``,
  ``wait_until_finished()``, the future of ``async_save``; ``torch.save`` and a blocking
  ``dcp.save`` are durable when they return, ``torch.save`` after an ``fsync``);
* **restore** -- time until the values are back in GPU memory (device synchronised).

Every library runs in its own process (``--only NAME`` is what the parent runs), so that JAX's and
PyTorch's allocators never compete with CuPy's; JAX is told not to preallocate. Medians of
``--repeat`` runs after one warm-up save. A library that is missing or fails prints why in its row.
Prints a Markdown table.

    python benchmarks/gpu_compare.py [--size-mib 1024] [--arrays 8] [--repeat 3] [--dir D]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

__all__ = ["main"]

MiB = 1 << 20
LIBRARIES = ("asyncckpt", "orbax", "dcp", "torch.save")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _fresh(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    shutil.rmtree(path, ignore_errors=True)
    return path


# --------------------------------------------------------------------------------------------- asyncckpt
def run_asyncckpt(args, folder: str) -> dict:
    import cupy as cp  # noqa: PLC0415

    import asyncckpt as ac  # noqa: PLC0415

    count = args.size_mib * MiB // args.arrays // 4
    arrays = {f"w{i}": ac.Variable(cp.random.default_rng(i).standard_normal(count, dtype=cp.float32))
              for i in range(args.arrays)}
    checkpoint = ac.Checkpoint(**arrays)
    options = ac.CheckpointOptions(enable_async=True)
    sync = cp.cuda.Device().synchronize
    stalls, durables, restores = [], [], []
    prefix = os.path.join(folder, "ac", "ckpt")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    targets = {name: ac.Variable(cp.zeros(count, cp.float32)) for name in arrays}
    restore_checkpoint = ac.Checkpoint(**targets)
    for run in range(args.repeat + 1):
        sync()
        started = time.perf_counter()
        path = checkpoint.write(prefix, options=options)
        stall = time.perf_counter() - started
        checkpoint.sync()
        durable = time.perf_counter() - started
        sync()
        started = time.perf_counter()
        restore_checkpoint.read(path)
        sync()
        restore = time.perf_counter() - started
        if run:  # the first run warms up
            stalls.append(stall)
            durables.append(durable)
            restores.append(restore)
    for name, variable in arrays.items():
        assert bool((targets[name].array == variable.array).all()), f"{name} restored wrong"
    return {"stall": _median(stalls), "durable": _median(durables), "restore": _median(restores),
            "note": f"asyncckpt, CuPy {cp.__version__}"}


# --------------------------------------------------------------------------------------------- Orbax
def run_orbax(args, folder: str) -> dict:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    count = args.size_mib * MiB // args.arrays // 4
    keys = jax.random.split(jax.random.PRNGKey(0), args.arrays)
    tree = {f"w{i}": jax.random.normal(keys[i], (count,), dtype="float32") for i in range(args.arrays)}
    jax.block_until_ready(tree)
    checkpointer = ocp.StandardCheckpointer()
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
    stalls, durables, restores = [], [], []
    for run in range(args.repeat + 1):
        path = _fresh(folder, f"orbax-{run}")
        started = time.perf_counter()
        checkpointer.save(path, tree)
        stall = time.perf_counter() - started
        checkpointer.wait_until_finished()
        durable = time.perf_counter() - started
        started = time.perf_counter()
        restored = checkpointer.restore(path, abstract)
        jax.block_until_ready(restored)
        restore = time.perf_counter() - started
        if run:  # the first run warms up
            stalls.append(stall)
            durables.append(durable)
            restores.append(restore)
        shutil.rmtree(path, ignore_errors=True)
    for name in tree:
        assert bool((restored[name] == tree[name]).all()), f"{name} restored wrong"
    return {"stall": _median(stalls), "durable": _median(durables), "restore": _median(restores),
            "note": f"Orbax StandardCheckpointer (async), JAX {jax.__version__}"}


# --------------------------------------------------------------------------------------------- PyTorch
def _torch_state(args):
    import torch  # noqa: PLC0415

    count = args.size_mib * MiB // args.arrays // 4
    generator = torch.Generator(device="cuda").manual_seed(0)
    return {f"w{i}": torch.randn(count, device="cuda", generator=generator) for i in range(args.arrays)}


def run_dcp(args, folder: str) -> dict:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415

    # async_save needs a process group: a single-rank gloo group on this machine.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{29500 + os.getpid() % 1000}", rank=0, world_size=1)
    state = _torch_state(args)
    torch.cuda.synchronize()
    stalls, durables, restores = [], [], []
    for run in range(args.repeat + 1):
        path = _fresh(folder, f"dcp-{run}")
        started = time.perf_counter()
        future = dcp.async_save(state, checkpoint_id=path)
        stall = time.perf_counter() - started
        future.result()
        durable = time.perf_counter() - started
        target = {name: torch.empty_like(tensor) for name, tensor in state.items()}
        torch.cuda.synchronize()
        started = time.perf_counter()
        dcp.load(target, checkpoint_id=path)
        torch.cuda.synchronize()
        restore = time.perf_counter() - started
        if run:  # the first run warms up
            stalls.append(stall)
            durables.append(durable)
            restores.append(restore)
        shutil.rmtree(path, ignore_errors=True)
    for name in state:
        assert torch.equal(target[name], state[name]), f"{name} restored wrong"
    dist.destroy_process_group()
    return {"stall": _median(stalls), "durable": _median(durables), "restore": _median(restores),
            "note": f"torch.distributed.checkpoint.async_save, torch {torch.__version__}"}


def run_torch_save(args, folder: str) -> dict:
    import torch  # noqa: PLC0415

    state = _torch_state(args)
    torch.cuda.synchronize()
    durables, restores = [], []
    path = os.path.join(folder, "torch.pt")
    for run in range(args.repeat + 1):
        started = time.perf_counter()
        with open(path, "wb") as out:
            torch.save(state, out)
            out.flush()
            os.fsync(out.fileno())
        durable = time.perf_counter() - started
        started = time.perf_counter()
        restored = torch.load(path, map_location="cuda")
        torch.cuda.synchronize()
        restore = time.perf_counter() - started
        if run:  # the first run warms up
            durables.append(durable)
            restores.append(restore)
    for name in state:
        assert torch.equal(restored[name], state[name]), f"{name} restored wrong"
    os.remove(path)
    return {"stall": _median(durables), "durable": _median(durables), "restore": _median(restores),
            "note": f"torch.save + fsync / torch.load(map_location='cuda'), torch {torch.__version__}"}


RUNNERS = {"asyncckpt": run_asyncckpt, "orbax": run_orbax, "dcp": run_dcp, "torch.save": run_torch_save}


# --------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--arrays", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary folder)")
    parser.add_argument("--only", choices=LIBRARIES, help="run one library in this process and print JSON")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per library")
    args = parser.parse_args(argv)
    if args.only:
        folder = os.path.abspath(args.dir or tempfile.mkdtemp(prefix="asyncckpt-compare-"))
        print(json.dumps(RUNNERS[args.only](args, folder)))
        return 0
    folder = os.path.abspath(args.dir or tempfile.mkdtemp(prefix="asyncckpt-compare-"))
    os.makedirs(folder, exist_ok=True)
    results = {}
    try:
        for name in LIBRARIES:
            command = [sys.executable, __file__, "--only", name, "--size-mib", str(args.size_mib),
                       "--arrays", str(args.arrays), "--repeat", str(args.repeat), "--dir", folder]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                results[name] = {"error": f"no result within {args.timeout:.0f} s"}
                continue
            lines = done.stdout.strip().splitlines()
            if done.returncode == 0 and lines:
                results[name] = json.loads(lines[-1])
            else:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                results[name] = {"error": f"exit {done.returncode}: {last[:200]}"}
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    base = results.get("asyncckpt", {})
    print(f"# GPU checkpointing compared: {args.arrays} x float32 = {args.size_mib} MiB on the GPU, "
          f"median of {args.repeat}")
    print()
    print("| library | save stall (ms) | durable (ms) | restore to GPU (ms) | durable vs asyncckpt | what ran |")
    print("|---|---:|---:|---:|---:|---|")
    for name in LIBRARIES:
        row = results[name]
        if "error" in row:
            print(f"| {name} | - | - | - | - | {row['error']} |")
            continue
        ratio = f"{row['durable'] / base['durable']:.2f}x" if "durable" in base else "-"
        print(f"| {name} | {row['stall'] * 1e3:.1f} | {row['durable'] * 1e3:.1f} | {row['restore'] * 1e3:.1f} | "
              f"{ratio} | {row['note']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
