"""Read a checkpoint without a `Checkpoint` object: list, load and inspect saved values.

Mirrors ``tf.train.list_variables``, ``tf.train.load_variable``, ``tf.train.load_checkpoint``
and ``tf.train.Checkpoint``'s ``object_metadata``. Every function accepts a checkpoint prefix
or a directory (meaning the checkpoint its state file names as latest), and first waits for
this process's pending asynchronous writes to that path, so a save that returned is readable.
Every value read is checked against the checksum recorded when it was written.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from asyncckpt import _paths
from asyncckpt import format as _format
from asyncckpt import io as ckio
from asyncckpt.checkpoint_management import latest_checkpoint
from asyncckpt.errors import NotFoundError

__all__ = [
    "load_checkpoint",
    "load_variable",
    "list_variables",
    "object_metadata",
    "resolve_checkpoint_path",
]


def resolve_checkpoint_path(ckpt_dir_or_file: Any) -> str:
    """The checkpoint prefix meant by a prefix or a directory (its latest checkpoint).

    Waits first for this process's pending writes to the path.

    Raises
    ------
    asyncckpt.NotFoundError
        When a directory holds no existing latest checkpoint.
    """
    try:
        path = os.fspath(ckpt_dir_or_file)
    except TypeError:
        raise TypeError(
            f"expected a checkpoint path (str or os.PathLike), got {type(ckpt_dir_or_file).__name__}"
        ) from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    ckio.wait_for_pending_writes(path)
    if os.path.isdir(path) or (_paths.is_url(path) and not ckio.checkpoint_exists(path)):  # a folder
        latest = latest_checkpoint(path)
        if latest is None:
            raise NotFoundError(f"Couldn't find 'checkpoint' file or checkpoints in given directory {path}")
        return latest
    return path


def load_checkpoint(ckpt_dir_or_file) -> ckio.CheckpointReader:
    """Open a checkpoint for reading (``tf.train.load_checkpoint``).

    Parameters
    ----------
    ckpt_dir_or_file : str or os.PathLike
        A checkpoint prefix, or a directory whose latest checkpoint is meant.

    Returns
    -------
    asyncckpt.io.CheckpointReader

    Raises
    ------
    asyncckpt.NotFoundError
        When no committed checkpoint exists there.
    """
    path = resolve_checkpoint_path(ckpt_dir_or_file)
    return ckio.open_reader(path)


def load_variable(ckpt_dir_or_file, name: str) -> np.ndarray | bytes:
    """The saved value of one key (``tf.train.load_variable``); a trailing ``:0`` is ignored.

    Raises
    ------
    KeyError
        Naming the key and the checkpoint, when the key is not saved.
    asyncckpt.NotFoundError
        When no committed checkpoint exists at the path.
    """
    if isinstance(name, str) and name.endswith(":0"):
        name = name[:-2]
    return load_checkpoint(ckpt_dir_or_file).get_tensor(name)


def list_variables(ckpt_dir_or_file) -> list[tuple[str, list[int]]]:
    """``[(key, shape), ...]`` for every saved key, sorted bytewise by key.

    Includes ``_CHECKPOINTABLE_OBJECT_GRAPH`` (shape ``[]``), which therefore precedes keys that
    start with a lowercase letter but follows those starting with a digit or an uppercase letter.
    """
    shapes = load_checkpoint(ckpt_dir_or_file).get_variable_to_shape_map()
    return [(key, shapes[key]) for key in sorted(shapes, key=lambda k: k.encode("utf-8"))]


_REPEATED = frozenset({"nodes", "children", "attributes", "slot_variables"})


class ObjectGraph(dict):
    """A saved object graph: a dict (``graph["nodes"][0]["children"]``) that also reads like TensorFlow's
    ``TrackableObjectGraph`` proto (``graph.nodes[0].children[0].node_id``, ``.local_name``,
    ``.attributes[k].checkpoint_key``, ``.slot_variables[...]``), so code written against
    ``tf.train.load_checkpoint``'s object metadata runs unchanged."""

    def __getattr__(self, name: str):
        try:
            value = self[name]
        except KeyError:
            if name in _REPEATED:
                return []  # a repeated proto field left out is empty
            raise AttributeError(name) from None
        if isinstance(value, list):
            return [ObjectGraph(item) if isinstance(item, dict) else item for item in value]
        return ObjectGraph(value) if isinstance(value, dict) else value


def object_metadata(save_path) -> ObjectGraph:
    """The object graph saved in a checkpoint (ours or TensorFlow's), as a dict that reads like TF's proto.

    Raises
    ------
    ValueError
        When the checkpoint holds no object graph (it is not object-based).
    asyncckpt.NotFoundError
        When no committed checkpoint exists at the path.
    """
    path = resolve_checkpoint_path(save_path)
    reader = ckio.open_reader(path)
    graph = reader.object_graph
    if _format.OBJECT_GRAPH_KEY not in reader.keys() or not isinstance(graph, dict) or not graph.get("nodes"):
        raise ValueError(
            f'The specified checkpoint "{path}" does not appear to be object-based since it is missing '
            f'the key "{_format.OBJECT_GRAPH_KEY}": it holds no object graph (a name-based TensorFlow 1 '
            "checkpoint: Checkpoint.restore matches its values to variables by their names)."
        )
    return ObjectGraph(graph)
