"""Several workers saving one checkpoint: who writes what, section names, validation, waiting.

In data-parallel training every worker holds the same values. Rather than copy everything to one
worker, each of ``count`` workers writes about ``1/count`` of the bytes into its own data directory
``P.data-<nonce_i>/`` and publishes a *section* (``P.index.section-<i>-of-<n>-<nonce_i>``)
recording its tensors. Worker 0, the chief, writes its own share, waits for every other section of
the same save, validates them as untrusted input, *claims* each (renames it to
``P.index.claim-<chief nonce>-<nonce_i>``, which keeps its data directory from cleanup while the
chief holds its own lock), checks that every byte is there, merges them into one manifest naming
several data directories and commits ``P.index`` as a single writer would. Non-chief workers keep
their data directory locked until ``P.index`` references it. The whole protocol is here: the
assignment, the save identifier, the checks on a section, the merge, the polling loop and
:class:`TeamWrite`, which the write executor hands over to once this worker's own data is written.
File names are in :mod:`asyncckpt.naming`; the format in docs/format.md section 11.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from asyncckpt.errors import CheckpointError, CheckpointTimeoutError, CorruptCheckpointError
from asyncckpt.format import (
    Extent,
    Manifest,
    Section,
    TensorRecord,
    parse_manifest,
    parse_section,
)
from asyncckpt.naming import (
    claim_name,
    data_dir_name,
    index_name,
    index_tmp_name,
    lock_probe_name,
    lock_probe_result_name,
    parse_data_dir_name,
    parse_section_name,
    section_name,
)
from asyncckpt.io.commit import claimed, held, index_token, missing_bytes, read_index, referenced_data_dirs
from asyncckpt.io.settings import MultiWorker
from asyncckpt.shards import is_shard_item, parse_item_key
from asyncckpt.io.storage import Backend

__all__ = [
    "Team",
    "TeamWrite",
    "assign",
    "save_id",
    "check_section",
    "merge",
    "poll",
]


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
        held = {key for key in section.tensors if not is_shard_item(key)}  # shards: checked by their tiling
        missing = expected.keys() - held
        extra = held - expected.keys()
        if missing or extra:
            problem = (
                f"it does not hold exactly worker {worker}'s tensors (missing {sorted(missing)[:5]}, "
                f"not assigned to it {sorted(extra)[:5]})"
            )
        else:
            for key in held:
                record, want = section.tensors[key], expected[key]
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
    key order), so the merged manifest lists them as a single writer would; the shards of
    sharded values follow, worker by worker, and :meth:`Manifest.folded` then folds them.

    Raises ``ValueError`` when two workers wrote the same shard.
    """
    data_dirs = [own.data_dir]
    records: dict[str, TensorRecord] = dict(own.tensors)
    shards = {key: 0 for key in own.tensors if is_shard_item(key)}
    for section in sections:
        directory = len(data_dirs)
        data_dirs.append(section.data_dir)
        for key, record in section.tensors.items():
            if is_shard_item(key):
                if key in shards:
                    name, _, _, offset = parse_item_key(key)
                    raise ValueError(f"workers {shards[key]} and {section.worker} both wrote the shard of key "
                                     f"{name!r} at offset {list(offset)}: each shard must be written once")
                shards[key] = section.worker
            extents = tuple(Extent(e.file, e.offset, e.length, e.crc32c, directory) for e in record.extents)
            records[key] = TensorRecord(record.dtype, record.shape, record.nbytes, record.crc32c, extents)
    tensors = {key: records[key] for key in order}
    tensors.update((key, records[key]) for key in shards)
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


