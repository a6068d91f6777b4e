"""The program every rank of a torch gloo test group runs (spawned by tests/test_coordinated_torch.py).

Each scenario's outcome on each rank goes to ``<out>/<scenario>-<rank>.json``.
"""

from __future__ import annotations

import os
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


def main(rank: int, world: int, port: int, folder: str, out: str, scenarios: list[str]) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    import asyncckpt as ac  # noqa: PLC0415

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    coordinator = ac.TorchDistributedCoordinator(timeout_seconds=20)
    worker = ac.MultiWorker.of(coordinator)
    for scenario in scenarios:
        model, optimizer = _model(seed=0)  # the same values on every rank: data parallelism
        checkpoint = ac.Checkpoint(model=model, optimizer=optimizer)
        prefix = os.path.join(folder, scenario, "ckpt")
        if scenario == "replicated":
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
