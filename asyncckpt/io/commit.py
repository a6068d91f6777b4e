"""Publishing a checkpoint and living beside others: data-directory locks, the manifest commit, debris, exists/delete."""

from __future__ import annotations

import os
import contextlib
import hashlib
import json
import logging
import secrets
from typing import Any


from asyncckpt._runtime import Runtime, get_runtime
from asyncckpt.errors import CorruptCheckpointError, UnsupportedFormatError
from asyncckpt.format import (
    MAX_INDEX_BYTES,
    OWN_MANIFEST_HEAD_BYTES,
    Manifest,
    is_own_manifest,
    is_tensorflow_index,
    parse_manifest,
    read_data_dirs,
)
from asyncckpt.naming import (
    data_dir_name,
    index_name,
    index_tmp_name,
    lock_name,
    parse_claim_name,
    parse_data_dir_name,
    parse_index_tmp_name,
    parse_lock_name,
    parse_section_name,
)
from asyncckpt.io.storage import Backend, NotRegularFileError, Storage, storage_for_path


logger = logging.getLogger("asyncckpt")


async def create_data_dir(backend: Backend, stem: str):
    """Lock and create a fresh ``stem.data-<nonce>``; the lock exists before the directory does."""
    for _ in range(8):
        nonce = secrets.token_hex(8)
        lock = await backend.lock_new(lock_name(stem, nonce))
        if lock is None:
            continue  # a cleaner took the brand-new marker; try another name
        try:
            await backend.create_data_dir(data_dir_name(stem, nonce))
        except BaseException:
            await lock.release()
            raise
        return nonce, lock
    raise RuntimeError(f"could not lock a new data directory for {backend.describe(stem)}")


async def publish(backend: Backend, stem: str, nonce: str, manifest: Manifest, encoded: bytes | None = None) -> None:
    """Commit ``manifest`` as ``stem.index`` (atomically), then delete the data it replaced.

    The manifest is first written under this write's temporary name (``index_tmp_name``), then
    renamed over ``stem.index``: readers see the old checkpoint or the new one, never a mix. A
    data directory the old manifest named and the new one does not is deleted afterwards; failing
    to delete it leaves debris for a later write, never a failed save.

    ``encoded`` is ``manifest.to_json()`` when the caller has it already.
    An existing ``stem.index`` that asyncckpt did not write (a TensorFlow checkpoint, say) is
    never replaced: ``UnsupportedFormatError`` is raised before anything is committed.
    """
    await refuse_foreign_index(backend, index_name(stem))
    replaced = await referenced_data_dirs(backend, stem)
    await backend.commit(index_name(stem), index_tmp_name(stem, nonce), encoded or manifest.to_json())
    for old in replaced:
        if old in manifest.all_data_dirs:
            continue
        try:
            await delete_unreferenced(backend, (old,), index_name(stem), manifest.all_data_dirs)
        except OSError as exc:
            logger.warning("could not delete replaced data directory %s: %s", backend.describe(old), exc)


async def discard_uncommitted(backend: Backend | None, stem: str, data_dir: str | None) -> None:
    """Delete ``data_dir`` of a write that did not commit, unless ``stem.index`` names it after all.

    A commit can fail after its rename (the directory ``fsync``, say): then the index already
    names the new data, which must stay. Best effort: what is left is debris for a later write.
    """
    if backend is None or data_dir is None:
        return
    with contextlib.suppress(Exception):
        if data_dir not in await referenced_data_dirs(backend, stem):
            await backend.delete_tree(data_dir)


async def foreign_index(backend: Backend, name: str) -> str | None:
    """What the file ``name`` is when asyncckpt did not write it; ``None`` when it did, or there is none.

    The first bytes tell one of ours (``format.is_own_manifest``), so a huge or damaged manifest
    of ours is recognised without reading it. An empty or zero-filled file -- all a crash can
    leave of an unsynced write -- holds nothing to lose and counts as ours.
    """
    long_enough = await backend.holds(name, OWN_MANIFEST_HEAD_BYTES)
    if long_enough is None:
        return None
    head = await backend.read(name, 0, OWN_MANIFEST_HEAD_BYTES if long_enough else None)
    if head is None or is_own_manifest(head):
        return None
    try:
        data = await read_index(backend, name)
    except CorruptCheckpointError:
        return "a file larger than any manifest asyncckpt writes"
    if data is None or is_own_manifest(data) or not data.strip(b"\0"):
        return None
    if is_tensorflow_index(data):
        return "a TensorFlow checkpoint (a TensorBundle index)"
    return "not a manifest asyncckpt wrote"


