"""PyTorch model + AdamW checkpoint benchmark on the CPU: asyncckpt against torch.save and DCP.

One command measures, on the same model in one run:

* **asyncckpt** -- ``Checkpoint(model=model, optimizer=optimizer).write(prefix, options=async)``
  through the torch adapters: *stall* is the time until ``write()`` returns, *durable* until
  ``sync()`` returns (asyncckpt fsyncs its files and commits); restore is ``read(prefix)`` into a
  freshly built model and optimizer (the parameters are read into in place, AdamW's moments are
  created by ``load_state_dict``);
* **plain Variables** -- the same tensors' bytes as one ``asyncckpt.Variable`` each, saved and
  restored the same way: the adapters' target is a durable time within 1.1x of this row;
* ``torch.save({"model": ..., "optimizer": ...})`` + ``fsync`` / ``torch.load`` + ``load_state_dict``;
* ``torch.distributed.checkpoint.async_save`` of ``get_state_dict(model, optimizer)`` in one process
  (``no_dist=True``: no process group) + ``fsync`` / ``get_state_dict`` of the fresh pair, ``dcp.load``
  and ``set_state_dict``.

The model is a stack of ``--layers`` square ``Linear`` layers holding ``--size-mib`` of float32
parameters, after one AdamW step (so both moments exist: the checkpoint is about three times the
parameters). Methods are interleaved within each of ``--repeat`` rounds and medians reported.
Before every restore the checkpoint's files are dropped from the page cache (cold read, see
``bench.py``); every restore is checked bit for bit against the saved model outside the timed region.
Peak extra memory is measured as in ``bench.py`` (from the start of the save until durable, and
during the restore, including the tensors it creates).

    python benchmarks/bench_torch.py [--size-mib 1024] [--layers 128] [--repeat 3] [--dir D] [--output F]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from bench import (  # benchmarks/bench.py: the shared measuring and reporting helpers
    PeakRSS,
    _no_dist,
    evict,
    files_under,
    fmt_bw,
    fmt_mib,
    fmt_ratio,
    fmt_s,
    free_disk_check,
    fsync_tree,
    median,
    positive_int,
    remove,
    report_in_workdir,
)

__all__ = ["main"]

MiB = 1 << 20


# ---------------------------------------------------------------------------------------------- state
@dataclass
class Trained:
    """A model and its AdamW optimizer."""

    model: object
    optimizer: object


def width_for(size_mib: int, layers: int) -> int:
    """The width ``d`` of ``layers`` Linear(d, d) layers (weight and bias) holding about ``size_mib`` MiB."""
    floats = size_mib * MiB // 4 // layers
    return max(1, int((math.sqrt(1 + 4 * floats) - 1) / 2))  # d*d + d <= floats


def build(width: int, layers: int, *, zeroed: bool) -> Trained:
    """A model and optimizer; ``zeroed``: every parameter 0, as the target of a restore (no init cost)."""
    import torch  # noqa: PLC0415 - optional dependency

    if zeroed:
        with torch.device("meta"):
            model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for param in model.parameters():
                param.zero_()
    else:
        model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    return Trained(model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01))


def trained_state(width: int, layers: int) -> Trained:
    """Random parameters after one AdamW step on random gradients: both moments exist."""
    import torch  # noqa: PLC0415

    torch.manual_seed(0)
    state = build(width, layers, zeroed=False)
    for param in state.model.parameters():
        param.grad = torch.randn_like(param)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    return state


def named_tensors(state: Trained) -> dict[str, object]:
    """Every tensor a checkpoint of ``state`` holds: parameters, then AdamW's step and moments per parameter."""
    tensors = dict(state.model.state_dict())
    for index, param in enumerate(state.model.parameters()):
        for key, value in state.optimizer.state.get(param, {}).items():
            tensors[f"optimizer.{index}.{key}"] = value
    return tensors


def verify(expected: dict[str, object], actual: dict[str, object], what: str) -> None:
    """Fail loudly unless ``actual`` holds exactly the saved tensors (never timed)."""
    import torch  # noqa: PLC0415

    if expected.keys() != actual.keys():
        raise AssertionError(f"{what}: restored {len(actual)} tensors, saved {len(expected)}")
    differing = [name for name, tensor in expected.items()
                 if not torch.equal(torch.as_tensor(actual[name]), tensor)]  # fmt: skip
    if differing:
        raise AssertionError(f"{what}: {len(differing)} tensors differ from what was saved, e.g. {differing[:3]}")


