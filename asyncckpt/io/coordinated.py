"""A save of several ranks through a :class:`~asyncckpt.io.coordinator.Coordinator`.

Per save, every rank: writes its share of the values (the same balanced assignment as the file
protocol, :func:`~asyncckpt.io.coordination.assign`) into a data directory of its own, then sends
its section -- or its error -- to the chief in one *gather*. The chief checks every section as
untrusted input, merges them, checks every byte is there and commits ``P.index``; then it
*broadcasts* the outcome. Each rank enters both collectives exactly once whatever happened to
its own part, so no rank waits for one that gave up, and a failure on any rank fails every
rank's write with a :class:`~asyncckpt.errors.CoordinationError` naming it. A rank whose save
was not committed deletes its own data directory. No section files, claims, cross-host locks or
polling: the filesystem sees only data directories and the one atomic commit.

Debris of crashed saves is removed by the chief alone, after a commit, sparing every data
directory of the save (another rank's live directory never looks like debris to it).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import crc32c
import numpy as np

from asyncckpt.errors import CoordinationError
from asyncckpt.format import Manifest, Section, parse_manifest, parse_section
from asyncckpt.naming import index_name, parse_data_dir_name
from asyncckpt.io.commit import clean_debris, discard_uncommitted, missing_bytes, publish, referenced_data_dirs
from asyncckpt.io.coordination import Team, check_section, merge, save_id
from asyncckpt.io.sources import SaveEntry, Source, SourceKind, prepare_source
from asyncckpt.shards import ShardedValue, parse_item_key, shard_key
from asyncckpt.io.storage import Backend

__all__ = ["CoordinatedWrite", "ReplicaChecksums", "replica_checksums"]

#: How many differing keys an error names per rank.
SHOWN_KEYS = 5

#: How much of a rank's error message travels to the others.
MAX_ERROR_CHARS = 2000


def _error_payload(rank: int, error: BaseException) -> bytes:
    text = f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS]
    return json.dumps({"rank": rank, "error": text}).encode("utf-8", "surrogatepass")


def _section_payload(section: bytes, checksums: ReplicaChecksums | None) -> bytes:
    values, boxes = (checksums.values, checksums.boxes) if checksums is not None else (None, None)
    return json.dumps({"section": section.decode("utf-8", "surrogateescape"), "checksums": values,
                       "boxes": boxes}).encode()


def _unpack(payload: bytes) -> tuple[str | None, bytes, Any, Any]:
    """``(error, section, checksums, box checksums)`` of what a rank sent: its error, or its section envelope."""
    try:
        document = json.loads(payload)
        if "error" in document:
            return str(document["error"]), b"", None, None
        return None, document["section"].encode("utf-8", "surrogateescape"), document["checksums"], document["boxes"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "an unreadable report", b"", None, None


@dataclass(frozen=True)
class ReplicaChecksums:
    """What a rank holds, checksummed at ``save()`` for ``MultiWorker(check_replicas=True)``.

    ``values``: the CRC-32C of every replicated value, in the save's order (``None`` on a device).
    ``boxes``: the CRC-32C of every box of a sharded value this rank holds, written by it or not,
    by shard item key -- so the chief can tell replicas of one box that differ.
    """

    values: list[int | None]
    boxes: dict[str, int | None]


def _checksum(source: Source) -> int | None:
    if source.kind is SourceKind.BYTES:
        return crc32c.crc32c(source.value)
    if source.off_host:
        return None
    array = np.asarray(source.live_array())
    if array.dtype.hasobject:
        return crc32c.crc32c(json.dumps([str(item) for item in array.ravel()]).encode())
    return crc32c.crc32c(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def replica_checksums(sources: Sequence[Source], entries: Sequence[SaveEntry] = ()) -> ReplicaChecksums:
    """The checksums of every replicated value (``sources``) and of every box the ``entries``' sharded
    values hold, taken now: a pass over the whole state, each rank's share or not."""
    boxes: dict[str, int | None] = {}
    for entry in entries:
        value = entry.source
        if isinstance(value, ShardedValue):
            for shard in (*value.shards, *value.held):
                item = shard_key(entry.key, value.dtype, value.global_shape, shard.offset)
                boxes[item] = _checksum(prepare_source(item, shard.value))
    return ReplicaChecksums([_checksum(source) for source in sources], boxes)


