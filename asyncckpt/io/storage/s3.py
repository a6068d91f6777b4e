"""Checkpoints on S3-compatible object storage: :class:`S3Storage`, for ``s3://bucket/key`` paths.

Built on TensorStore's ``s3`` kvstore driver (:class:`~asyncckpt.io.storage.kvstore.KvStoreStorage`).
An object store has no rename and no lock, so three things differ from files:

* **the commit is a conditional write** of ``P.index``: a write remembers what ``P.index`` was
  when it began (its ETag, or that there was none) and commits only if that is still so
  (``If-Match`` / ``If-None-Match``). Of writers racing to one path exactly one commits; the
  others get a :class:`~asyncckpt.io.storage.CommitConflictError` and their data is deleted.
  The first open of a bucket checks that the endpoint honours conditional writes and refuses
  to work otherwise (``conditional_commit=False`` accepts that the last writer wins);
* **lock markers are leases**: a data directory's marker records until when its writer holds it
  (``lease_seconds``, by the writer's clock); another process takes it over, and cleans up what a
  crashed writer left, only after that. A save must finish within its lease;
* the endpoint and region come from the usual AWS variables (``AWS_ENDPOINT_URL_S3`` or
  ``AWS_ENDPOINT_URL``, ``AWS_REGION`` or ``AWS_DEFAULT_REGION``) unless given, credentials as
  the AWS SDK finds them.
"""

from __future__ import annotations

import os
import posixpath
import secrets
import threading
from typing import Any

from asyncckpt.io.storage.base import Backend, StorageError
from asyncckpt.io.storage.kvstore import KvStoreStorage

__all__ = ["S3_SCHEME", "S3Storage", "S3Storages", "is_s3_url", "parse_s3_url"]

S3_SCHEME = "s3://"
#: How long a writer holds a data directory's lease unless told otherwise: longer than any save.
DEFAULT_LEASE_SECONDS = 3600.0


def is_s3_url(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(S3_SCHEME)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``; ``ValueError`` for anything else."""
    if not is_s3_url(url):
        raise ValueError(f"{url!r} is not an s3:// URL")
    bucket, _, key = url[len(S3_SCHEME):].partition("/")
    if not bucket or "\0" in url:
        raise ValueError(f"{url!r} names no bucket (expected s3://bucket/key)")
    return bucket, key


class S3Storage(KvStoreStorage):
    """Checkpoints in one S3 bucket (or an S3-compatible server), at ``s3://bucket/...`` paths.

    Parameters
    ----------
    bucket:
        The bucket; paths may be given as ``s3://bucket/key`` or as keys.
    prefix:
        A key prefix every path is below (none by default).
    endpoint, region:
        The endpoint URL (e.g. ``http://127.0.0.1:9000`` for a local server) and region; by default
        from the AWS environment variables.
    lease_seconds:
        How long a writer's data-directory marker keeps other processes' cleanup away.
    conditional_commit:
        Commit by conditional writes (the default), checked once per bucket; ``False`` for a
        server without them: the last of racing writers then wins.
    """

    durable = True
    hierarchical = False
    locks_across_processes = True

    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None, region: str | None = None,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS, conditional_commit: bool = True,
                 context: Any = None) -> None:
        if not isinstance(bucket, str) or not bucket or "/" in bucket:
            raise ValueError(f"bucket must be a bucket name, got {bucket!r}")
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds!r}")
        spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": prefix.strip("/")}
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if endpoint:
            spec["endpoint"] = endpoint
        if region:
            spec["aws_region"] = region
        super().__init__(spec, context=context, clean_debris=True)
        self.bucket = bucket
        self.lease_seconds = float(lease_seconds)
        self.conditional_commit = bool(conditional_commit)
        self._probed = False
        self._probe_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Storage({self.bucket!r}, endpoint={self._spec.get('endpoint')!r})"

    def _key(self, path: Any) -> str:
        path = os.fspath(path)
        if isinstance(path, str) and path.startswith("s3:/") and not is_s3_url(path):
            path = S3_SCHEME + path[len("s3:/"):]  # a URL through pathlib, which folds "//"
        if is_s3_url(path):
            bucket, key = parse_s3_url(path)
            if bucket != self.bucket:
                raise ValueError(f"{path!r} is in bucket {bucket!r}, not in this storage's {self.bucket!r}")
            return key
        return path

    def split(self, path: str) -> tuple[str, str]:
        """``(s3://bucket/folder, stem)``: folders are spelled as URLs, as :meth:`canonical` spells paths."""
        folder, stem = super().split(self._key(path))
        return f"{S3_SCHEME}{self.bucket}/{folder}".rstrip("/"), stem

    def canonical(self, path: str) -> str:
        return f"{S3_SCHEME}{self.bucket}/{posixpath.normpath(self._key(path)).lstrip('/')}"

    def _describe(self, path: str) -> str:
        return f"{S3_SCHEME}{self.bucket}/{path}"

    def _backend_options(self) -> dict[str, Any]:
        return {"conditional": self.conditional_commit, "lease_seconds": self.lease_seconds}

    async def open(self, folder: str) -> Backend:
        backend = await super().open(self._key(folder))
        if self.conditional_commit and not self._probed:
            await self._probe(backend)
        return backend

    async def _probe(self, backend: Any) -> None:
        """Check once that a second conditional create of one key is refused, as it must be."""
        name = f".asyncckpt-conditional-write-probe-{secrets.token_hex(8)}"
        try:
            created = await backend.create_new(name, b"probe")
            again = await backend.create_new(name, b"probe") if created else True
        finally:
            await backend.delete(name)
        if not created or again:
            raise StorageError(
                f"{S3_SCHEME}{self.bucket} does not honour conditional writes (If-None-Match): a commit could "
                "not be atomic against other writers; use S3Storage(..., conditional_commit=False) to accept "
                "that the last of racing writers wins"
            )
        with self._probe_lock:
            self._probed = True


class S3Storages:
    """The process's :class:`S3Storage` per bucket, for ``s3://`` paths given without a storage.

    One per bucket (and endpoint) for the life of the process, so each bucket is probed once.
    """

    def __init__(self) -> None:
        self._storages: dict[tuple[str, str | None], S3Storage] = {}
        self._lock = threading.Lock()

    def for_url(self, url: str) -> S3Storage:
        bucket, _ = parse_s3_url(url)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        with self._lock:
            storage = self._storages.get((bucket, endpoint))
            if storage is None:
                storage = self._storages[(bucket, endpoint)] = S3Storage(bucket, endpoint=endpoint)
            return storage
