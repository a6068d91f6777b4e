"""The program every process of a multi-controller JAX test runs (spawned by tests/test_coordinated_jax.py)."""

from __future__ import annotations

import os
import sys
import time

from _rank_results import outcome, record, save_with_a_failing_rank


def _sharded(jax, np, ac, worker, prefix: str) -> dict:
    """An array split over every process's devices: each process writes its own shards; then restored
    with the rows and columns split another way, and replicated, each process checking its devices' data."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: PLC0415

    full = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
    devices = np.array(jax.devices())
    rows = NamedSharding(Mesh(devices, ("x",)), PartitionSpec("x"))
    value = jax.make_array_from_callback(full.shape, rows, lambda index: full[index])
    checkpoint = ac.Checkpoint(params=ac.PyTree({"w": value}))
    path = checkpoint.save(prefix, options=ac.CheckpointOptions(multi_worker=worker, enable_async=True))
    checkpoint.sync()
    grid = Mesh(devices.reshape(2, -1), ("a", "b"))
    same = []
    for spec in (PartitionSpec("b", "a"), PartitionSpec()):
        like = jax.make_array_from_callback(full.shape, NamedSharding(grid, spec), lambda index: np.zeros_like(full[index]))
        holder = ac.PyTree({"w": like})
        ac.Checkpoint(params=holder).restore(path).assert_consumed()
        restored = holder.value["w"]
        same.append(restored.sharding == like.sharding and all(
            np.array_equal(np.asarray(shard.data), full[shard.index]) for shard in restored.addressable_shards))
    return {"path": path, "devices": len(devices), "same": same}


def main(rank: int, world: int, port: int, folder: str, out: str, scenarios: list[str]) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=world, process_id=rank)
    import asyncckpt as ac  # noqa: PLC0415

    coordinator = ac.JaxDistributedCoordinator(timeout_seconds=5)
    worker = ac.MultiWorker.of(coordinator)
    for scenario in scenarios:
        params = {"dense": {"w": jax.numpy.arange(600.0).reshape(20, 30), "b": jax.numpy.ones(30)},
                  "scale": np.float32(2.0)}  # the same on every process
        holder = ac.PyTree(params)
        checkpoint = ac.Checkpoint(params=holder)
        prefix = os.path.join(folder, scenario, "ckpt")
        if scenario == "replicated":
            def save_and_restore():
                path = checkpoint.save(prefix, options=ac.CheckpointOptions(multi_worker=worker, enable_async=True))
                checkpoint.sync()
                fresh = ac.PyTree({"dense": jax.tree_util.tree_map(jax.numpy.zeros_like, params["dense"]),
                                   "scale": np.float32(0.0)})
                ac.Checkpoint(params=fresh).restore(path).assert_consumed()
                same = bool((fresh.value["dense"]["w"] == params["dense"]["w"]).all()) and fresh.value["scale"] == 2.0
                return {"path": path, "same": same}

            record(out, scenario, rank, **outcome(save_and_restore))
        elif scenario == "sharded":
            record(out, scenario, rank, **outcome(lambda: _sharded(jax, np, ac, worker, prefix)))
        elif scenario == "rank1_raises":
            record(out, scenario, rank, **save_with_a_failing_rank(checkpoint, prefix, worker))
        elif scenario == "rank1_stays_away":
            if rank == 1:
                time.sleep(8)  # alive, but never joins this save: the others must not wait past the timeout
                record(out, scenario, rank, ok="stayed away")
                continue
            started = time.monotonic()
            result = outcome(lambda: checkpoint.save(prefix, options=ac.CheckpointOptions(multi_worker=worker)))
            record(out, scenario, rank, seconds=time.monotonic() - started, **result)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6].split(","))