class CoordinatedWrite:
    """One rank's part of one coordinated write (the write executor runs it instead of committing alone)."""

    def __init__(self, team: Team, stem: str, path: str, checksums: ReplicaChecksums | None = None) -> None:
        self.team = team
        self.checksums = checksums  # every value's CRC at save(), with check_replicas
        self.coordinator = team.worker.coordinator
        self.stem = stem
        self.path = path
        self.save_id = save_id(stem, team.worker.count, team.spec_items())

    @property
    def rank(self) -> int:
        return self.team.worker.index

    async def run(self, job: Any, previous: list) -> None:
        """Write this rank's share, take part in both collectives, raise unless committed."""
        part: dict[str, Any] = {}  # what write_own_part got as far as: backend, data_dir, lock, manifest
        try:
            await job.write_own_part(previous, part)
            section = Section(self.rank, self.team.worker.count, self.save_id, part["data_dir"],
                              part["manifest"].tensors).to_json()
            payload = _section_payload(section, self.checksums)
        except Exception as exc:  # noqa: BLE001 - reported to the chief, which fails the save everywhere
            payload = _error_payload(self.rank, exc)
        backend, data_dir, lock, own = (part.get(name) for name in ("backend", "data_dir", "lock", "manifest"))
        committed = False
        try:
            if self.coordinator.is_chief:
                try:
                    gathered = await self.coordinator.gather(payload)
                except Exception as exc:  # a rank never arrived: the others still hear the outcome
                    outcome = f"checkpoint {self.path} was not committed: {exc}".encode()
                    with contextlib.suppress(Exception):
                        await self.coordinator.abandon(outcome)
                    raise
                outcome = await self.coordinator.broadcast(await self._commit(backend, own, gathered))
            else:
                await self.coordinator.gather(payload)
                outcome = await self.coordinator.broadcast(None)
            committed = outcome == b"ok"
            if not committed:
                raise CoordinationError(outcome.decode("utf-8", "replace")[:4 * MAX_ERROR_CHARS])
        finally:
            if not committed:
                await discard_uncommitted(backend, self.stem, data_dir)
            if lock is not None:
                with contextlib.suppress(Exception):
                    await lock.release()

    async def _commit(self, backend: Backend | None, own: Manifest | None, gathered: list[bytes]) -> bytes:
        """The chief's part: b"ok" once ``P.index`` names every rank's data, else what went wrong."""
        count = self.team.worker.count
        reports = [_unpack(payload) for payload in gathered]
        failures = [(rank, report[0]) for rank, report in enumerate(reports) if report[0] is not None]
        if failures:
            described = "; ".join(f"rank {rank}: {error}" for rank, error in failures)
            return f"checkpoint {self.path} was not committed: {described}".encode()
        try:
            if self.checksums is not None:
                differing = self._differing_replicas([report[2] for report in reports], [report[3] for report in reports])
                if differing:
                    return (f"checkpoint {self.path} was not committed: ranks hold different values under the same "
                            f"key (check_replicas): {differing}").encode()
            sections = []
            taken = {own.data_dir, *await referenced_data_dirs(backend, self.stem)}
            for rank in range(1, count):
                source = f"rank {rank}'s section of {self.path}"
                section = parse_section(reports[rank][1], source=source)
                if section.save_id != self.save_id or section.count != count:
                    return (f"checkpoint {self.path} was not committed: rank {rank} saved other values than "
                            "rank 0 (other keys, dtypes or shapes, or another number of ranks): every rank "
                            "must save the same objects").encode()
                parsed = parse_data_dir_name(section.data_dir)
                check_section(section, source=source, worker=rank, stem=self.stem, expected=self.team.share(rank),
                              nonce=parsed[1] if parsed is not None else None, taken=taken)
                taken.add(section.data_dir)
                sections.append(section)
            merged = merge(own, sections, self.team.order).folded()
            parse_manifest(merged.to_json(), source=backend.describe(index_name(self.stem)))
            problem = await missing_bytes(backend, merged.all_data_dirs, merged.tensors.values())
            if problem is not None:
                return f"checkpoint {self.path} was not committed: {problem}".encode()
            nonce = parse_data_dir_name(own.data_dir)[1]
            await publish(backend, self.stem, nonce, merged)
        except Exception as exc:  # noqa: BLE001 - every rank hears of it
            return f"checkpoint {self.path} was not committed: rank 0: {type(exc).__name__}: {exc}".encode()
        if backend.cleans_debris:
            await clean_debris(backend, exclude=frozenset(merged.all_data_dirs))
        return b"ok"

    def _differing_replicas(self, every_rank: list[Any], every_rank_boxes: list[Any]) -> str:
        """Which ranks' checksums differ from the chief's (or, for a box, from its other holders'), and
        where ("" when all agree)."""
        problems = []
        order = self.team.order
        for rank, checksums in enumerate(every_rank):
            if type(checksums) is not list or len(checksums) != len(order):
                problems.append(f"rank {rank} sent {len(checksums) if type(checksums) is list else 'no'} checksums "
                                f"for {len(order)} values")
            elif rank:
                keys = [key for key, mine, theirs in zip(order, self.checksums.values, checksums)
                        if mine is not None and theirs is not None and mine != theirs]
                if keys:
                    problems.append(f"rank {rank} differs from rank 0 at {_some(keys)}")
        holders: dict[str, dict[int, int]] = {}  # a box -> its holders' checksums
        for rank, boxes in enumerate(every_rank_boxes):
            if isinstance(boxes, dict):
                for item, crc in boxes.items():
                    if type(crc) is int:
                        holders.setdefault(item, {})[rank] = crc
        differing = []
        for item, crcs in holders.items():
            if len(set(crcs.values())) > 1:
                key, _, _, offset = parse_item_key(item)
                differing.append(f"{key!r} at {list(offset)} (ranks {sorted(crcs)})")
        if differing:
            problems.append(f"the holders of a box differ: {_some(differing, quote=False)}")
        return "; ".join(problems)


def _some(names: list[str], *, quote: bool = True) -> str:
    shown = ", ".join(repr(name) if quote else name for name in names[:SHOWN_KEYS])
    return shown + (f" and {len(names) - SHOWN_KEYS} more" if len(names) > SHOWN_KEYS else "")
