"""GPU training-loop overhead of checkpointing: a small transformer, bf16 autocast, AdamW.

Time per training step with no checkpointing, against the same loop saving every 1, 10 and 100
steps (``--every``) with

* **asyncckpt** -- ``CheckpointManager(Checkpoint(model=model, optimizer=optimizer), max_to_keep=2)``,
  ``save(options=CheckpointOptions(enable_async=True))``: the CUDA tensors are captured on the
  device when ``save()`` is called (with CuPy installed; without it they are copied to the host
  there, and the report says so), ordered on the current stream -- torch's and CuPy's default
  stream here, the legacy default stream;
* **DCP** -- ``torch.distributed.checkpoint.async_save`` of ``get_state_dict(model, optimizer)`` in
  one process (``no_dist=True``, or a single-rank gloo group on a torch without it), with its default
  stager; as its documentation does, the previous save's future is awaited before the next save,
  and only the two newest checkpoints are kept.

The model is a decoder-sized stack of ``TransformerEncoderLayer``s with token embeddings and an
output head, float32 parameters under ``torch.autocast(dtype=bfloat16)`` (``--param-dtype bfloat16``
trains bf16 parameters instead: asyncckpt stores them, copying bf16 CUDA tensors to the host at
``save()`` since the device capture does not take them yet).
Every mode runs ``max(--steps, 3 * every)`` steps after ``--warmup`` untimed ones; saves come after
steps ``every, 2*every, ...`` short of the last step, so the last save has ``every`` steps to finish
before the loop's end, where the time includes waiting until it is durable and a device
synchronise. The runs without checkpointing come first and last; the overhead is against their mean.

Needs an NVIDIA GPU (exits with status 2 and says why otherwise); ``--device cpu`` runs the same
loop on the CPU at a tiny size, to check the script itself (its figures mean nothing).

    python benchmarks/gpu_train_overhead.py [--steps 100] [--every 1,10,100] [--layers 6] [--d-model 768]
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import deque
from dataclasses import dataclass

from bench import fmt_s, int_list, positive_int, report_in_workdir

__all__ = ["main"]

MiB = 1 << 20


# ---------------------------------------------------------------------------------------------- model
def build_model(args, torch):
    nn = torch.nn

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(args.vocab, args.d_model)
            self.position = nn.Parameter(torch.zeros(args.seq, args.d_model))
            layer = nn.TransformerEncoderLayer(args.d_model, args.heads, 4 * args.d_model, dropout=0.0,
                                               batch_first=True, norm_first=True)  # fmt: skip
            self.blocks = nn.TransformerEncoder(layer, args.layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(args.d_model)
            self.head = nn.Linear(args.d_model, args.vocab, bias=False)

        def forward(self, tokens):
            return self.head(self.norm(self.blocks(self.embed(tokens) + self.position)))

    torch.manual_seed(0)
    dtype = getattr(torch, args.param_dtype)
    return TinyLM().to(device=args.device, dtype=dtype)


@dataclass
class Loop:
    """One training setup: model, optimizer, a fixed batch, and the step."""

    torch: object
    model: object
    optimizer: object
    tokens: object
    targets: object
    device: str
    vocab: int

    def step(self) -> None:
        torch = self.torch
        with torch.autocast(device_type=self.device, dtype=torch.bfloat16):
            logits = self.model(self.tokens)
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, self.vocab), self.targets.view(-1))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def synchronize(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()


def make_loop(args, torch) -> Loop:
    model = build_model(args, torch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    generator = torch.Generator(device=args.device).manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device, generator=generator)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device, generator=generator)
    return Loop(torch, model, optimizer, tokens, targets, args.device, args.vocab)


def state_bytes(loop: Loop) -> tuple[int, int]:
    """Bytes of the parameters, and of everything a checkpoint holds (parameters and AdamW's state)."""
    torch = loop.torch
    params = sum(param.nbytes for param in loop.model.parameters())
    state = sum(value.nbytes for per_param in loop.optimizer.state.values() for value in per_param.values()
                if isinstance(value, torch.Tensor))  # fmt: skip
    return params, params + state


# ---------------------------------------------------------------------------------------------- savers
# A saver has ``save(step)`` (the call whose time is the stall), ``finish()`` (wait until the last save
# is durable) and ``close()``.


class AsyncckptSaver:
    def __init__(self, loop: Loop, directory: str) -> None:
        import asyncckpt as ac  # noqa: PLC0415

        self.checkpoint = ac.Checkpoint(model=loop.model, optimizer=loop.optimizer)
        self.manager = ac.CheckpointManager(self.checkpoint, directory, max_to_keep=2)
        self.options = ac.CheckpointOptions(enable_async=True)

    def save(self, step: int) -> None:
        self.manager.save(checkpoint_number=step, options=self.options)

    def finish(self) -> None:
        import asyncckpt as ac  # noqa: PLC0415

        self.checkpoint.sync()
        assert ac.list_variables(self.manager.latest_checkpoint), "the last checkpoint holds nothing"

    def close(self) -> None:
        self.checkpoint.sync()


class DcpSaver:
    def __init__(self, loop: Loop, directory: str) -> None:
        import torch.distributed.checkpoint as dcp  # noqa: PLC0415
        from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: PLC0415

        self.dcp, self.get_state_dict, self.loop, self.directory = dcp, get_state_dict, loop, directory
        self.pending = None
        self.kept: deque[str] = deque()
        self.options = _single_process(dcp.async_save)

    def save(self, step: int) -> None:
        self._wait()  # one save in flight at a time, as DCP's documentation does
        while len(self.kept) >= 2:
            shutil.rmtree(self.kept.popleft(), ignore_errors=True)
        model_state, optimizer_state = self.get_state_dict(self.loop.model, self.loop.optimizer)
        path = os.path.join(self.directory, f"step-{step}")
        self.kept.append(path)
        self.pending = self.dcp.async_save({"model": model_state, "optimizer": optimizer_state},
                                           checkpoint_id=path, **self.options)  # fmt: skip

    def _wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def finish(self) -> None:
        self._wait()
        assert os.path.exists(os.path.join(self.kept[-1], ".metadata")), "DCP wrote no metadata"

    def close(self) -> None:
        self._wait()


def _single_process(function) -> dict:
    """How ``function`` runs in one process: ``no_dist=True``, or else a single-rank gloo group (once)."""
    if "no_dist" in inspect.signature(function).parameters:
        # "torch.distributed is disabled ... assuming the intent is to save in a single process": it is.
        # Filtered for the whole process: async_save warns from its writer thread.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        return {"no_dist": True}
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{29500 + os.getpid() % 1000}",
                                rank=0, world_size=1)  # fmt: skip
    return {}


