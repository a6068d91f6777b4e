"""Train a small NumPy MLP with SGD, checkpointing asynchronously, and resume after a crash.

Each run trains ``--steps`` more steps. Run it twice with the same ``--dir``: the second run
restores the latest checkpoint and carries on from that step. Add ``--kill-at-step K`` to end the
process abruptly when the global step reaches K (``os._exit``, no clean-up, possibly while a
checkpoint is still being written); the next run resumes from the last checkpoint that was committed
before the crash. Every mini-batch is chosen from the global step, so a run that was killed and
resumed ends with exactly the weights of a run that never stopped.

    python examples/train_loop.py --dir /tmp/asyncckpt-demo --steps 200 --kill-at-step 140
    python examples/train_loop.py --dir /tmp/asyncckpt-demo --steps 60   # resumes from ckpt-120 or ckpt-140
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import numpy as np

import asyncckpt as ac

__all__ = ["MLP", "main"]

N_SAMPLES, N_FEATURES, N_HIDDEN, BATCH = 512, 8, 32, 64


class MLP(ac.Module):
    """``y = tanh(x @ w1 + b1) @ w2 + b2``; the four Variables are tracked as attributes."""

    def __init__(self, n_in: int, n_hidden: int, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w1 = ac.Variable(rng.normal(0.0, 1.0 / np.sqrt(n_in), (n_in, n_hidden)).astype(np.float32), name="w1")
        self.b1 = ac.Variable(np.zeros(n_hidden, np.float32), name="b1")
        self.w2 = ac.Variable(rng.normal(0.0, 1.0 / np.sqrt(n_hidden), (n_hidden, 1)).astype(np.float32), name="w2")
        self.b2 = ac.Variable(np.zeros(1, np.float32), name="b2")

    @property
    def parameters(self) -> list:
        return [self.w1, self.b1, self.w2, self.b2]

    def loss_and_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[float, list[np.ndarray]]:
        """Mean squared error and its gradients with respect to ``parameters`` (hand-written backprop)."""
        w1, b1, w2, b2 = (v.numpy() for v in self.parameters)
        hidden = np.tanh(x @ w1 + b1)
        error = hidden @ w2 + b2 - y
        loss = float(np.mean(error**2))
        d_out = 2.0 * error / len(x)
        d_hidden = (d_out @ w2.T) * (1.0 - hidden**2)
        grads = [x.T @ d_hidden, d_hidden.sum(axis=0), hidden.T @ d_out, d_out.sum(axis=0)]
        return loss, [g.astype(np.float32) for g in grads]


def make_data(seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """A fixed synthetic regression problem: a smooth nonlinear target plus a little noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_SAMPLES, N_FEATURES)).astype(np.float32)
    y = np.sin(x @ rng.normal(size=(N_FEATURES, 1))) + 0.05 * rng.normal(size=(N_SAMPLES, 1))
    return x, y.astype(np.float32)


def batch_for_step(step: int, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mini-batch for ``step``: a function of the step alone, so resumed runs see the same data."""
    index = np.random.default_rng(step).choice(len(x), size=BATCH, replace=False)
    return x[index], y[index]


def weights_digest(variables) -> str:
    """A short hash of the exact bytes of ``variables``, to compare runs bit for bit."""
    digest = hashlib.sha256()
    for variable in variables:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()[:16]


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="checkpoint directory (created if missing)")
    parser.add_argument("--steps", type=positive_int, default=200, help="steps to train in this run (default 200)")
    parser.add_argument("--save-every", type=positive_int, default=20, help="save every N steps (default 20)")
    parser.add_argument("--max-to-keep", type=positive_int, default=3, help="checkpoints to keep (default 3)")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument(
        "--kill-at-step",
        type=positive_int,
        default=None,
        help="simulate a crash: os._exit(1) when the global step reaches K (after its save, if it has one)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    x, y = make_data()

    model = MLP(N_FEATURES, N_HIDDEN)
    optimizer = ac.optimizers.SGD(learning_rate=args.learning_rate, momentum=0.9)
    step = ac.Variable(0, dtype=np.int64, name="step", trainable=False)
    checkpoint = ac.Checkpoint(step=step, model=model, optimizer=optimizer)
    manager = ac.CheckpointManager(checkpoint, args.dir, max_to_keep=args.max_to_keep)
    options = ac.CheckpointOptions(enable_async=True)

    # Momentum slots do not exist until the first update; their saved values wait in the checkpoint's
    # deferred queue and are applied when the optimizer creates them (restore-on-create).
    restored_from = manager.restore_or_initialize()
    if restored_from is None:
        print(f"starting from scratch in {args.dir}", flush=True)
    else:
        print(f"resumed from {restored_from} at step {int(step.numpy())}", flush=True)

    current = int(step.numpy())
    last = current + args.steps
    while current < last:
        loss, grads = model.loss_and_gradients(*batch_for_step(current, x, y))
        optimizer.apply_gradients(zip(grads, model.parameters, strict=True))
        step.assign_add(1)
        current += 1
        if current % args.save_every == 0 or current == last:
            # Returns once the values are safely snapshotted; the bytes are written in the background
            # while the next steps run.
            path = manager.save(checkpoint_number=current, options=options)
            print(f"step {current}: batch loss {loss:.6f}, saving {path}", flush=True)
        if current == args.kill_at_step:
            print(f"killed at step {current}", flush=True)
            os._exit(1)  # no sync(), no clean-up: what a crash looks like to the checkpoint directory

    checkpoint.sync()  # wait until every pending write is durable and committed
    full_loss = model.loss_and_gradients(x, y)[0]
    print(f"final step {current}: loss {full_loss:.6f}, weights {weights_digest(model.parameters)}", flush=True)
    print(f"latest checkpoint: {manager.latest_checkpoint}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
