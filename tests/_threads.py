"""Ranks as threads of the test process, each with an in-process coordinator of one group."""

from __future__ import annotations

import threading

from asyncckpt.io.coordinator import InProcessCoordinator


def on_ranks(count: int, make, action, *, timeout: float = 20.0) -> dict[int, object]:
    """Run ``action(rank, coordinator, make(rank))`` on a thread per rank; each rank's result or exception."""
    coordinators = InProcessCoordinator.group(count, timeout_seconds=timeout)
    outcomes: dict[int, object] = {}

    def run(coordinator):
        try:
            outcomes[coordinator.rank] = action(coordinator.rank, coordinator, make(coordinator.rank))
        except Exception as exc:  # noqa: BLE001 - the test looks at every rank's outcome
            outcomes[coordinator.rank] = exc

    threads = [threading.Thread(target=run, args=(c,)) for c in coordinators]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return outcomes
