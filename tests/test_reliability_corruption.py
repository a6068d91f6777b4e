"""Corruption: every single-byte flip and every truncation of a small checkpoint is detected.

A small checkpoint (chunked and packed arrays, a scalar, Python state, an empty array) is written
once; then, for every byte of every data file and of the manifest, a copy with that byte flipped
and a copy truncated to that length are restored (``Checkpoint.restore``) and verified
(``CheckpointReader.verify`` and ``asyncckpt verify``). Each must fail with
``CorruptCheckpointError`` naming the damaged file -- and, for a data file, the key whose bytes
were hit -- never return values. The default tier damages a sample of the positions (the edges of
every key's bytes, the manifest's leading members and a stride); ``pytest -m slow`` every one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import cli
from asyncckpt import io as ckio
from asyncckpt.errors import CorruptCheckpointError
from asyncckpt.format import seal_manifest
from asyncckpt.naming import index_path

SETTINGS = ac.WriteSettings(chunk_bytes=64, pack_bytes=48, small_array_bytes=32, staging_budget_bytes=128)


class Text(ac.PythonState):
    def __init__(self, value: bytes = b"") -> None:
        self.value = value

    def serialize(self) -> bytes:
        return self.value

    def deserialize(self, string_value: bytes) -> None:
        self.value = string_value


def _objects(fill: bool) -> dict:
    def value(array):
        array = np.asarray(array)
        return array if fill else np.zeros_like(array)

    return {
        "big": ac.Variable(value(np.linspace(-1, 1, 40, dtype=np.float32))),  # 160 bytes: three chunk files
        "small": ac.Variable(value(np.array([3, -7, 11], np.int16))),
        "flags": ac.Variable(value(np.array([True, False, True]))),
        "scalar": ac.Variable(value(np.int64(-1234567890123))),
        "empty": ac.Variable(value(np.zeros((0, 3)))),
        "text": Text(b"python state \x00\xff" if fill else b""),
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """``(folder, manifest)`` of the small checkpoint ``folder/ckpt``, written once."""
    folder = tmp_path_factory.mktemp("pristine")
    ac.Checkpoint(**_objects(fill=True)).write(str(folder / "ckpt"), options=ac.CheckpointOptions(write_settings=SETTINGS))
    manifest = json.loads(Path(index_path(str(folder / "ckpt"))).read_bytes())
    return folder, manifest


@pytest.fixture
def damaged(pristine, tmp_path):
    """A fresh copy of the pristine checkpoint to damage: ``(prefix, data_dir, manifest)``."""
    folder, manifest = pristine
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    return str(copy / "ckpt"), copy / manifest["data_dir"], manifest


def _owners(manifest: dict) -> dict[str, dict[int, str]]:
    """For each data file, which key owns each of its bytes."""
    owners: dict[str, dict[int, str]] = {}
    for key, record in manifest["tensors"].items():
        for extent in record["extents"]:
            for position in range(extent["offset"], extent["offset"] + extent["length"]):
                owners.setdefault(extent["file"], {})[position] = key
    return owners


def _detections(prefix: str, capsys) -> list[str]:
    """The messages of restore, verify() and `asyncckpt verify`, each of which must fail."""
    messages = []
    with pytest.raises(CorruptCheckpointError) as raised:
        ac.Checkpoint(**_objects(fill=False)).restore(prefix)
    messages.append(str(raised.value))
    with pytest.raises(CorruptCheckpointError) as raised:
        ckio.open_reader(prefix).verify()
    messages.append(str(raised.value))
    capsys.readouterr()
    assert cli.main(["verify", prefix]) == 1
    captured = capsys.readouterr()
    assert "corrupt checkpoint" in captured.err and captured.out == ""
    messages.append(captured.err)
    return messages


def test_the_pristine_checkpoint_restores_and_verifies(damaged, capsys):
    prefix, data_dir, manifest = damaged
    objects = _objects(fill=False)
    ac.Checkpoint(**objects).read(prefix).assert_consumed()
    expected = _objects(fill=True)
    for name, obj in objects.items():
        if name == "text":
            assert obj.value == expected["text"].value
        else:
            assert obj.numpy().tobytes() == expected[name].numpy().tobytes()
    assert cli.main(["verify", prefix]) == 0
    files = sorted(os.listdir(data_dir))
    assert len(files) >= 4 and any(f.startswith("chunk-") for f in files) and any(f.startswith("pack-") for f in files)
    assert set(_owners(manifest)) == set(files)


def _key_edges(owners: dict[int, str]) -> list[int]:
    """The first and last byte of each key's run of bytes in a file: the default tier's sample."""
    return [p for p in sorted(owners) if owners.get(p - 1) != owners[p] or owners.get(p + 1) != owners[p]]


# The default tier damages a sample of each data file's bytes (the edges of every key's bytes); the slow
# tier every one.
SWEEP = pytest.mark.parametrize("every", [False, pytest.param(True, marks=pytest.mark.slow)],
                                ids=["sampled", "every-byte"])


@SWEEP
def test_every_flipped_data_byte_is_detected_naming_key_and_file(damaged, capsys, every):
    prefix, data_dir, manifest = damaged
    checked = 0
    for file, owners in sorted(_owners(manifest).items()):
        path = data_dir / file
        original = path.read_bytes()
        assert sorted(owners) == list(range(len(original))), f"{file} has bytes no key owns"
        for position in range(len(original)) if every else _key_edges(owners):
            damaged_bytes = bytearray(original)
            damaged_bytes[position] ^= 0xFF
            path.write_bytes(damaged_bytes)
            for message in _detections(prefix, capsys):
                assert file in message and repr(owners[position]) in message, (file, position, message)
            checked += 1
        path.write_bytes(original)
    owners_by_file = _owners(manifest).values()
    assert checked == sum(len(owners) if every else len(_key_edges(owners)) for owners in owners_by_file)


@SWEEP
def test_every_truncation_of_a_data_file_is_detected_naming_key_and_file(damaged, capsys, every):
    prefix, data_dir, manifest = damaged
    for file, owners in sorted(_owners(manifest).items()):
        path = data_dir / file
        original = path.read_bytes()
        for length in range(len(original)) if every else _key_edges(owners):
            path.write_bytes(original[:length])
            cut = {key for position, key in owners.items() if position >= length}
            for message in _detections(prefix, capsys):
                assert file in message and any(repr(key) in message for key in cut), (file, length, message)
        path.unlink()  # a missing file is the last truncation
        for message in _detections(prefix, capsys):
            assert file in message and "missing" in message
        path.write_bytes(original)


def _manifest_sample(length: int) -> list[int]:
    """The default tier's positions: the leading checksum and format members, the end, every 37th byte."""
    return sorted({*range(min(64, length)), *range(max(0, length - 16), length), *range(0, length, 37)})


