"""Converting checkpoints to and from other formats: TensorFlow's TensorBundle, Hugging Face safetensors,
and torch ``.pt`` state dicts (read with ``weights_only=True``: nothing in them is unpickled but tensors
and plain containers).

:func:`to_tensorflow` writes any checkpoint asyncckpt reads (its own, sharded ones assembled, or a
TensorFlow one) as a TensorFlow checkpoint: ``P.data-00000-of-00001`` with every tensor's bytes,
then ``P.index`` -- the header, a ``BundleEntryProto`` per tensor (with TensorFlow's masked CRC-32C)
and the object graph as the ``TrackableObjectGraph`` proto -- written last, atomically, as the
commit. Keys, the object graph and the checkpoint layout already follow TensorFlow's, so
``tf.train.Checkpoint.restore`` (or ``tf.train.load_checkpoint``) reads the result. Values are
converted one at a time, so memory stays at the largest value.
"""

from __future__ import annotations

import contextlib
import os

import crc32c
import numpy as np

from asyncckpt import io as ckio
from asyncckpt import tensorflow_bundle as bundle
from asyncckpt.format import BYTES_DTYPE, OBJECT_GRAPH_KEY, encode_dtype
from asyncckpt.naming import readable_name
from asyncckpt.readers import load_checkpoint

__all__ = ["to_tensorflow", "to_safetensors", "from_safetensors", "to_torch", "from_torch", "from_file"]


def _tf_dtype(key: str, dtype) -> int:
    try:
        return bundle.TF_DTYPES[encode_dtype(dtype)]
    except KeyError:
        raise TypeError(f"key {key!r} is {encode_dtype(dtype)}, which TensorFlow checkpoints cannot hold") from None


def to_tensorflow(source, prefix) -> str:
    """Write the checkpoint at ``source`` (a prefix, or a directory: its latest) as a TensorFlow one at ``prefix``.

    Refuses (``FileExistsError``) to write where ``prefix.index`` or its data file already exist:
    nothing is overwritten. Returns ``prefix``.
    """
    reader = load_checkpoint(source)
    prefix = os.fspath(prefix)
    index, data_file = f"{prefix}.index", bundle.data_file_name(prefix, 0, 1)
    for path in (index, data_file):
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists; refusing to overwrite it with a converted checkpoint")
    folder = os.path.dirname(prefix) or "."
    os.makedirs(folder, exist_ok=True)
    items: list[tuple[bytes, bytes]] = [(b"", bundle.encode_header())]
    written = False
    try:
        with open(data_file, "xb") as out:
            written = True
            offset = 0
            graph = reader.own_object_graph()  # None for a name-based TensorFlow checkpoint
            keys = [key for key in reader.keys() if key != OBJECT_GRAPH_KEY]
            for key in keys:
                spec = reader.spec(key)
                value = reader.read(key)
                if spec.dtype == BYTES_DTYPE:
                    strings = list(value.reshape(-1)) if isinstance(value, np.ndarray) else [value]
                    raw, crc = bundle.encode_strings(strings)
                    entry = bundle.encode_entry(bundle.DT_STRING, tuple(spec.shape), offset, len(raw), crc)
                else:
                    raw = np.ascontiguousarray(value).reshape(-1).view(np.uint8).tobytes()
                    entry = bundle.encode_entry(_tf_dtype(key, spec.dtype), tuple(spec.shape), offset, len(raw),
                                                crc32c.crc32c(raw))
                out.write(raw)
                offset += len(raw)
                items.append((key.encode("utf-8"), entry))
            if graph is not None:
                raw, crc = bundle.encode_strings([bundle.encode_object_graph(graph)])
                out.write(raw)
                items.append((OBJECT_GRAPH_KEY.encode(), bundle.encode_entry(bundle.DT_STRING, (), offset, len(raw), crc)))
            out.flush()
            os.fsync(out.fileno())
        items.sort(key=lambda item: item[0])
        temporary = f"{index}.tmp-{os.getpid()}"
        with open(temporary, "xb") as out:
            out.write(bundle.build_table(items))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, index)  # the commit: TensorFlow's too
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except BaseException:
        if written and not os.path.exists(index):
            with contextlib.suppress(OSError):
                os.unlink(data_file)
        raise
    return prefix