# ---------------------------------------------------------------------------------------------- methods
# A method saves ``source`` at ``target`` (a path that does not exist yet): ``save`` returns when the
# caller may go on (the stall) and hands back the wait until durable. ``restorer`` builds, untimed,
# what a restore reads into, and returns the timed restore and the untimed check.


@dataclass
class Method:
    name: str
    save: Callable[[str], Callable[[], None]]
    restorer: Callable[[], tuple[Callable[[str], None], Callable[[], None]]]
    blocking: bool = False  # the save is durable when it returns: there is no separate stall


def async_writer(checkpoint) -> Callable[[str], Callable[[], None]]:
    """A method's save: an asynchronous ``write`` of ``checkpoint`` into ``target``; ``sync`` waits until durable."""
    import asyncckpt as ac  # noqa: PLC0415

    options = ac.CheckpointOptions(enable_async=True)

    def save(target: str) -> Callable[[], None]:
        os.makedirs(target)
        checkpoint.write(os.path.join(target, "ckpt"), options=options)
        return checkpoint.sync

    return save


def asyncckpt_method(source: Trained, expected: dict, width: int, layers: int) -> Method:
    import asyncckpt as ac  # noqa: PLC0415

    checkpoint = ac.Checkpoint(model=source.model, optimizer=source.optimizer)  # built once, as a training loop does

    def restorer():
        fresh = build(width, layers, zeroed=True)

        def restore(target: str) -> None:
            ac.Checkpoint(model=fresh.model, optimizer=fresh.optimizer).read(os.path.join(target, "ckpt"))

        return restore, lambda: verify(expected, named_tensors(fresh), "asyncckpt restore")

    return Method("asyncckpt Checkpoint(model, optimizer), async", async_writer(checkpoint), restorer)


def variables_method(expected: dict) -> Method:
    """The same bytes as plain ``Variable``s (copies of the tensors, so the model is not involved)."""
    import asyncckpt as ac  # noqa: PLC0415

    variables = {name.replace(".", "_"): ac.Variable(tensor.numpy()) for name, tensor in expected.items()}
    checkpoint = ac.Checkpoint(**variables)

    def restorer():
        for variable in variables.values():  # so that the check proves the restore happened
            variable.assign(np.zeros(variable.shape, variable.dtype))

        def check() -> None:
            restored = dict(zip(expected, (variable.numpy() for variable in variables.values())))
            verify(expected, restored, "plain Variables restore")

        return lambda target: checkpoint.read(os.path.join(target, "ckpt")), check

    return Method("asyncckpt plain Variables (same bytes), async", async_writer(checkpoint), restorer)


def torch_save_method(source: Trained, expected: dict, width: int, layers: int) -> Method:
    import torch  # noqa: PLC0415

    def save(target: str) -> Callable[[], None]:
        with open(target, "wb") as handle:
            torch.save({"model": source.model.state_dict(), "optimizer": source.optimizer.state_dict()}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return lambda: None

    def restorer():
        fresh = build(width, layers, zeroed=True)

        def restore(target: str) -> None:
            loaded = torch.load(target, weights_only=True)
            fresh.model.load_state_dict(loaded["model"])
            fresh.optimizer.load_state_dict(loaded["optimizer"])

        return restore, lambda: verify(expected, named_tensors(fresh), "torch.load restore")

    return Method("torch.save+fsync / torch.load+load_state_dict", save, restorer, blocking=True)


def dcp_method(source: Trained, expected: dict, width: int, layers: int) -> Method:
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: PLC0415

    # "torch.distributed is disabled ... assuming the intent is to save in a single process": it is. Set for the
    # whole process: async_save warns from its writer thread.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)

    def save(target: str) -> Callable[[], None]:
        model_state, optimizer_state = get_state_dict(source.model, source.optimizer)
        future = dcp.async_save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=target,
                                **_no_dist(dcp.async_save))  # fmt: skip

        def durable() -> None:
            future.result()
            fsync_tree(target)

        return durable

    def restorer():
        fresh = build(width, layers, zeroed=True)

        def restore(target: str) -> None:
            model_state, optimizer_state = get_state_dict(fresh.model, fresh.optimizer)  # creates AdamW's state
            state = {"model": model_state, "optimizer": optimizer_state}
            dcp.load(state, checkpoint_id=target, **_no_dist(dcp.load))
            set_state_dict(fresh.model, fresh.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])  # fmt: skip

        return restore, lambda: verify(expected, named_tensors(fresh), "dcp.load restore")

    return Method("torch.distributed.checkpoint async_save / load", save, restorer)


