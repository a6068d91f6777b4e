"""Data-parallel training on several CPU processes with torchrun, checkpointing through all of them.

Every rank holds the same model (``DistributedDataParallel`` over gloo) and trains on its own part
of each batch. Every ``--save-every`` steps a ``CheckpointManager`` saves asynchronously through a
``TorchDistributedCoordinator``: each rank writes about ``1/N`` of the bytes into a data directory
of its own, the chief (rank 0) checks and merges what the others wrote and commits one
checkpoint, and a failure on any rank fails the save on every rank. Run it again and it resumes
from the latest checkpoint -- with the same number of ranks or another (the state is replicated,
so any rank can read all of it).

    torchrun --nproc-per-node=2 examples/distributed_train.py --dir /tmp/asyncckpt-ddp --steps 20
    torchrun --nproc-per-node=2 examples/distributed_train.py --dir /tmp/asyncckpt-ddp --steps 10  # resumes
    torchrun --nproc-per-node=1 examples/distributed_train.py --dir /tmp/asyncckpt-ddp --steps 10  # on 1 rank
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import torch
import torch.distributed as dist

import asyncckpt as ac

__all__ = ["main"]

N_SAMPLES, N_FEATURES, N_HIDDEN, BATCH = 1024, 16, 64, 64


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="checkpoint directory, shared by every rank")
    parser.add_argument("--steps", type=int, default=20, help="steps to train in this run")
    parser.add_argument("--save-every", type=int, default=10, help="save every this many steps")
    return parser.parse_args(argv)


def digest(model: torch.nn.Module) -> str:
    hasher = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        hasher.update(name.encode())
        hasher.update(tensor.detach().contiguous().numpy().tobytes())
    return hasher.hexdigest()[:16]


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial model on every rank
    model = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, N_HIDDEN), torch.nn.GELU(), torch.nn.Linear(N_HIDDEN, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step = ac.Variable(0)  # the global step, saved with the model
    ddp = torch.nn.parallel.DistributedDataParallel(model)

    checkpoint = ac.Checkpoint(model=model, optimizer=optimizer, step=step)
    manager = ac.CheckpointManager(checkpoint, args.dir, max_to_keep=3)
    coordinator = ac.TorchDistributedCoordinator(timeout_seconds=120)  # a gloo group of the checkpoint's own
    options = ac.CheckpointOptions(enable_async=True, multi_worker=ac.MultiWorker.of(coordinator))
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_consumed()
        if rank == 0:
            print(f"resumed from {manager.latest_checkpoint} at step {int(step.numpy())} on {world} rank(s)")

    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(N_SAMPLES, N_FEATURES, generator=generator)
    y = torch.sin(x @ torch.randn(N_FEATURES, 1, generator=generator))
    for _ in range(args.steps):
        current = int(step.numpy())
        batch = torch.arange(current * BATCH, (current + 1) * BATCH) % N_SAMPLES
        mine = batch[rank::world]  # this rank's share of the global batch
        loss = torch.nn.functional.mse_loss(ddp(x[mine]), y[mine])
        optimizer.zero_grad()
        loss.backward()  # DDP averages the gradients over the ranks
        optimizer.step()
        step.assign(current + 1)
        if (current + 1) % args.save_every == 0:
            manager.save(checkpoint_number=current + 1, options=options)
    manager.sync()
    if rank == 0:
        print(f"step {int(step.numpy())} loss {loss.item():.6f} model {digest(model)} latest {manager.latest_checkpoint}")
    coordinator.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
