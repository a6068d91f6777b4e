"""The program every rank of a torch gloo test group runs (spawned by tests/test_coordinated_torch.py).

Each scenario's outcome on each rank goes to ``<out>/<scenario>-<rank>.json``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

from _rank_results import outcome, record, save_with_a_failing_rank


def _model(seed: int):
    import torch  # noqa: PLC0415

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 32)).sum().backward()
    optimizer.step()
    return model, optimizer


def _sharded_model(seed: int, placement: str, step: bool = True):
    """A model whose weights are DTensors sharded over every rank (``placement``: "rows", "columns", or
    "hsdp": rows over half the ranks, replicated over the other half), biases replicated, after one AdamW step (with ``step``; without, the moments do not exist yet)."""
    import torch  # noqa: PLC0415
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor  # noqa: PLC0415

    world = int(os.environ["WORLD_SIZE"])
    if placement == "hsdp":  # replicated over the mesh's first dimension, rows split over its second
        mesh, weight, bias = init_device_mesh("cpu", (2, world // 2)), [Replicate(), Shard(0)], [Replicate(), Replicate()]
    else:
        mesh, weight, bias = init_device_mesh("cpu", (world,)), [Shard(0) if placement == "rows" else Shard(1)], [Replicate()]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 6))
    for layer in (model[0], model[2]):
        layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, weight))
        layer.bias = torch.nn.Parameter(distribute_tensor(layer.bias.detach(), mesh, bias))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    if step:
        model(distribute_tensor(torch.randn(4, 32), mesh, [Replicate()] * mesh.ndim)).sum().backward()
        optimizer.step()
    return model, optimizer


def distribute_tensor_input(model):
    """A replicated input batch on the mesh of ``model``'s first weight."""
    import torch  # noqa: PLC0415
    from torch.distributed.tensor import Replicate, distribute_tensor  # noqa: PLC0415

    return distribute_tensor(torch.randn(4, 32), model[0].weight.device_mesh, [Replicate()])


def fingerprints(model, optimizer) -> dict[str, str]:
    """A digest of every global value (parameters and AdamW moments), whole or DTensor."""
    import hashlib  # noqa: PLC0415

    def whole(tensor):
        return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().contiguous()

    digests = {f"model.{name}": whole(value) for name, value in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        digests.update({f"optimizer.{index}.{name}": whole(value) for name, value in state.items()})
    return {name: hashlib.sha256(value.numpy().tobytes()).hexdigest() for name, value in digests.items()}


def _fingerprints_file(folder: str, directory: str) -> str:
    """Where the digests of a save into ``directory`` (a folder or an ``s3://`` prefix) are kept."""
    return os.path.join(folder, re.sub(r"[^A-Za-z0-9]+", "_", directory) + ".fingerprints.json")


def _sharded_scenario(scenario: str, folder: str, worker):
    """``shard-save:<name or s3:// prefix>`` saves the row-sharded model (``shard-save-hsdp:``, the
    2-D-mesh one); ``shard-restore:<path>`` restores
    it column-sharded and compares every global value with what the saving group recorded."""
    import asyncckpt as ac  # noqa: PLC0415

    action, _, where = scenario.partition(":")
    if action.startswith("shard-save"):
        model, optimizer = _sharded_model(seed=0, placement="hsdp" if action.endswith("-hsdp") else "rows")
        options = ac.CheckpointOptions(multi_worker=worker, enable_async=True)
        checkpoint = ac.Checkpoint(model=model, optimizer=optimizer)
        directory = where if where.startswith("s3://") else os.path.join(folder, where)  # a folder, or a bucket's
        if not where.startswith("s3://"):
            os.makedirs(directory, exist_ok=True)
        path = checkpoint.save(f"{directory}/ckpt", options=options)
        checkpoint.sync()
        saved = fingerprints(model, optimizer)
        if worker.index == 0:  # for restores by groups of another size (whose training step rounds otherwise)
            with open(_fingerprints_file(folder, directory), "w", encoding="utf-8") as handle:
                json.dump(saved, handle)
        return {"path": path, "fingerprints": saved}
    with open(_fingerprints_file(folder, where.rsplit("/", 1)[0]), encoding="utf-8") as handle:
        expected = json.load(handle)
    model, optimizer = _sharded_model(seed=1, placement="columns", step=False)  # moments come from the checkpoint
    ac.Checkpoint(model=model, optimizer=optimizer).restore(where).assert_consumed()
    same = fingerprints(model, optimizer) == expected
    model(distribute_tensor_input(model)).sum().backward()
    optimizer.step()  # the restored moments are DTensors placed like their parameters
    return {"same": same}


def main(rank: int, world: int, port: int, folder: str, out: str, scenarios: list[str]) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    import asyncckpt as ac  # noqa: PLC0415

    os.environ["WORLD_SIZE"] = str(world)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    coordinator = ac.TorchDistributedCoordinator(timeout_seconds=20)
    worker = ac.MultiWorker.of(coordinator)
    for scenario in scenarios:
        model, optimizer = _model(seed=0)  # the same values on every rank: data parallelism
        checkpoint = ac.Checkpoint(model=model, optimizer=optimizer)
        prefix = os.path.join(folder, scenario, "ckpt")
        if scenario.startswith("shard-"):
            name = scenario.partition(":")[0] + ("-s3" if "s3://" in scenario else "")
            record(out, name, rank, **outcome(lambda: _sharded_scenario(scenario, folder, worker)))
        elif scenario == "replicated":
            options = ac.CheckpointOptions(multi_worker=worker, enable_async=True)

            def save_and_restore():
                path = checkpoint.save(prefix, options=options)
                checkpoint.sync()
                fresh_model, fresh_optimizer = _model(seed=1)
                ac.Checkpoint(model=fresh_model, optimizer=fresh_optimizer).restore(path).assert_consumed()
                same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                              fresh_model.state_dict().values()))
                return {"path": path, "same": same}

            record(out, scenario, rank, **outcome(save_and_restore))
        elif scenario == "rank1_raises":
            record(out, scenario, rank, **save_with_a_failing_rank(checkpoint, prefix, worker))
        elif scenario == "rank1_exits":
            if rank == 1:
                os._exit(0)  # a rank that dies before the save
            started = time.monotonic()
            result = outcome(lambda: checkpoint.save(prefix, options=ac.CheckpointOptions(multi_worker=worker)))
            record(out, scenario, rank, seconds=time.monotonic() - started, **result)
            os._exit(0)  # the group is broken: leave without tearing it down
    coordinator.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6].split(","))