# ---------------------------------------------------------------------------------------------- measuring
@dataclass
class Figures:
    stalls: list[float] = field(default_factory=list)
    durables: list[float] = field(default_factory=list)
    restores: list[float] = field(default_factory=list)
    save_rss: list[float] = field(default_factory=list)
    restore_rss: list[float] = field(default_factory=list)


def measure(method: Method, workdir: str, attempt: int, figures: Figures) -> None:
    target = os.path.join(workdir, f"{method.name.split()[0].replace('.', '_')}-{attempt}")
    gc.collect()
    with PeakRSS() as rss:
        started = time.perf_counter()
        durable = method.save(target)
        stalled = time.perf_counter() - started
        durable()
        figures.durables.append(time.perf_counter() - started)
    figures.stalls.append(stalled)
    figures.save_rss.append(rss.extra_mib)
    restore, check = method.restorer()
    for name in files_under(target):
        evict(name)
    gc.collect()
    with PeakRSS() as rss:
        started = time.perf_counter()
        restore(target)
        figures.restores.append(time.perf_counter() - started)
    figures.restore_rss.append(rss.extra_mib)
    check()
    del restore, check
    remove(target)


def run(args, workdir: str) -> tuple[dict[str, Figures], dict[str, bool], int, int]:
    """Every method on one model, ``args.repeat`` interleaved rounds; figures by method name."""
    width = width_for(args.size_mib, args.layers)
    source = trained_state(width, args.layers)
    expected = named_tensors(source)
    nbytes = sum(tensor.nbytes for tensor in expected.values())
    free_disk_check(workdir, 2 * nbytes)
    methods = [
        asyncckpt_method(source, expected, width, args.layers),
        torch_save_method(source, expected, width, args.layers),
        dcp_method(source, expected, width, args.layers),
        variables_method(expected),
    ]
    figures = {method.name: Figures() for method in methods}
    for attempt in range(args.repeat):
        for method in methods:
            print(f"... round {attempt + 1}/{args.repeat}: {method.name}", file=sys.stderr, flush=True)
            measure(method, workdir, attempt, figures[method.name])
    return figures, {method.name: method.blocking for method in methods}, nbytes, len(expected)


def warm_up(workdir: str) -> None:
    """Untimed: every method once on a tiny model (imports, asyncckpt's I/O thread, DCP's executor)."""
    source = trained_state(8, 2)
    expected = named_tensors(source)
    for method in (asyncckpt_method(source, expected, 8, 2), torch_save_method(source, expected, 8, 2),
                   dcp_method(source, expected, 8, 2), variables_method(expected)):  # fmt: skip
        measure(method, workdir, 0, Figures())


# ---------------------------------------------------------------------------------------------- report
ASYNCCKPT = "asyncckpt Checkpoint(model, optimizer), async"
VARIABLES = "asyncckpt plain Variables (same bytes), async"
TORCH_SAVE = "torch.save+fsync / torch.load+load_state_dict"
DCP = "torch.distributed.checkpoint async_save / load"


