"""What the rank programs of the multi-process tests (``_torch_ranks.py``, ``_jax_ranks.py``) report.

Each scenario's outcome on each rank goes to ``<out>/<scenario>-<rank>.json`` for the test to read.
"""

from __future__ import annotations

import json
import os


def record(out: str, scenario: str, rank: int, **fields) -> None:
    with open(os.path.join(out, f"{scenario}-{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(fields, handle)


def outcome(function) -> dict:
    """``{"ok": function()}``, or the exception's type and message."""
    try:
        return {"ok": function()}
    except Exception as exc:  # noqa: BLE001 - the test reads every rank's outcome
        return {"error": type(exc).__name__, "message": str(exc)}


def save_with_a_failing_rank(checkpoint, prefix: str, worker, failing: int = 1) -> dict:
    """Save ``checkpoint`` through ``worker``; rank ``failing``'s first data-file write fails (ENOSPC)."""
    import asyncckpt as ac  # noqa: PLC0415
    from asyncckpt.io.storage import FileStorage  # noqa: PLC0415
    from asyncckpt.testing.storage import FailingStorage  # noqa: PLC0415

    storage = FailingStorage(FileStorage(), fail_on=1) if worker.index == failing else None
    options = ac.CheckpointOptions(multi_worker=worker, write_settings=ac.WriteSettings(storage=storage))
    return outcome(lambda: checkpoint.save(prefix, options=options))
