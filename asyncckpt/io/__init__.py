"""The I/O side: what the object model hands over to be written, and how checkpoints are read back.

It never sees trackables: a save arrives as ``(key, source)`` entries and a JSON object graph, a
restore leaves as values by key. Data flows one way through its modules::

    save:     sources -> snapshot -> plan -> write -> storage -> commit (P.index)
    restore:  commit (P.index) -> read (plan_read, read_device) -> values

``settings`` holds the knobs, ``pending`` the writes in flight, ``coordination`` the protocol of
several workers saving one checkpoint, ``storage`` the backends. The names below are the
contract the object model uses (docs/architecture.md).
"""

from asyncckpt.format import TensorSpec
from asyncckpt.io.commit import checkpoint_exists, delete_checkpoint
from asyncckpt.io.settings import MultiWorker
from asyncckpt.io.pending import WriteHandle, await_pending_writes, has_pending_writes, wait_for_pending_writes
from asyncckpt.io.read import CheckpointReader, VerifyReport, aopen_reader, open_reader
from asyncckpt.io.settings import ReadSettings, ReadStats, WriteMetrics, WriteSettings, WriteStats
from asyncckpt.io.sources import SaveEntry
from asyncckpt.io.storage import storage_for_path
from asyncckpt.io.write import PreparedWrite, prepare_write, start_write

__all__ = [
    "CheckpointReader",
    "MultiWorker",
    "PreparedWrite",
    "ReadSettings",
    "ReadStats",
    "SaveEntry",
    "TensorSpec",
    "VerifyReport",
    "WriteHandle",
    "WriteMetrics",
    "WriteSettings",
    "WriteStats",
    "aopen_reader",
    "await_pending_writes",
    "checkpoint_exists",
    "delete_checkpoint",
    "has_pending_writes",
    "open_reader",
    "prepare_write",
    "start_write",
    "storage_for_path",
    "wait_for_pending_writes",
]