def report(args, figures: dict[str, Figures], blocking: dict[str, bool], nbytes: int, count: int) -> list[str]:
    import torch  # noqa: PLC0415

    width = width_for(args.size_mib, args.layers)
    params = args.layers * (width * width + width) * 4
    lines = [
        f"### PyTorch model + AdamW on the CPU: {args.layers} × Linear({width}, {width}), "
        f"{params / MiB:.0f} MiB of parameters, {nbytes / MiB:.0f} MiB with AdamW's moments, {count} tensors",
        "",
        f"Medians of {args.repeat} interleaved rounds; torch {torch.__version__}. Restores are cold (the files "
        "dropped from the page cache) into a freshly built model and optimizer.",
        "",
        "| method | save() stall | until durable | durable bandwidth | restore (cold) | restore bandwidth "
        "| peak extra MiB save / restore |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, figure in figures.items():
        stall = "–" if blocking[name] else fmt_s(median(figure.stalls))
        durable, restore = median(figure.durables), median(figure.restores)
        lines.append(
            f"| {name} | {stall} | {fmt_s(durable)} | {fmt_bw(nbytes, durable)} | {fmt_s(restore)} "
            f"| {fmt_bw(nbytes, restore)} | {fmt_mib(max(figure.save_rss))} / {fmt_mib(max(figure.restore_rss))} |"
        )
    lines += ["", "Each round (save() stall / until durable / restore):", ""]
    for name, figure in figures.items():
        rounds = zip(figure.stalls, figure.durables, figure.restores)
        lines.append(f"- {name}: " + "; ".join(" / ".join(fmt_s(value) for value in round_) for round_ in rounds))
    lines += ["", *ratio_lines(figures), ""]
    return lines


def ratio_lines(figures: dict[str, Figures]) -> list[str]:
    def fig(name: str, attribute: str) -> float:
        return median(getattr(figures[name], attribute))

    adapter_durable, adapter_restore = fig(ASYNCCKPT, "durables"), fig(ASYNCCKPT, "restores")
    stall = fig(ASYNCCKPT, "stalls")
    vs_variables = adapter_durable / fig(VARIABLES, "durables")
    vs_torch_load = fig(TORCH_SAVE, "restores") / adapter_restore

    def verdict(met: bool) -> str:
        return "met" if met else "missed"

    first_stall = figures[ASYNCCKPT].stalls[0]
    others = [
        ("torch.save+fsync time / asyncckpt durable time", fig(TORCH_SAVE, "durables"), adapter_durable),
        ("DCP async_save durable time / asyncckpt durable time", fig(DCP, "durables"), adapter_durable),
        ("DCP async_save stall / asyncckpt save() stall", fig(DCP, "stalls"), stall),
        ("DCP load time / asyncckpt restore time", fig(DCP, "restores"), adapter_restore),
        ("plain Variables' restore time / asyncckpt restore time", fig(VARIABLES, "restores"), adapter_restore),
    ]
    return [
        "Targets (asyncckpt through the torch adapters):",
        "",
        f"- durable time / plain Variables' durable time: {vs_variables:.2f}× "
        f"(target ≤ 1.10×: {verdict(vs_variables <= 1.1)})",
        f"- save() stall: {fmt_s(stall)} (target ≤ 5 ms: {verdict(stall <= 0.005)}); "
        f"the first round's, which builds the object structure, {fmt_s(first_stall)}",
        f"- torch.load + load_state_dict time / asyncckpt restore time: {vs_torch_load:.2f}× "
        f"(target ≥ 1.00×, no slower than torch.load: {verdict(vs_torch_load >= 1.0)})",
        "",
        "Ratios (above 1× means asyncckpt through the adapters was faster):",
        "",
        *(f"- {what}: {fmt_ratio(numerator, denominator)}" for what, numerator, denominator in others),
    ]


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark checkpointing a PyTorch model + AdamW on the CPU: asyncckpt, torch.save, DCP.",
        epilog="Sizes are MiB (2**20 bytes). Results go to stdout as Markdown.",
    )
    parser.add_argument("--size-mib", type=positive_int, default=1024,
                        help="float32 parameters (default 1024; AdamW's moments add twice as much)")
    parser.add_argument("--layers", type=positive_int, default=128,
                        help="Linear layers, two parameter tensors each (default 128)")
    parser.add_argument("--repeat", type=positive_int, default=3,
                        help="interleaved rounds, medians reported (default 3)")
    parser.add_argument("--dir", default=None, help="where to write (default: a new temporary directory)")
    parser.add_argument("--output", default=None, help="also write the Markdown report to this file")
    return parser.parse_args(argv)  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch  # noqa: F401, PLC0415
        import torch.distributed.checkpoint  # noqa: F401, PLC0415
    except Exception as exc:
        sys.stderr.write(f"bench_torch: needs PyTorch ({type(exc).__name__}: {exc}); pip install -e '.[torch]'\n")
        return 2

    def measure_all(workdir: str) -> list[str]:
        warm_up(workdir)
        return report(args, *run(args, workdir))

    return report_in_workdir(args.dir, "asyncckpt-bench-torch-", args.output, measure_all)


if __name__ == "__main__":
    sys.exit(main())