async def refuse_foreign_index(backend: Backend, name: str) -> None:
    """Raise ``UnsupportedFormatError`` if ``name`` exists and asyncckpt did not write it."""
    what = await foreign_index(backend, name)
    if what is not None:
        raise UnsupportedFormatError(
            f"refusing to commit a checkpoint over {backend.describe(name)}: it is {what}, and asyncckpt "
            "never replaces files it did not write; save to another path, or move that file away"
        )


async def read_index(backend: Backend, name: str) -> bytes | None:
    """The manifest ``name``, or ``None`` if it does not exist.

    Raises ``CorruptCheckpointError`` for one larger than ``MAX_INDEX_BYTES``, before reading it,
    and for one that is not a regular file (a FIFO would block the read for ever).
    """
    try:
        if await backend.holds(name, MAX_INDEX_BYTES + 1):
            raise CorruptCheckpointError(
                f"the checkpoint index {backend.describe(name)} is larger than {MAX_INDEX_BYTES} bytes: "
                "not a manifest this library wrote; refusing to read it"
            )
        return await backend.read(name)
    except NotRegularFileError as exc:
        raise CorruptCheckpointError(
            f"the checkpoint index {exc.path} {exc.problem}; refusing to read it"
        ) from None


def named_after(data_dir: str, stem: str) -> bool:
    """Whether ``data_dir`` is ``<stem>.data-<nonce>``, a data directory checkpoint ``stem`` wrote.

    Every data directory is named after the checkpoint that wrote it, so this binds a manifest to
    its path: a manifest copied or renamed to another stem names directories of the old one.
    """
    parsed = parse_data_dir_name(data_dir)
    return parsed is not None and parsed[0] == stem


def check_bound(backend: Backend, stem: str, manifest: Manifest) -> None:
    """Raise ``CorruptCheckpointError`` unless ``manifest``, read at ``stem.index``, is its own.

    A copied or renamed ``P.index`` would otherwise restore another checkpoint's values under
    this path, and its deletion would delete that checkpoint's data.
    """
    foreign = next((name for name in manifest.all_data_dirs if not named_after(name, stem)), None)
    if foreign is None:
        return
    found_at = backend.describe(index_name(stem))
    owner = parse_data_dir_name(foreign)
    if owner is None:
        raise CorruptCheckpointError(
            f"corrupt checkpoint manifest {found_at}: it names data directory {foreign!r}, which is not "
            f"a data directory of checkpoint {stem!r} (those are named {stem}.data-<16 hex digits>); "
            "refusing to read it"
        )
    original = backend.describe(owner[0])
    raise CorruptCheckpointError(
        f"manifest of checkpoint {original} found at {found_at}: a checkpoint cannot be copied or "
        f"renamed by copying or renaming its files. Rename it back to {index_name(owner[0])} (if no "
        "checkpoint is there now), or, to keep the checkpoint under another path, restore it and write "
        "it there (Checkpoint.restore, then Checkpoint.write)"
    )


async def referenced_data_dirs(backend: Backend, stem: str) -> tuple[str, ...]:
    """The data directories of ``stem`` that ``stem.index`` names; () when none or unreadable.

    Directories named after another checkpoint (a copied manifest) are left out: they are not
    this checkpoint's to replace or delete.
    """
    try:
        data = await read_index(backend, index_name(stem))
    except CorruptCheckpointError:
        return ()  # an unreadable old index: its data directories are left alone
    names = () if data is None else (read_data_dirs(data) or ())
    return tuple(name for name in names if named_after(name, stem))


async def index_token(backend: Backend, stem: str) -> str:
    """What ``stem.index`` holds now, hashed: the part of a save's identifier that changes per write."""
    try:
        data = await read_index(backend, index_name(stem))
    except CorruptCheckpointError:
        return "oversized"
    return "absent" if data is None else hashlib.sha256(data).hexdigest()


async def missing_bytes(backend: Backend, data_dirs, records) -> str | None:
    """What of ``records``' extents (in ``data_dirs``) is not on storage; ``None`` when all is."""
    ends: dict[tuple[int, str], int] = {}
    for record in records:
        for extent in record.extents:
            key = (extent.dir, extent.file)
            ends[key] = max(ends.get(key, 0), extent.offset + extent.length)
    for (directory, file), end in sorted(ends.items()):
        location = f"{data_dirs[directory]}/{file}"
        if not await backend.holds(location, end):
            return f"{backend.describe(location)} does not hold the {end} bytes the manifest names"
    return None


async def claimed(backend: Backend, stem: str, nonce: str) -> bool:
    """Whether a chief still holding its lock has claimed the section of ``stem.data-<nonce>``."""
    for name in sorted(await backend.list_names()):
        parsed = parse_claim_name(name)
        if parsed is not None and parsed.stem == stem and parsed.worker_nonce == nonce:
            if await held(backend, data_dir_name(stem, parsed.chief_nonce)):
                return True
    return False


