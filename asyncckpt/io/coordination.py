"""Several workers saving one checkpoint: who writes what, section names, validation, waiting.

In data-parallel training every worker holds the same values. Rather than copy everything to one
worker, each of ``count`` workers writes about ``1/count`` of the bytes into its own data directory
``P.data-<nonce_i>/`` and publishes a *section* (``P.index.section-<i>-of-<n>-<nonce_i>``)
recording its tensors. Worker 0, the chief, writes its own share, waits for every other section of
the same save, validates them as untrusted input, *claims* each (renames it to
``P.index.claim-<chief nonce>-<nonce_i>``, which keeps its data directory from cleanup while the
chief holds its own lock), checks that every byte is there, merges them into one manifest naming
several data directories and commits ``P.index`` as a single writer would. Non-chief workers keep
their data directory locked until ``P.index`` references it. The pipeline runs the protocol; this module holds its pure
parts (the assignment, the names, the save identifier, the checks on a section, the merge) and the
polling loop, so the pipeline stays one executor.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import json
import re
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from asyncckpt.errors import CorruptCheckpointError
from asyncckpt.format import (
    MAX_DATA_DIRS,
    Extent,
    Manifest,
    Section,
    TensorRecord,
    data_dir_name,
    parse_data_dir_name,
)

__all__ = [
    "MultiWorker",
    "assign",
    "section_name",
    "parse_section_name",
    "claim_name",
    "parse_claim_name",
    "save_id",
    "check_section",
    "merge",
    "poll",
]


@dataclass(frozen=True)
class MultiWorker:
    """This process's place in a multi-worker save: worker ``index`` of ``count``.

    Every worker runs the same program (same objects, same values, same saves) and saves to the
    same path on a filesystem all of them see. Worker 0 is the chief: it writes the object graph,
    merges the sections and commits the checkpoint, and only its ``checkpoint`` state file and
    deletions of old checkpoints happen. ``count == 1`` is an ordinary single-writer save.

    Parameters
    ----------
    index:
        This worker's number, ``0 <= index < count``.
    count:
        How many workers save together (at least 1).
    timeout_seconds:
        How long the chief waits for the other workers' sections, and a non-chief for the chief's
        commit, before the save fails with :class:`~asyncckpt.errors.CheckpointTimeoutError`.
    """

    index: int
    count: int
    timeout_seconds: float = 600.0

    def __post_init__(self) -> None:
        if type(self.count) is not int or not 1 <= self.count <= MAX_DATA_DIRS:
            raise ValueError(f"MultiWorker.count must be an int in [1, {MAX_DATA_DIRS}], got {self.count!r}")
        if type(self.index) is not int or not 0 <= self.index < self.count:
            raise ValueError(
                f"MultiWorker.index must be an int with 0 <= index < count ({self.count}), got {self.index!r}"
            )
        timeout = self.timeout_seconds
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"MultiWorker.timeout_seconds must be a positive finite number, got {timeout!r}")

    @property
    def is_chief(self) -> bool:
        """Whether this worker merges and commits (worker 0)."""
        return self.index == 0


def assign(sizes: Iterable[tuple[str, int]], count: int) -> dict[str, int]:
    """Which worker writes each key: balanced by bytes, the same on every worker.

    Keys are taken largest first (ties by key) and each goes to the worker with the fewest bytes
    so far (ties by worker number): the greedy longest-processing-time rule, within 4/3 of the best
    possible balance. Depends only on the keys and sizes, which every worker has.
    """
    loads = [(0, worker) for worker in range(count)]
    owners: dict[str, int] = {}
    for key, nbytes in sorted(sizes, key=lambda item: (-item[1], item[0])):
        load, worker = heapq.heappop(loads)
        owners[key] = worker
        heapq.heappush(loads, (load + nbytes, worker))
    return owners


_NONCE = r"[0-9a-f]{16}"
_SECTION_RE = re.compile(
    rf"^(?P<stem>.+)\.index\.section-(?P<worker>[0-9]{{5,}})-of-(?P<count>[0-9]{{5,}})-(?P<nonce>{_NONCE})$", re.DOTALL
)
_CLAIM_RE = re.compile(rf"^(?P<stem>.+)\.index\.claim-(?P<chief>{_NONCE})-(?P<worker>{_NONCE})$", re.DOTALL)


def section_name(stem: str, worker: int, count: int, nonce: str) -> str:
    """Basename of the section worker ``worker`` publishes for data directory ``stem.data-<nonce>``.

    ``<stem>.index.section-i-of-n-<nonce>``: the writer's nonce makes the name its own, so no two
    writers ever publish under one name and cleanup can tell whose lock guards which section.
    """
    return f"{stem}.index.section-{worker:05d}-of-{count:05d}-{nonce}"


def parse_section_name(name: str) -> tuple[str, int, int, str] | None:
    """``(stem, worker, count, nonce)`` if ``name`` is a section file name, else ``None``."""
    match = _SECTION_RE.match(name)
    return (match["stem"], int(match["worker"]), int(match["count"]), match["nonce"]) if match else None


def claim_name(stem: str, chief_nonce: str, worker_nonce: str) -> str:
    """Basename a chief renames an accepted section to: ``<stem>.index.claim-<chief>-<worker>``.

    While the chief holds the lock of ``stem.data-<chief_nonce>``, the claim keeps data directory
    ``stem.data-<worker_nonce>`` from cleanup, whatever happens to the worker that wrote it.
    """
    return f"{stem}.index.claim-{chief_nonce}-{worker_nonce}"


def parse_claim_name(name: str) -> tuple[str, str, str] | None:
    """``(stem, chief_nonce, worker_nonce)`` if ``name`` is a claim file name, else ``None``."""
    match = _CLAIM_RE.match(name)
    return (match["stem"], match["chief"], match["worker"]) if match else None


def save_id(stem: str, count: int, specs: Iterable[tuple[str, str, tuple[int, ...], int]], token: str = "") -> str:
    """The identifier every worker of one save computes alike, and a save of other things does not.

    Hashes the checkpoint name (which carries the save number for ``save``), the number of workers,
    every key with its dtype, shape and size, in order, and ``token``: what ``P.index`` held when
    the save began (every worker reads it after its previous write to the path has ended), so
    two writes of the same program to one path do not share an identifier.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps([stem, count, token]).encode("utf-8", "surrogatepass"))
    for key, dtype, shape, nbytes in specs:
        digest.update(json.dumps([key, dtype, list(shape), nbytes]).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def check_section(
    section: Section,
    *,
    source: str,
    worker: int,
    stem: str,
    expected: Mapping[str, TensorRecord],
    nonce: str | None = None,
    taken: Collection[str] = (),
) -> None:
    """Refuse a section that does not hold exactly worker ``worker``'s share of this save.

    ``expected`` maps each key assigned to ``worker`` to a record of its dtype, shape and size
    (its extents and CRC are the section's to give). The section's ``save_id`` and ``count`` are
    checked by the caller (a mismatch there means an earlier save's leftover, not damage).
    ``nonce`` is the one in the section's file name: the section must name that data directory.
    ``taken`` are data directories the merged manifest already names (the chief's own, those of
    the checkpoint being replaced, other accepted sections): a section may not name one of them.

    Raises
    ------
    CorruptCheckpointError
        Naming ``source`` and what is wrong.
    """
    problem = None
    if section.worker != worker:
        problem = f"it says it is worker {section.worker}'s, not worker {worker}'s"
    elif parse_data_dir_name(section.data_dir) is None or parse_data_dir_name(section.data_dir)[0] != stem:
        problem = f"its data_dir {section.data_dir!r} is not a data directory of checkpoint {stem!r}"
    elif nonce is not None and section.data_dir != data_dir_name(stem, nonce):
        problem = f"its data_dir {section.data_dir!r} is not the one its file name gives ({data_dir_name(stem, nonce)!r})"
    elif section.data_dir in taken:
        problem = f"its data_dir {section.data_dir!r} is already named by the checkpoint (another worker's or the old one)"
    else:
        missing = expected.keys() - section.tensors.keys()
        extra = section.tensors.keys() - expected.keys()
        if missing or extra:
            problem = (
                f"it does not hold exactly worker {worker}'s tensors (missing {sorted(missing)[:5]}, "
                f"not assigned to it {sorted(extra)[:5]})"
            )
        else:
            for key, record in section.tensors.items():
                want = expected[key]
                if (record.dtype, record.shape, record.nbytes) != (want.dtype, want.shape, want.nbytes):
                    problem = (
                        f"key {key!r} is {record.dtype}{list(record.shape)}, but this save has it as "
                        f"{want.dtype}{list(want.shape)}"
                    )
                    break
    if problem is not None:
        raise CorruptCheckpointError(f"refusing checkpoint section {source}: {problem}")


def merge(own: Manifest, sections: Iterable[Section], order: Iterable[str]) -> Manifest:
    """One manifest from the chief's own part and the other workers' sections.

    The chief's data directory is ``data_dir`` (directory 0); section ``k`` (in the order given)
    becomes directory ``k + 1`` and its extents point there. Tensors follow ``order`` (the save's
    key order), so the merged manifest lists them as a single writer would.
    """
    data_dirs = [own.data_dir]
    records: dict[str, TensorRecord] = dict(own.tensors)
    for section in sections:
        directory = len(data_dirs)
        data_dirs.append(section.data_dir)
        for key, record in section.tensors.items():
            extents = tuple(Extent(e.file, e.offset, e.length, e.crc32c, directory) for e in record.extents)
            records[key] = TensorRecord(record.dtype, record.shape, record.nbytes, record.crc32c, extents)
    tensors = {key: records[key] for key in order}
    return Manifest(own.data_dir, own.object_graph, tensors, tuple(data_dirs))


async def poll(
    check: Callable[[], Awaitable[Any]],
    timeout_seconds: float,
    *,
    first_delay: float = 0.005,
    most_delay: float = 0.5,
) -> Any:
    """Call ``check`` until it returns something other than ``None``; ``None`` after the timeout.

    The delay between calls grows by half each time, from ``first_delay`` to ``most_delay``: a
    shared filesystem is asked often at first and rarely while a slow worker is still writing.
    ``check`` is called once more after the deadline, so a result that arrived meanwhile counts.
    """
    deadline = time.monotonic() + timeout_seconds
    delay = first_delay
    while True:
        found = await check()
        if found is not None:
            return found
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 1.5, most_delay)