SAVERS = {"asyncckpt": AsyncckptSaver, "dcp": DcpSaver}


# ---------------------------------------------------------------------------------------------- measuring
def run_mode(loop: Loop, args, label: str, saver_kind: str | None, every: int | None, workdir: str) -> dict:
    steps = args.steps if every is None else max(args.steps, 3 * every)
    row = {"mode": label, "every": every, "steps": steps, "saves": 0, "stalls": [], "error": None}
    directory = tempfile.mkdtemp(prefix=f"{saver_kind or 'none'}-", dir=workdir)
    saver = None
    try:
        if saver_kind is not None:
            saver = SAVERS[saver_kind](loop, directory)
        for _ in range(args.warmup):
            loop.step()
        loop.synchronize()
        started = time.perf_counter()
        for index in range(1, steps + 1):
            loop.step()
            if saver is not None and index % every == 0 and index < steps:
                before = time.perf_counter()
                saver.save(index)
                row["stalls"].append(time.perf_counter() - before)
        if saver is not None:
            saver.finish()
        loop.synchronize()
        row["per_step_s"] = (time.perf_counter() - started) / steps
        row["saves"] = len(row["stalls"])
    except Exception as exc:  # a method that cannot save this state: reported in its row, the others go on
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    finally:
        if saver is not None:
            try:
                saver.close()
            except Exception as exc:  # the error of a failed save surfaces again here
                row["error"] = row["error"] or f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        shutil.rmtree(directory, ignore_errors=True)
    return row