async def held(backend: Backend, data_dir: str) -> bool:
    """Whether a writer still holds the lock of ``data_dir`` (its write or section is live).

    Taking a free lock to find out removes its stale marker, as debris cleanup would.
    """
    parsed = parse_data_dir_name(data_dir)
    if parsed is None:
        return False
    marker = lock_name(*parsed)
    taken = await backend.try_lock(marker)
    if taken is not None:
        await taken.release()
        return False
    try:
        return await backend.holds(marker, 0) is not None
    except NotRegularFileError:
        return True  # something else planted at the marker's name: cannot judge, keep it


_UNREADABLE = object()


def manifest_references(backend: Backend, known: dict[str, Any] | None = None):
    """``async referenced_by(index)``: the data directories manifest ``index`` names, read once.

    ``None`` when it does not exist, ``_UNREADABLE`` when it cannot be read as a manifest (a
    FIFO, a damaged file, a TensorFlow index). ``known`` seeds what is known already.
    """
    references: dict[str, Any] = dict(known or {})

    async def referenced_by(index: str) -> Any:
        if index not in references:
            try:
                data = await read_index(backend, index)
            except (OSError, CorruptCheckpointError):
                data = b""
            references[index] = None if data is None else (read_data_dirs(data) or _UNREADABLE)
        return references[index]

    return referenced_by


async def clean_debris(backend: Backend, *, exclude: str | frozenset[str]) -> None:
    """Delete what crashed writes left in the folder; never fails the write that calls it.

    A data directory is debris when no writer holds its lock, no manifest in the folder names it
    and no live chief has claimed its section. Temporary manifests, sections and stale lock
    markers go with their data directory; claims go once their chief no longer holds its lock.
    ``exclude`` names the caller's own data directory (or directories) to leave alone.
    """
    excluded = frozenset((exclude,)) if isinstance(exclude, str) else exclude
    try:
        names = await backend.list_names()
        groups: dict[tuple[str, str], set[str]] = {}
        sections: dict[tuple[str, str], str] = {}
        claims = []
        for name in names:
            section = parse_section_name(name)
            if section is not None:
                key = (section.stem, section.nonce)
                groups.setdefault(key, set()).add("section")
                sections[key] = name
                continue
            claim = parse_claim_name(name)
            if claim is not None:
                claims.append((name, claim))
                continue
            for kind, parse in (("dir", parse_data_dir_name), ("lock", parse_lock_name), ("tmp", parse_index_tmp_name)):
                parsed = parse(name)
                if parsed is not None:
                    groups.setdefault(parsed, set()).add(kind)
                    break
        data_dirs_per_stem: dict[str, int] = {}
        for (stem, _), kinds in groups.items():
            if "dir" in kinds:
                data_dirs_per_stem[stem] = data_dirs_per_stem.get(stem, 0) + 1
        referenced_by = manifest_references(backend)

        for (stem, nonce), kinds in sorted(groups.items()):
            name = data_dir_name(stem, nonce)
            if name in excluded:
                continue
            own_index = index_name(stem)
            if kinds == {"dir"} and data_dirs_per_stem.get(stem) == 1 and own_index in names:
                continue  # the one finished data directory of a committed checkpoint
            if "lock" in kinds:
                lock = await backend.try_lock(lock_name(stem, nonce))
            elif "section" in kinds:  # a live writer always has a marker: make sure by creating it
                lock = await backend.lock_new(lock_name(stem, nonce))
            else:
                lock = _NO_LOCK
            if lock is None:
                continue  # still being written
            try:
                if "section" in kinds:
                    # Take the section away first: a chief that claims it later finds nothing; a
                    # chief that claimed it already has a claim the check below finds.
                    if await backend.rename(sections[(stem, nonce)], index_tmp_name(stem, nonce)):
                        kinds.add("tmp")
                        logger.info("removed the section of an unfinished multi-worker save: %s",
                                    backend.describe(sections[(stem, nonce)]))
                if "dir" in kinds:
                    if await is_referenced(name, own_index, names, referenced_by):
                        continue
                    if await claimed(backend, stem, nonce):  # listed after taking the lock
                        continue
                    await backend.delete_tree(name)
                if "tmp" in kinds:
                    await backend.delete(index_tmp_name(stem, nonce))
                logger.info("removed debris of an unfinished write: %s", backend.describe(name))
            finally:
                if lock is not _NO_LOCK:
                    await lock.release()

        for name, claim in sorted(claims):
            stem, chief = claim.stem, claim.chief_nonce
            if data_dir_name(stem, chief) not in excluded and not await held(backend, data_dir_name(stem, chief)):
                await backend.delete(name)
    except Exception as exc:  # cleanup is best effort: the write itself must not fail for it
        logger.warning("could not clean up after earlier unfinished writes: %s", exc)


