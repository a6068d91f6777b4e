"""Train a small JAX MLP with a hand-written Adam, checkpointing asynchronously, and resume after a crash.

The JAX twin of ``examples/train_loop.py``: the whole train state -- step, parameters, Adam's
moments and the typed PRNG key that picks the mini-batches -- is one pytree, held by an
``asyncckpt.PyTree`` and advanced by a ``jax.jit`` step that donates it. Each run trains
``--steps`` more steps; ``--kill-at-step K`` ends the process abruptly when the global step
reaches K (``os._exit``, no clean-up, possibly while a checkpoint is still being written), and the
next run resumes from the last committed checkpoint. A resumed run ends with exactly the bytes of
a run that never stopped: the final line's digest covers every leaf of the train state.

    python examples/jax_train.py --dir /tmp/asyncckpt-jax --steps 60 --kill-at-step 45
    python examples/jax_train.py --dir /tmp/asyncckpt-jax --steps 20   # resumes from ckpt-40
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import asyncckpt as ac

__all__ = ["TrainState", "main"]

N_SAMPLES, N_FEATURES, N_HIDDEN, BATCH = 512, 8, 32, 64
BETA1, BETA2, EPSILON = 0.9, 0.999, 1e-8


class TrainState(NamedTuple):
    """Everything a step changes. A named tuple is a pytree: its leaves are saved by their paths
    (``params.w1``, ``mu.b2``, ``key``)."""

    step: jax.Array  # int32 scalar
    params: dict
    mu: dict  # Adam's first moments, like params
    nu: dict  # second moments
    key: jax.Array  # a typed PRNG key (jax.random.key), split once per step


# Built by jax.jit: one compilation each instead of one per operation.
@functools.partial(jax.jit, static_argnums=0)
def init_state(seed: int = 0) -> TrainState:
    init_key, data_key = jax.random.split(jax.random.key(seed))
    k1, k2 = jax.random.split(init_key)
    params = {
        "w1": jax.random.normal(k1, (N_FEATURES, N_HIDDEN)) / np.sqrt(N_FEATURES),
        "b1": jnp.zeros(N_HIDDEN),
        "w2": jax.random.normal(k2, (N_HIDDEN, 1)) / np.sqrt(N_HIDDEN),
        "b2": jnp.zeros(1),
    }
    mu, nu = (jax.tree.map(jnp.zeros_like, params) for _ in range(2))  # own buffers each: all are donated
    return TrainState(step=jnp.int32(0), params=params, mu=mu, nu=nu, key=data_key)


@functools.partial(jax.jit, static_argnums=0)
def make_data(seed: int = 1234) -> tuple[jax.Array, jax.Array]:
    """A fixed synthetic regression problem: a smooth nonlinear target plus a little noise."""
    kx, kw, kn = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (N_SAMPLES, N_FEATURES))
    y = jnp.sin(x @ jax.random.normal(kw, (N_FEATURES, 1))) + 0.05 * jax.random.normal(kn, (N_SAMPLES, 1))
    return x, y


@jax.jit
def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, x: jax.Array, y: jax.Array, learning_rate: float) -> tuple[TrainState, jax.Array]:
    """One Adam step on a mini-batch drawn with the state's key; ``state``'s buffers are donated."""
    key, batch_key = jax.random.split(state.key)
    index = jax.random.choice(batch_key, N_SAMPLES, (BATCH,), replace=False)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, x[index], y[index])
    step = state.step + 1
    mu = jax.tree.map(lambda m, g: BETA1 * m + (1 - BETA1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: BETA2 * v + (1 - BETA2) * g * g, state.nu, grads)
    scale = learning_rate * jnp.sqrt(1 - BETA2**step) / (1 - BETA1**step)
    params = jax.tree.map(lambda p, m, v: p - scale * m / (jnp.sqrt(v) + EPSILON), state.params, mu, nu)
    return TrainState(step=step, params=params, mu=mu, nu=nu, key=key), loss


def state_digest(state: TrainState) -> str:
    """A short hash of the exact bytes of every leaf (the key by its key data)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state._replace(key=jax.random.key_data(state.key))):
        digest.update(np.ascontiguousarray(leaf).tobytes())
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
    x, y = make_data()
    holder = ac.PyTree(init_state())  # the template a restore follows: structure, dtypes, sharding
    checkpoint = ac.Checkpoint(state=holder)
    manager = ac.CheckpointManager(checkpoint, args.dir, max_to_keep=args.max_to_keep)
    options = ac.CheckpointOptions(enable_async=True)

    # JAX arrays are immutable: a restore builds a new tree, which the holder hands back.
    restored_from = manager.restore_or_initialize()
    state = holder.value
    if restored_from is None:
        print(f"starting from scratch in {args.dir}", flush=True)
    else:
        print(f"resumed from {restored_from} at step {int(state.step)}", flush=True)

    current = int(state.step)
    last = current + args.steps
    while current < last:
        state, loss = train_step(state, x, y, args.learning_rate)
        current += 1
        if current % args.save_every == 0 or current == last:
            # The step donated the previous state, so hand the holder the live one before saving.
            # save() takes a host view of each leaf and returns; on the CPU the next step cannot
            # reuse a buffer that view still holds (XLA copies instead), so nothing written changes.
            holder.value = state
            path = manager.save(checkpoint_number=current, options=options)
            print(f"step {current}: batch loss {float(loss):.6f}, saving {path}", flush=True)
        if current == args.kill_at_step:
            print(f"killed at step {current}", flush=True)
            os._exit(1)  # no sync(), no clean-up: what a crash looks like to the checkpoint directory

    checkpoint.sync()  # wait until every pending write is durable and committed
    full_loss = float(loss_fn(state.params, x, y))
    print(f"final step {current}: loss {full_loss:.6f}, state {state_digest(state)}", flush=True)
    print(f"latest checkpoint: {manager.latest_checkpoint}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