@dataclass(frozen=True)
class Team:
    """What one worker of a multi-worker save knows about the whole save."""

    worker: MultiWorker
    order: tuple[str, ...]  # every key, in the save's order
    owners: Mapping[str, int]  # key -> worker writing it
    specs: Mapping[str, TensorRecord]  # key -> dtype, shape and size (no extents)

    def share(self, worker: int) -> dict[str, TensorRecord]:
        return {key: self.specs[key] for key in self.order if self.owners[key] == worker}

    def spec_items(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        return [(key, self.specs[key].dtype, self.specs[key].shape, self.specs[key].nbytes) for key in self.order]


class TeamWrite:
    """One worker's part of one multi-worker write: the protocol around its own data.

    The write executor writes this worker's share like any write, then hands over here: a
    non-chief publishes its section and waits for the chief's commit (:meth:`publish_and_wait`);
    the chief claims, checks and merges every other section (:meth:`gather`) before it commits,
    and drops its claims once the commit is settled (:meth:`drop_claims`).
    """

    def __init__(self, team: Team, stem: str, path: str) -> None:
        self.team = team
        self.stem = stem
        self.path = path
        self.save_id = ""
        self.claims: list[str] = []  # sections this chief renamed to its own claim names
        self._probe_lock = None  # the chief's probe lock, if this worker got it (locks do not exclude)

    @property
    def is_chief(self) -> bool:
        return self.team.worker.is_chief

    async def start(self, backend: Backend) -> None:
        """Fix this save's identifier (after this process's previous write to the path ended)."""
        self.save_id = save_id(self.stem, self.team.worker.count, self.team.spec_items(),
                               await index_token(backend, self.stem))

    async def check_locks(self, backend: Backend) -> None:
        """Fail fast unless the folder's locks exclude across the workers (every save; a few small files).

        The protocol tells a live worker's section from a crashed one's by its data directory's
        lock. Where ``flock`` is local to each host (NFS ``nolock``, Lustre ``localflock``, FUSE
        mounts of object stores) a live worker's lock looks free to the chief: every save would
        wait out its timeout, and cleanup would take live directories for debris. So the chief
        holds a probe marker's lock and every other worker tries to take it; one that can reports
        so, and every worker's save fails with an error that says what to do instead.
        """
        if not self.team.worker.check_locks:
            return
        worker = self.team.worker
        probe = lock_probe_name(self.stem, self.save_id)
        if self.is_chief:
            free = await self._hold_probe(backend, probe)
        else:
            free = await self._test_probe(backend, probe)
        if free:
            raise CheckpointError(
                f"checkpoint {self.path} was not saved: a lock the chief holds in {backend.describe('')} did not "
                f"keep worker(s) {', '.join(map(str, free))} of {worker.count} out, so this filesystem's locks do not "
                "exclude across the workers (NFS mounted with nolock, Lustre localflock, a FUSE mount of an object "
                "store). Save through a coordinator instead: MultiWorker.of(TorchDistributedCoordinator()) or "
                "MultiWorker.of(JaxDistributedCoordinator())"
            )

    async def _hold_probe(self, backend: Backend, probe: str) -> list[int]:
        """The chief's side: hold ``probe`` until every other worker reported; the workers that got in."""
        count = self.team.worker.count
        lock = await backend.lock_new(probe)
        if lock is None:
            raise CheckpointError(f"could not create the lock probe {backend.describe(probe)}")
        results: dict[int, bool] = {}
        try:
            async def reported() -> bool | None:
                for worker in range(1, count):
                    for excluded in (True, False):
                        if worker not in results and await read_index(
                                backend, lock_probe_result_name(self.stem, self.save_id, worker, excluded)) is not None:
                            results[worker] = excluded
                # (all of them, even after one got in: the marker stays until every worker has tested it)
                return True if len(results) == count - 1 else None

            if await poll(reported, self.team.worker.timeout_seconds) is None:
                missing = [worker for worker in range(1, count) if worker not in results]
                raise CheckpointTimeoutError(
                    f"checkpoint {self.path} was not committed: after {self.team.worker.timeout_seconds:g} s worker(s) "
                    f"{', '.join(map(str, missing))} of {count} had not tested the folder's locks"
                )
        finally:
            for worker, excluded in results.items():
                with contextlib.suppress(Exception):
                    await backend.delete(lock_probe_result_name(self.stem, self.save_id, worker, excluded))
            with contextlib.suppress(Exception):
                await lock.release()
        return sorted(worker for worker, excluded in results.items() if not excluded)

    async def _test_probe(self, backend: Backend, probe: str) -> list[int]:
        """A non-chief's side: try the chief's probe lock and report; ``[this worker]`` if it got in."""
        worker = self.team.worker

        async def marked() -> bool | None:
            return True if probe in await backend.list_names() else None

        if await poll(marked, worker.timeout_seconds) is None:
            raise CheckpointTimeoutError(
                f"checkpoint {self.path} was not committed: after {worker.timeout_seconds:g} s the chief (worker 0) "
                f"had not started the lock probe {backend.describe(probe)}"
            )
        lock = await backend.try_lock(probe)
        excluded = lock is None
        result = lock_probe_result_name(self.stem, self.save_id, worker.index, excluded)
        await backend.commit(result, index_tmp_name(self.stem, secrets.token_hex(8)), b"")
        # (a lock that got in is kept until this save ends: releasing it would remove the chief's marker)
        self._probe_lock = lock
        return [] if excluded else [worker.index]

    async def release_probe(self) -> None:
        lock, self._probe_lock = self._probe_lock, None
        if lock is not None:
            with contextlib.suppress(Exception):
                await lock.release()

    async def drop_claims(self, backend: Backend) -> None:
        """Delete the claims: the commit (or its failure) settled them. Before unlocking."""
        for claim in self.claims:
            with contextlib.suppress(Exception):
                await backend.delete(claim)

    async def gather(self, backend: Backend, nonce: str, own: Manifest) -> Manifest:
        """The chief's part: claim every other worker's section of this save, check, merge, verify."""
        team = self.team
        count = team.worker.count
        found: dict[int, Section] = {}
        replaced = await referenced_data_dirs(backend, self.stem)

        async def look() -> bool | None:
            names = await backend.list_names()
            for name in sorted(names):
                parsed = parse_section_name(name)
                if parsed is None or parsed.stem != self.stem or parsed.count != count:
                    continue
                if not 0 < parsed.worker < count or parsed.worker in found:
                    continue
                section = await self._claim(backend, nonce, name, parsed, own, replaced, found)
                if section is not None:
                    found[parsed.worker] = section
            return True if len(found) == count - 1 else None

        if await poll(look, team.worker.timeout_seconds) is None:
            missing = [worker for worker in range(1, count) if worker not in found]
            names = ", ".join(
                f"worker {w} ({backend.describe(section_name(self.stem, w, count, '<nonce>'))})"
                for w in missing
            )
            raise CheckpointTimeoutError(
                f"checkpoint {self.path} was not committed: after {team.worker.timeout_seconds:g} s "
                f"the section(s) of {len(missing)} of {count - 1} other worker(s) had not been published: {names}"
            )
        try:
            merged = merge(own, [found[worker] for worker in range(1, count)], team.order).folded()
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {self.path} was not committed: {exc}") from None
        # What is about to be committed must read back, and every byte it names must be there.
        parse_manifest(merged.to_json(), source=backend.describe(index_name(self.stem)))
        problem = await missing_bytes(backend, merged.all_data_dirs, merged.tensors.values())
        if problem is not None:
            raise CorruptCheckpointError(f"checkpoint {self.path} was not committed: {problem}")
        return merged

    async def _claim(self, backend, nonce, name, parsed, own, replaced, found) -> Section | None:
        """Worker ``parsed.worker``'s section ``name``, checked and claimed; ``None`` to wait past it.

        A section of another save (another ``save_id``) or one whose writer no longer holds its
        data directory's lock is an earlier save's leftover: not merged, waited past. A section
        that passes is renamed to this chief's claim name (at most one renamer wins it: a worker
        withdrawing it, a cleaner deleting it, or this chief); only then are its bytes checked, and
        from then on cleanup leaves its data directory alone while this chief holds its lock.
        """
        team = self.team
        worker, count, section_nonce = parsed.worker, parsed.count, parsed.nonce
        data = await read_index(backend, name)
        if data is None:
            return None
        source = backend.describe(name)
        section = parse_section(data, source=source)
        if section.save_id != self.save_id or section.count != count:
            return None
        taken = {own.data_dir, *replaced, *(other.data_dir for other in found.values())}
        check_section(section, source=source, worker=worker, stem=self.stem,
                                   expected=team.share(worker), nonce=section_nonce, taken=taken)
        if backend.cleans_debris and not await held(backend, section.data_dir):
            return None
        await backend.check_data_dir(section.data_dir)
        claim = claim_name(self.stem, nonce, section_nonce)
        if not await backend.rename(name, claim):
            return None
        self.claims.append(claim)
        if await missing_bytes(backend, (section.data_dir,), section.tensors.values()) is not None:
            self.claims.remove(claim)
            await backend.delete(claim)  # its writer is gone and so are its bytes: wait for another
            return None
        return section

    async def publish_and_wait(self, backend: Backend, data_dir: str, nonce: str, own: Manifest) -> None:
        """A non-chief's part: publish the section, then wait until ``P.index`` references it."""
        team = self.team
        worker = team.worker
        name = section_name(self.stem, worker.index, worker.count, nonce)
        section = Section(worker.index, worker.count, self.save_id, data_dir, own.tensors)
        await backend.commit(name, index_tmp_name(self.stem, nonce), section.to_json())

        async def committed() -> bool | None:
            return True if data_dir in await referenced_data_dirs(backend, self.stem) else None

        async def settled() -> bool | None:  # committed, or no live chief holds a claim on it any more
            if await committed():
                return True
            return None if await claimed(backend, self.stem, nonce) else True

        done = await poll(committed, worker.timeout_seconds)
        if done is None:
            # Withdraw the section; if a chief claimed it first, that chief decides: wait for it.
            withdrawn = await backend.rename(name, index_tmp_name(self.stem, nonce))
            if withdrawn:
                with contextlib.suppress(Exception):
                    await backend.delete(index_tmp_name(self.stem, nonce))
            else:
                await poll(settled, worker.timeout_seconds)
        if done is None and await committed() is None:  # the chief may have committed just now
            raise CheckpointTimeoutError(
                f"checkpoint {self.path} was not committed: worker {worker.index} of {worker.count} "
                f"published its section, but after {worker.timeout_seconds:g} s the chief (worker 0) had "
                f"not committed {backend.describe(index_name(self.stem))} referencing {data_dir}"
            )