_NO_LOCK = object()


async def is_referenced(name: str, own_index: str, names: set[str], referenced_by) -> bool:
    """Whether ``own_index`` (unreadable counts) or any other ``*.index`` in ``names`` names ``name``."""
    own = await referenced_by(own_index)
    if own is _UNREADABLE or (own is not None and name in own):
        return True
    # A manifest copied or renamed by hand names another checkpoint's data: look at every one.
    for other in sorted(names):
        if other.endswith(".index") and other != own_index:
            found = await referenced_by(other)
            if found is not None and found is not _UNREADABLE and name in found:
                return True
    return False


def checkpoint_exists(prefix, *, storage: Storage | None = None, runtime: Runtime | None = None) -> bool:
    """True when a committed asyncckpt checkpoint exists at ``prefix`` (its ``P.index`` parses)."""
    storage = storage or storage_for_path(os.fspath(prefix))
    try:
        folder, stem = storage.split(prefix)
    except ValueError:
        return False

    async def exists() -> bool:
        backend = await storage.open(folder)
        try:
            data = await read_index(backend, index_name(stem))
        except CorruptCheckpointError:
            return False
        if data is None:
            return False
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return False
        return isinstance(document, dict) and document.get("format") == "asyncckpt"

    return (runtime or get_runtime()).run(exists())


async def _left_as_foreign(backend: Backend, name: str) -> bool:
    """Whether ``name`` is a file asyncckpt did not write, which a deletion must leave (logged)."""
    try:
        what = await foreign_index(backend, name)
    except CorruptCheckpointError:
        return False  # not a regular file: the deletion judges it as before
    if what is not None:
        logger.warning("Not deleting %s: it is %s, and asyncckpt deletes only files it wrote.",
                       backend.describe(name), what)
    return what is not None


def delete_checkpoint(prefix, *, storage: Storage | None = None, runtime: Runtime | None = None) -> None:
    """Delete the checkpoint at ``prefix``: un-commit it (remove ``P.index``), then its data.

    Only data directories its own manifest names, checksum intact and named after ``prefix``,
    are deleted, and none that another ``*.index`` of the folder names: a manifest copied over
    ``P.index`` never takes another checkpoint's data with it. Whatever is left unreferenced is
    debris for the next write into the folder. A ``P.index`` asyncckpt did not write (a
    TensorFlow checkpoint, say) is left, with everything beside it, and a WARNING is logged.
    Missing pieces are not an error. Does not wait for pending writes to ``prefix``.
    """
    storage = storage or storage_for_path(os.fspath(prefix))
    folder, stem = storage.split(prefix)

    async def delete() -> None:
        backend = await storage.open(folder)
        if await _left_as_foreign(backend, index_name(stem)):
            return
        data_dirs = await own_data_dirs(backend, stem)
        await backend.delete(index_name(stem))
        await delete_unreferenced(backend, data_dirs, index_name(stem))

    (runtime or get_runtime()).run(delete())


async def own_data_dirs(backend: Backend, stem: str) -> tuple[str, ...]:
    """The data directories of ``stem`` that a validated ``stem.index`` names; () when none can be trusted.

    A manifest that fails validation names nothing (its data stays, as debris, for cleanup to
    judge); one of a newer format version still names its directories (read leniently).
    """
    try:
        data = await read_index(backend, index_name(stem))
    except CorruptCheckpointError:
        return ()
    if data is None:
        return ()
    source = backend.describe(index_name(stem))
    try:
        names = parse_manifest(data, source=source).all_data_dirs
    except UnsupportedFormatError:
        names = read_data_dirs(data) or ()
    except CorruptCheckpointError as exc:
        logger.warning("not deleting the data a damaged manifest names: %s", exc)
        return ()
    return tuple(name for name in names if named_after(name, stem))


async def delete_unreferenced(backend: Backend, data_dirs, own_index: str, own_names=None) -> None:
    """Delete each of ``data_dirs`` that no manifest of the folder names (``own_index`` included).

    ``own_names``: what ``own_index`` names, when the caller knows (it has just written it).
    """
    if not data_dirs:
        return
    names = await backend.list_names()
    known = None if own_names is None else {own_index: tuple(own_names)}
    referenced_by = manifest_references(backend, known)
    for data_dir in data_dirs:
        if await is_referenced(data_dir, own_index, names, referenced_by):
            logger.info("kept data directory %s: a manifest of the folder still names it", backend.describe(data_dir))
            continue
        await backend.delete_tree(data_dir)
