"""Train a small PyTorch MLP with AdamW, checkpointing asynchronously, and resume after a crash.

The PyTorch twin of ``examples/train_loop.py``: the module, the AdamW optimizer, its warm-up and
cosine LR schedule, a ``GradScaler``, the generator that draws the mini-batches and the global RNG
that dropout uses all go into one ``asyncckpt.Checkpoint`` as they are. Each run trains
``--steps`` more steps; ``--kill-at-step K`` ends the process abruptly when the global step
reaches K (``os._exit``, no clean-up, possibly while a checkpoint is still being written), and the
next run resumes from the last committed checkpoint. A resumed run ends with exactly the bytes of
a run that never stopped: the final line's digest covers every parameter, buffer and optimizer
moment.

    python examples/torch_train.py --dir /tmp/asyncckpt-torch --steps 60 --kill-at-step 45
    python examples/torch_train.py --dir /tmp/asyncckpt-torch --steps 20   # resumes from ckpt-40
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import numpy as np
import torch

import asyncckpt as ac

__all__ = ["Run", "main"]

N_SAMPLES, N_FEATURES, N_HIDDEN, BATCH = 512, 8, 32, 64


def make_model() -> torch.nn.Module:
    """Linear, batch norm (running statistics are buffers a forward changes), GELU, dropout, linear."""
    return torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, N_HIDDEN),
        torch.nn.BatchNorm1d(N_HIDDEN),
        torch.nn.GELU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(N_HIDDEN, 1),
    )


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic regression problem: a smooth nonlinear target plus a little noise."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(N_SAMPLES, N_FEATURES, generator=generator)
    y = torch.sin(x @ torch.randn(N_FEATURES, 1, generator=generator))
    return x, y + 0.05 * torch.randn(N_SAMPLES, 1, generator=generator)


class Run:
    """Everything a training run changes, built the same way on every start."""

    def __init__(self, learning_rate: float) -> None:
        torch.manual_seed(0)  # the initial weights; dropout draws from this global generator later
        self.model = make_model()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=learning_rate, weight_decay=0.01)
        warmup = torch.optim.lr_scheduler.LinearLR(self.optimizer, start_factor=0.1, total_iters=10)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=200)
        self.scheduler = torch.optim.lr_scheduler.SequentialLR(self.optimizer, [warmup, cosine], milestones=[10])
        # Enabled on the CPU too: its scale grows every 10 steps, so a resume needs its state.
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10)
        self.batches = torch.Generator().manual_seed(42)  # which samples each step sees
        self.step = ac.Variable(0, dtype=np.int64, name="step", trainable=False)

    def checkpoint(self) -> ac.Checkpoint:
        # Each object is found by its type: a module, an optimizer, a scheduler and a scaler are
        # saved through their state_dict(); the generators need RandomState to say what they are.
        return ac.Checkpoint(
            step=self.step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            batches=ac.RandomState(self.batches),
            dropout=ac.RandomState(torch),
        )

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        index = torch.randperm(len(x), generator=self.batches)[:BATCH]
        loss = torch.nn.functional.mse_loss(self.model(x[index]), y[index])
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step.assign_add(1)
        return float(loss.detach())

    def digest(self) -> str:
        """A short hash of the exact bytes of every parameter, buffer and optimizer moment."""
        digest = hashlib.sha256()
        tensors = list(self.model.state_dict().values())
        tensors += [value for state in self.optimizer.state.values() for value in state.values()]
        for tensor in tensors:
            digest.update(tensor.detach().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="checkpoint directory (created if missing)")
    parser.add_argument("--steps", type=positive_int, default=60, help="steps to train in this run (default 60)")
    parser.add_argument("--save-every", type=positive_int, default=10, help="save every N steps (default 10)")
    parser.add_argument("--max-to-keep", type=positive_int, default=3, help="checkpoints to keep (default 3)")
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument(
        "--kill-at-step",
        type=positive_int,
        default=None,
        help="simulate a crash: os._exit(1) when the global step reaches K (after its save, if it has one)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    x, y = make_data()
    run = Run(args.learning_rate)
    checkpoint = run.checkpoint()
    manager = ac.CheckpointManager(checkpoint, args.dir, max_to_keep=args.max_to_keep)
    options = ac.CheckpointOptions(enable_async=True)

    # Parameters and buffers are read straight into the module's tensors; AdamW has no moments
    # before its first step, so its load_state_dict creates them from the restored arrays.
    restored_from = manager.restore_or_initialize()
    if restored_from is None:
        print(f"starting from scratch in {args.dir}", flush=True)
    else:
        print(f"resumed from {restored_from} at step {int(run.step.numpy())}", flush=True)

    current = int(run.step.numpy())
    last = current + args.steps
    while current < last:
        loss = run.train_step(x, y)
        current += 1
        if current % args.save_every == 0 or current == last:
            # Returns once the values are safe: the tensors are written from their own memory in
            # the background, and the next optimizer step or forward first copies what the write
            # still needs of the tensors it is about to change.
            path = manager.save(checkpoint_number=current, options=options)
            print(f"step {current}: batch loss {loss:.6f}, saving {path}", flush=True)
        if current == args.kill_at_step:
            print(f"killed at step {current}", flush=True)
            os._exit(1)  # no sync(), no clean-up: what a crash looks like to the checkpoint directory

    checkpoint.sync()  # wait until every pending write is durable and committed
    run.model.eval()
    with torch.no_grad():
        full_loss = float(torch.nn.functional.mse_loss(run.model(x), y))
    print(
        f"final step {current}: loss {full_loss:.6f}, lr {run.scheduler.get_last_lr()[0]:.6g}, "
        f"scale {run.scaler.get_scale():g}, state {run.digest()}",
        flush=True,
    )
    print(f"latest checkpoint: {manager.latest_checkpoint}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