def measure(args, workdir: str) -> tuple[list[dict], Loop]:
    import torch  # noqa: PLC0415

    loop = make_loop(args, torch)
    modes: list[tuple[str, str | None, int | None]] = [("no checkpointing", None, None)]
    for kind in args.methods:
        modes += [(f"{kind} every {every} steps", kind, every) for every in args.every]
    modes.append(("no checkpointing (again)", None, None))
    rows = []
    for label, kind, every in modes:
        print(f"... {label}", file=sys.stderr, flush=True)
        rows.append(run_mode(loop, args, label, kind, every, workdir))
    return rows, loop


# ---------------------------------------------------------------------------------------------- report
def describe(args, loop: Loop) -> list[str]:
    torch = loop.torch
    params, total = state_bytes(loop)
    if args.device == "cuda":
        device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        device = "the CPU (a check of the script; the figures mean nothing)"
    capture = "CPU tensors: asyncckpt saves them from their own memory, guarded by the step pre-hook"
    if args.device == "cuda":
        try:
            import cupy  # noqa: PLC0415 - optional: asyncckpt's device capture
        except Exception as exc:
            capture = f"no CuPy ({type(exc).__name__}): asyncckpt copies the CUDA tensors to the host at save()"
        else:
            capture = f"CuPy {cupy.__version__}: asyncckpt captures the CUDA tensors on the device at save()"
    return [
        f"### Training-loop overhead on {device}: {args.layers}-layer transformer, d_model {args.d_model}, "
        f"batch {args.batch} × {args.seq} tokens, {args.param_dtype} parameters, bf16 autocast, AdamW",
        "",
        f"torch {torch.__version__}; {capture}. State: {params / MiB:.0f} MiB of parameters, {total / MiB:.0f} MiB "
        "with AdamW's moments. Time per step includes waiting for the last save to be durable.",
        "",
    ]


def table(rows: list[dict]) -> list[str]:
    bases = [row["per_step_s"] for row in rows if row["every"] is None and row["error"] is None]
    base = statistics.fmean(bases) if bases else None
    lines = [
        "| mode | steps | saves | time per step | overhead vs no checkpointing | save() stall (median) "
        "| save() stall (max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["error"] is not None:
            error = row["error"].replace("|", "/")
            lines.append(f"| {row['mode']} | {row['steps']} | – | – | error: {error} | – | – |")
            continue
        overhead = f"{row['per_step_s'] / base - 1:+.1%}" if base and row["every"] is not None else "–"
        stalls = row["stalls"]
        median = fmt_s(statistics.median(stalls)) if stalls else "–"
        worst = fmt_s(max(stalls)) if stalls else "–"
        lines.append(f"| {row['mode']} | {row['steps']} | {row['saves']} | {fmt_s(row['per_step_s'])} | {overhead} "
                     f"| {median} | {worst} |")  # fmt: skip
    return lines + [""]


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=100, help="steps per mode, at least 3 × every")
    parser.add_argument("--every", type=int_list, default=[1, 10, 100], help="save intervals (default 1,10,100)")
    parser.add_argument("--methods", default="asyncckpt,dcp", help="comma-separated: asyncckpt,dcp")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each mode (default 5)")
    parser.add_argument("--layers", type=positive_int, default=6)
    parser.add_argument("--d-model", type=positive_int, default=768)
    parser.add_argument("--heads", type=positive_int, default=12)
    parser.add_argument("--vocab", type=positive_int, default=32768)
    parser.add_argument("--seq", type=positive_int, default=512)
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--param-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: check the script on a machine without a GPU (use tiny sizes)")
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a new temporary directory)")
    parser.add_argument("--output", default=None, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = sorted(set(args.methods) - set(SAVERS))
    if unknown:
        parser.error(f"unknown --methods {unknown}; known: {sorted(SAVERS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch  # noqa: PLC0415 - optional dependency
    except Exception as exc:
        sys.stderr.write(f"gpu_train_overhead: needs PyTorch ({type(exc).__name__}: {exc}).\n")
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write(f"gpu_train_overhead: needs an NVIDIA GPU; torch {torch.__version__} has no CUDA device "
                         "(--device cpu checks the script on the CPU).\n")  # fmt: skip
        return 2

    def measure_all(workdir: str) -> list[str]:
        rows, loop = measure(args, workdir)
        return [*describe(args, loop), *table(rows)]

    return report_in_workdir(args.dir, "asyncckpt-train-", args.output, measure_all)


if __name__ == "__main__":
    sys.exit(main())