def to_safetensors(source, path) -> str:
    """Write every array of the checkpoint at ``source`` into one ``.safetensors`` file at ``path``.

    Tensors are named by their object paths (``model/layer1.weight``, as ``asyncckpt ls`` shows
    them); byte strings, which safetensors cannot hold, are left out. Needs the ``safetensors``
    package. Refuses to overwrite ``path``.
    """
    from safetensors.numpy import save_file  # noqa: PLC0415 - an optional dependency

    path = os.fspath(path)
    if os.path.lexists(path):
        raise FileExistsError(f"{path} exists; refusing to overwrite it with a converted checkpoint")
    save_file({name: np.ascontiguousarray(value) for name, value in _arrays_of(source).items()}, path)
    return path


def _arrays_of(source) -> dict:
    """Every array of the checkpoint at ``source`` by object path (byte strings left out)."""
    reader = load_checkpoint(source)
    keys = [key for key in reader.keys() if key != OBJECT_GRAPH_KEY and reader.spec(key).dtype != BYTES_DTYPE]
    names = {key: readable_name(key) for key in keys}
    if len(set(names.values())) != len(names):
        raise ValueError("two keys of the checkpoint have the same object path")
    values = reader.read_many(keys)
    return {names[key]: values[key] for key in keys}


def to_torch(source, path) -> str:
    """Write the arrays of the checkpoint at ``source`` as a torch state dict (``torch.save``) at ``path``."""
    from asyncckpt.model.adapters import torch as torch_adapter  # noqa: PLC0415 - imports torch

    path = os.fspath(path)
    if os.path.lexists(path):
        raise FileExistsError(f"{path} exists; refusing to overwrite it with a converted checkpoint")
    torch_adapter.save_arrays(_arrays_of(source), path)
    return path


def from_torch(path, prefix, *, settings: ckio.WriteSettings | None = None) -> str:
    """Write the tensors of a torch state dict file (``.pt``) as an asyncckpt checkpoint at ``prefix``.

    The file is read with ``torch.load(weights_only=True)``, which builds tensors and plain
    containers only; nested dicts and lists are flattened into ``/``-separated names. Values that
    are not tensors (a step count as a number) are refused, naming them.
    """
    from asyncckpt.model.adapters import torch as torch_adapter  # noqa: PLC0415 - imports torch

    return _write_arrays(torch_adapter.load_arrays(os.fspath(path)), prefix, settings)


def from_file(path, prefix) -> str:
    """A ``.safetensors`` or torch ``.pt``/``.pth``/``.bin`` file as an asyncckpt checkpoint (by its suffix)."""
    name = os.fspath(path)
    if name.endswith(".safetensors"):
        return from_safetensors(name, prefix)
    if name.endswith((".pt", ".pth", ".bin")):
        return from_torch(name, prefix)
    raise ValueError(f"{name}: expected a .safetensors or a torch .pt/.pth/.bin file to convert to asyncckpt")


def _write_arrays(arrays: dict, prefix, settings: ckio.WriteSettings | None) -> str:
    entries = [ckio.SaveEntry(name, value) for name, value in sorted(arrays.items())]
    handle = ckio.start_write(prefix, entries, {"nodes": [{"children": [], "attributes": [], "slot_variables": []}]},
                              settings=settings)
    return handle.result()


def from_safetensors(path, prefix, *, settings: ckio.WriteSettings | None = None) -> str:
    """Write the arrays of the ``.safetensors`` file at ``path`` as an asyncckpt checkpoint at ``prefix``.

    Each tensor is stored under its own name (no object graph: read them by key with
    ``load_checkpoint``, or into a module with ``StateDict``-shaped code). The file is read
    through safetensors' own reader, which trusts nothing in it but the header it validates.
    """
    from safetensors.numpy import load_file  # noqa: PLC0415 - an optional dependency

    return _write_arrays(load_file(os.fspath(path)), prefix, settings)
