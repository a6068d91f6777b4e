"""A torch.distributed job on the GPU: NCCL for training, the checkpoint's own gloo group, DTensor shards.

One process per GPU (as many as the machine has, at least one): the default process group is
NCCL, the model's weights are DTensors on a CUDA device mesh, and ``TorchDistributedCoordinator``
opens a gloo group of its own for the checkpoint's collectives. Each rank's CUDA shards go
through the device capture at ``save()``; a restore into another placement (columns instead of
rows) reads each rank's box into its CUDA tensors. The program runs in child processes (a
process group cannot be torn down and made again in one process).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAM = r'''
import json, os, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
import asyncckpt as ac

rank, world, port, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.cuda.set_device(rank)
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
mesh = init_device_mesh("cuda", (world,))

def model(seed, placement):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64)).cuda()
    for layer in (net[0], net[2]):
        layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [placement]))
        layer.bias = torch.nn.Parameter(distribute_tensor(layer.bias.detach(), mesh, [Replicate()]))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for param in net.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    return net, optimizer

def whole(state):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu() for k, v in state.items()}

coordinator = ac.TorchDistributedCoordinator(timeout_seconds=120)  # gloo, beside the NCCL default group
net, optimizer = model(0, Shard(0))
checkpoint = ac.Checkpoint(model=net, optimizer=optimizer)
path = checkpoint.save(os.path.join(folder, "ckpt"),
                       options=ac.CheckpointOptions(enable_async=True, multi_worker=ac.MultiWorker.of(coordinator)))
with torch.no_grad():
    for param in net.parameters():
        param.add_(1.0)  # training goes on while the write runs: the capture holds the values of save()
checkpoint.sync()
saved, _ = model(0, Shard(0))
fresh, fresh_optimizer = model(1, Shard(1))
ac.Checkpoint(model=fresh, optimizer=fresh_optimizer).restore(path).assert_consumed()
expected, got = whole(saved.state_dict()), whole(fresh.state_dict())
same = all(torch.equal(expected[k], got[k]) for k in expected)
on_device = all(p.to_local().is_cuda for p in fresh.parameters())
with open(os.path.join(folder, f"rank-{rank}.json"), "w") as out:
    json.dump({"same": same, "on_device": on_device, "path": path}, out)
coordinator.close()
dist.destroy_process_group()
'''


@pytest.mark.timeout(240)  # child processes start CUDA and NCCL
def test_nccl_ranks_save_cuda_dtensor_shards_through_a_gloo_checkpoint_group_and_reshard(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or not torch.distributed.is_nccl_available():
        pytest.skip("torch without CUDA or NCCL")
    world = torch.cuda.device_count()
    script = tmp_path / "ranks.py"
    script.write_text(PROGRAM)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    ranks = [subprocess.Popen([sys.executable, str(script), str(rank), str(world), str(port), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    logs = [process.communicate(timeout=240)[0] for process in ranks]
    assert all(process.returncode == 0 for process in ranks), "\n".join(logs)
    results = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(world)]
    assert all(result["same"] and result["on_device"] for result in results), results
    with open(results[0]["path"] + ".index", "rb") as index:
        assert json.loads(index.read())["format_version"] == 2  # stored as shards
