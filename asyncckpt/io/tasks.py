"""asyncio helpers shared by the executors."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["finish_even_if_cancelled", "first_error"]


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first exception of a task group's failure: the one the caller is told about."""
    first = group.exceptions[0]
    return first_error(first) if isinstance(first, BaseExceptionGroup) else first


async def finish_even_if_cancelled(coro) -> None:
    """Await ``coro``; if the caller is cancelled meanwhile, let it finish first, then re-raise.

    A read into a pinned buffer runs in a worker thread that cancellation does not stop: the buffer
    must not go back to the pool (and to the next copy) while that thread still writes into it.
    """
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await task
        raise