def _check_every_manifest_byte(prefix: str, capsys, cli_stride: int, every: bool = True) -> int:
    """Flip and cut the manifest at every byte (or a sample): restore always, ``asyncckpt verify``
    every ``cli_stride``-th."""
    index = Path(index_path(prefix))
    original = index.read_bytes()
    detected = 0
    for position in range(len(original)) if every else _manifest_sample(len(original)):
        flipped = original[:position] + bytes([original[position] ^ 0xFF]) + original[position + 1 :]
        for damaged_bytes in (original[:position], flipped):
            index.write_bytes(damaged_bytes)
            with pytest.raises(CorruptCheckpointError) as raised:
                ac.Checkpoint(**_objects(fill=False)).restore(prefix)
            assert str(index) in str(raised.value)
            if position % cli_stride == 0:
                assert cli.main(["verify", prefix]) == 1
                assert str(index) in capsys.readouterr().err
            detected += 1
    index.write_bytes(original)
    assert cli.main(["verify", prefix]) == 0
    return detected


def test_every_flipped_or_truncated_manifest_byte_is_detected(damaged, capsys):
    """A sample of the manifest's bytes; the slow test below damages every byte."""
    prefix, _, _ = damaged
    size = os.path.getsize(index_path(prefix))
    detected = _check_every_manifest_byte(prefix, capsys, cli_stride=4, every=False)
    assert detected == 2 * len(_manifest_sample(size))


@pytest.mark.slow
def test_every_flipped_or_truncated_manifest_byte_is_detected_by_the_command_too(damaged, capsys):
    prefix, _, _ = damaged
    detected = _check_every_manifest_byte(prefix, capsys, cli_stride=1)
    with capsys.disabled():
        print(f"\ncorrupted manifests detected: {detected} (restore and `asyncckpt verify`)")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (("object_graph", "nodes", 0, "children", 0, "local_name"), "bigg"),  # a name nothing cross-checks
        (("tensors", "big/.ATTRIBUTES/VARIABLE_VALUE", "extents", 0, "crc32c"), 1),
        (("data_dir",), "ckpt.data-0000000000000000"),
    ],
    ids=["object-graph-name", "extent-crc", "data-dir"],
)
def test_an_edited_manifest_fails_its_own_checksum(damaged, field, value):
    """Edits that keep the JSON valid are caught by ``manifest_crc32c`` before anything else."""
    prefix, _, _ = damaged
    index = Path(index_path(prefix))
    document = json.loads(index.read_bytes())
    target = document
    for part in field[:-1]:
        target = target[part]
    target[field[-1]] = value
    body = json.dumps(document, separators=(",", ":")).encode()
    index.write_bytes(body)  # still led by the old manifest_crc32c member
    with pytest.raises(CorruptCheckpointError, match="fails its checksum"):
        ckio.open_reader(prefix)
    index.write_bytes(seal_manifest(document))  # resealed, the edit is accepted or rejected on its merits
    if field[0] == "object_graph":
        ckio.open_reader(prefix).verify()


def test_a_manifest_without_its_checksum_is_refused(damaged):
    prefix, _, _ = damaged
    index = Path(index_path(prefix))
    document = json.loads(index.read_bytes())
    del document["manifest_crc32c"]
    index.write_bytes(json.dumps(document).encode())
    with pytest.raises(CorruptCheckpointError, match="does not begin with its checksum member"):
        ckio.open_reader(prefix)
    document["manifest_crc32c"] = json.loads(seal_manifest(document))["manifest_crc32c"]
    index.write_bytes(json.dumps(document).encode())  # the right value, but not the leading member
    with pytest.raises(CorruptCheckpointError, match="does not begin with its checksum member"):
        ckio.open_reader(prefix)
