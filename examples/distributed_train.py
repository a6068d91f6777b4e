"""Tensor-parallel training on several CPU processes with torchrun, each rank saving its own shards.

The model's layers are split over the ranks with ``torch.distributed.tensor.parallel`` (the first
layer by output features, the second by input features), so its weights and AdamW moments are
DTensors: each rank holds a slice. Every ``--save-every`` steps a ``CheckpointManager`` saves
asynchronously through a ``TorchDistributedCoordinator``: each rank writes its own slices (and a
share of the replicated values) into a data directory of its own, the chief (rank 0) checks that
the slices tile every value, merges and commits one checkpoint, and a failure on any rank fails
the save on every rank. Run it again and it resumes from the latest checkpoint -- with the same
number of ranks or another: each rank reads only the bytes of its own slices, whatever slicing
wrote them.

    torchrun --nproc-per-node=2 examples/distributed_train.py --dir /tmp/asyncckpt-tp --steps 20
    torchrun --nproc-per-node=2 examples/distributed_train.py --dir /tmp/asyncckpt-tp --steps 10  # resumes
    torchrun --nproc-per-node=1 examples/distributed_train.py --dir /tmp/asyncckpt-tp --steps 10  # on 1 rank
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

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
    """A digest of the global parameters (every rank takes part: gathering a DTensor is a collective)."""
    hasher = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        hasher.update(name.encode())
        hasher.update(whole.detach().contiguous().numpy().tobytes())
    return hasher.hexdigest()[:16]


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial model on every rank, then each keeps its slices
    model = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, N_HIDDEN), torch.nn.GELU(), torch.nn.Linear(N_HIDDEN, 1))
    mesh = init_device_mesh("cpu", (world,))
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step = ac.Variable(0)  # the global step, saved with the model

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
        loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])  # every rank computes its slices
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step.assign(current + 1)
        if (current + 1) % args.save_every == 0:
            manager.save(checkpoint_number=current + 1, options=options)
    manager.sync()
    model_digest = digest(model)
    if rank == 0:
        print(f"step {int(step.numpy())} loss {loss.item():.6f} model {model_digest} latest {manager.latest_checkpoint}")
    coordinator.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
