"""Files asyncckpt did not write: recognised, reported, and never replaced or deleted.

TensorFlow names its checkpoint index ``P.index`` and keeps the same ``checkpoint`` state file, so
a TensorFlow checkpoint directory looks like ours by name. Reading one reads it as TensorFlow wrote it
(a damaged one is corrupt, naming its index); a save refuses to commit over an index that is not ours
and removes its own new data; deletion and retention leave such an index (and everything beside
it) with a WARNING; a ``CheckpointManager`` refuses a directory whose state file lists TensorFlow
checkpoints. Each test compares every byte of the directory before and after.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import cli
from asyncckpt import io as ckio
from asyncckpt.errors import UnsupportedFormatError

from _fakes import files_in, tensorflow_index_bytes, write_tensorflow_checkpoints


def _checkpoint() -> ac.Checkpoint:
    return ac.Checkpoint(v=ac.Variable(np.arange(4, dtype=np.float32)))


def test_a_tensorflow_checkpoint_beside_ours_is_read_as_tensorflow_wrote_it(tmp_path, capsys):
    write_tensorflow_checkpoints(tmp_path)
    prefix = str(tmp_path / "ckpt-1")
    reader = ckio.open_reader(prefix)
    assert type(reader).__name__ == "TensorFlowReader" and not reader.name_based
    assert ("step/.ATTRIBUTES/VARIABLE_VALUE", []) in ac.list_variables(prefix)
    step = ac.Variable(np.int64(0))
    ac.Checkpoint(step=step).restore(prefix).expect_partial()
    assert int(step.numpy()) == 7
    assert cli.main(["verify", prefix]) == 0
    capsys.readouterr()


def test_a_damaged_tensorflow_index_is_corrupt_naming_it(tmp_path, capsys):
    write_tensorflow_checkpoints(tmp_path)
    prefix = str(tmp_path / "ckpt-1")
    index = Path(f"{prefix}.index")
    data = bytearray(index.read_bytes())
    data[10] ^= 0x40  # inside the first data block
    index.write_bytes(bytes(data))
    readers = {
        "restore": lambda: _checkpoint().restore(prefix),
        "open_reader": lambda: ckio.open_reader(prefix),
        "list_variables": lambda: ac.list_variables(prefix),
    }
    for name, read in readers.items():
        with pytest.raises(ac.CorruptCheckpointError, match="corrupt TensorFlow checkpoint index") as raised:
            read()
        assert f"{prefix}.index" in str(raised.value) and "fails its checksum" in str(raised.value), name
    assert cli.main(["verify", prefix]) == 1
    assert "corrupt TensorFlow checkpoint index" in capsys.readouterr().err


@pytest.mark.parametrize("enable_async", [False, True], ids=["sync", "async"])
def test_a_save_never_replaces_a_tensorflow_index(tmp_path, enable_async):
    before = write_tensorflow_checkpoints(tmp_path)
    checkpoint = _checkpoint()
    options = ac.CheckpointOptions(enable_async=enable_async)
    with pytest.raises(UnsupportedFormatError, match="TensorFlow checkpoint") as raised:
        checkpoint.save(str(tmp_path / "ckpt"), options=options)  # ckpt-1, TensorFlow's
        checkpoint.sync()
    assert str(tmp_path / "ckpt-1.index") in str(raised.value)
    assert "never replaces files it did not write" in str(raised.value)
    assert files_in(tmp_path) == before  # no new data directory, no temporary, the state file untouched


@pytest.mark.parametrize("content", [b"my notes\n", b'{"format": "something else"}', b"\x00\x01"],
                         ids=["text", "other-json", "binary"])
def test_a_save_never_replaces_an_index_it_did_not_write(tmp_path, content):
    index = tmp_path / "ckpt.index"
    index.write_bytes(content)
    with pytest.raises(UnsupportedFormatError, match="not a manifest asyncckpt wrote"):
        _checkpoint().write(str(tmp_path / "ckpt"))
    assert files_in(tmp_path) == {"ckpt.index": content}


@pytest.mark.parametrize("content", [b"", b"\x00" * 4096], ids=["empty", "zero-filled"])
def test_a_save_replaces_an_index_that_holds_nothing(tmp_path, content):
    """What a crash can leave of an unsynced write holds nothing to lose: it is replaced."""
    (tmp_path / "ckpt.index").write_bytes(content)
    _checkpoint().write(str(tmp_path / "ckpt"))
    ckio.open_reader(str(tmp_path / "ckpt")).verify()


def test_a_save_replaces_its_own_damaged_manifest(tmp_path):
    prefix = str(tmp_path / "ckpt")
    _checkpoint().write(prefix)
    index = Path(f"{prefix}.index")
    index.write_bytes(index.read_bytes()[:40])  # truncated: still led by our checksum member
    _checkpoint().write(prefix)
    ckio.open_reader(prefix).verify()


def test_saving_beside_tensorflow_checkpoints_leaves_them(tmp_path):
    before = write_tensorflow_checkpoints(tmp_path)
    _checkpoint().write(str(tmp_path / "mine"))  # debris cleanup lists the folder: TensorFlow's files are no debris
    after = files_in(tmp_path)
    assert {name: data for name, data in after.items() if name in before} == before


def test_a_save_beside_tensorflow_checkpoints_leaves_their_state_file(tmp_path, caplog):
    before = write_tensorflow_checkpoints(tmp_path)
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        path = _checkpoint().save(str(tmp_path / "mine"))
    ckio.open_reader(path).verify()
    assert (tmp_path / "checkpoint").read_bytes() == before["checkpoint"]
    assert f"Not recording {path} in the state file" in caplog.text


def test_delete_checkpoint_leaves_a_tensorflow_checkpoint(tmp_path, caplog):
    before = write_tensorflow_checkpoints(tmp_path)
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        ckio.delete_checkpoint(str(tmp_path / "ckpt-2"))
    assert files_in(tmp_path) == before
    assert f"Not deleting {tmp_path / 'ckpt-2.index'}: it is a TensorFlow checkpoint" in caplog.text


def test_a_manager_refuses_a_tensorflow_checkpoint_directory(tmp_path):
    before = write_tensorflow_checkpoints(tmp_path)
    with pytest.raises(UnsupportedFormatError, match="holds TensorFlow checkpoints") as raised:
        ac.CheckpointManager(_checkpoint(), tmp_path, max_to_keep=1)
    assert "'" + str(tmp_path / "ckpt-1") + "'" in str(raised.value)
    assert files_in(tmp_path) == before


def test_retention_leaves_an_index_someone_else_wrote(tmp_path, caplog):
    """A managed checkpoint replaced by another program's files is left when it expires, with a WARNING."""
    manager = ac.CheckpointManager(_checkpoint(), tmp_path, max_to_keep=1)
    first = manager.save()
    for data_dir in tmp_path.glob("ckpt-1.data-*"):
        for file in data_dir.iterdir():
            file.unlink()
        data_dir.rmdir()
    Path(f"{first}.index").write_bytes(tensorflow_index_bytes())
    Path(f"{first}.data-00000-of-00001").write_bytes(b"tensorflow data")
    foreign = {name: data for name, data in files_in(tmp_path).items() if name.startswith("ckpt-1")}
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        second = manager.save()
    assert {name: data for name, data in files_in(tmp_path).items() if name.startswith("ckpt-1")} == foreign
    assert "it is a TensorFlow checkpoint" in caplog.text
    assert manager.checkpoints == [second]
    assert ac.get_checkpoint_state(tmp_path).all_model_checkpoint_paths == [second]
