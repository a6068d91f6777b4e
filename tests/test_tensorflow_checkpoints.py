"""TensorFlow checkpoints, read without TensorFlow: fixtures written by real TensorFlow 2.21.

``tests/fixtures/tensorflow/make_fixtures.py`` wrote them (and ``expected.json``, every value as
TensorFlow held it): a TF2 object-based ``tf.train.Checkpoint`` and a TF1 name-based
``tf.compat.v1.train.Saver`` checkpoint with a variable partitioned in three slices.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncckpt as ac
from asyncckpt import cli
from asyncckpt.name_based import NameBasedSaverStatus

FIXTURES = Path(__file__).with_name("fixtures") / "tensorflow"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
TF2 = str(FIXTURES / EXPECTED["tf2"]["path"])
TF1 = str(FIXTURES / EXPECTED["tf1"]["path"])
VALUES2, VALUES1 = EXPECTED["tf2"]["values"], EXPECTED["tf1"]["values"]


def _tf2_objects() -> tuple[ac.Module, ac.Variable]:
    """Objects shaped as the TF2 fixture's ``tf.Module`` (zeros until restored)."""
    model = ac.Module()
    model.dense = ac.Module()
    model.dense.kernel = ac.Variable(np.zeros((3, 4), np.float32))
    model.dense.bias = ac.Variable(np.zeros(4, np.float32))
    model.wide = ac.Variable(np.zeros(6))
    model.half = ac.Variable(np.zeros(3, np.float16))
    model.brain = ac.Variable(np.zeros(3, ml_dtypes.bfloat16))
    model.flags = ac.Variable(np.zeros(3, bool))
    model.counts = ac.Variable(np.zeros((2, 2), np.int64))
    model.layers = [ac.Variable(np.zeros(2, np.int32)) for _ in range(2)]
    return model, ac.Variable(np.int64(0))


def test_a_tf2_checkpoint_restores_by_object_graph_with_every_dtype():
    model, step = _tf2_objects()
    checkpoint = ac.Checkpoint(model=model, step=step)
    status = checkpoint.restore(TF2)
    assert int(step.numpy()) == VALUES2["step"] and int(checkpoint.save_counter.numpy()) == 1
    for name, variable in [("model/dense/kernel", model.dense.kernel), ("model/dense/bias", model.dense.bias),
                           ("model/wide", model.wide), ("model/flags", model.flags), ("model/counts", model.counts),
                           ("model/layers/0", model.layers[0]), ("model/layers/1", model.layers[1])]:
        np.testing.assert_array_equal(variable.numpy(), np.asarray(VALUES2[name], dtype=variable.dtype), err_msg=name)
    np.testing.assert_array_equal(model.half.numpy().astype(np.float32), VALUES2["model/half"])
    np.testing.assert_array_equal(model.brain.numpy().astype(np.float32), VALUES2["model/brain"])
    status.assert_existing_objects_matched()
    with pytest.raises(AssertionError, match=r"Unresolved object in checkpoint \(root\).model.name_var"):
        status.assert_consumed()  # the fixture's string variable has no object here


def test_a_tf2_checkpoint_reads_like_tensorflows_reader():
    reader = ac.load_checkpoint(TF2)
    assert reader.get_tensor("model/name_var/.ATTRIBUTES/VARIABLE_VALUE") == VALUES2["model/name_var"].encode()
    assert reader.get_variable_to_shape_map()["model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE"] == [3, 4]
    assert str(reader.get_variable_to_dtype_map()["model/brain/.ATTRIBUTES/VARIABLE_VALUE"]) == "bfloat16"
    graph = reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH")
    assert isinstance(graph, bytes) and graph.startswith(b"\n")  # TensorFlow's proto bytes, as TensorFlow gives them
    assert reader.verify().tensors == len(VALUES2) + 1  # and save_counter
    nodes = ac.object_metadata(TF2)["nodes"]
    assert [child["local_name"] for child in nodes[0]["children"]] == ["model", "step", "save_counter"]
    assert ("model/dense/bias/.ATTRIBUTES/VARIABLE_VALUE", [4]) in ac.list_variables(TF2)


def test_the_command_line_lists_and_verifies_a_tensorflow_checkpoint(capsys):
    assert cli.main(["ls", TF2]) == 0
    listed = capsys.readouterr().out
    assert "model/dense/kernel" in listed and "[3, 4]" in listed
    assert cli.main(["verify", TF1]) == 0
    assert "OK" in capsys.readouterr().out


def test_a_tf1_checkpoint_restores_by_variable_names_with_its_partitioned_variable_reassembled():
    model = ac.Module()
    model.weights = ac.Variable(np.zeros((5, 4), np.float32), name="layer/weights")
    model.embedding = ac.Variable(np.zeros((7, 3), np.float32), name="embedding")
    model.step = ac.Variable(np.int64(0), name="global_step")
    status = ac.Checkpoint(model=model).restore(TF1)
    assert isinstance(status, NameBasedSaverStatus)
    status.assert_consumed().assert_nontrivial_match()  # the checkpoint's save_counter is optional
    np.testing.assert_array_equal(model.weights.numpy(), np.asarray(VALUES1["layer/weights"], np.float32))
    np.testing.assert_array_equal(model.embedding.numpy(), np.asarray(VALUES1["embedding"], np.float32))
    assert int(model.step.numpy()) == VALUES1["global_step"]


def test_a_tf1_status_names_the_variables_it_could_not_match():
    model = ac.Module()
    model.weights = ac.Variable(np.zeros((5, 4), np.float32), name="layer/weights")
    model.extra = ac.Variable(np.zeros(2), name="not/in/the/checkpoint")
    status = ac.Checkpoint(model=model).restore(TF1)
    with pytest.raises(AssertionError, match="not/in/the/checkpoint"):
        status.assert_consumed()
    status.expect_partial().assert_nontrivial_match()
    nothing = ac.Checkpoint(model=ac.Module()).restore(TF1)
    with pytest.raises(AssertionError, match="No variable's name matched"):
        nothing.assert_nontrivial_match()


def test_a_tf1_variable_of_another_shape_is_refused_before_anything_changes():
    model = ac.Module()
    model.weights = ac.Variable(np.ones((4, 5), np.float32), name="layer/weights")
    with pytest.raises(ValueError, match="incompatible tensor with shape"):
        ac.Checkpoint(model=model).restore(TF1)
    np.testing.assert_array_equal(model.weights.numpy(), np.ones((4, 5), np.float32))


def test_a_slice_of_a_partitioned_variable_reads_only_its_part():
    reader = ac.load_checkpoint(TF1)
    assert reader.name_based and "_CHECKPOINTABLE_OBJECT_GRAPH" not in reader.keys()
    part = reader.read_boxes("embedding", [ac.Box((2, 1), (3, 2))])[0]  # across the first two slices
    np.testing.assert_array_equal(part, np.asarray(VALUES1["embedding"], np.float32)[2:5, 1:3])
    with pytest.raises(ValueError, match="object graph"):
        ac.object_metadata(TF1)


def _copy(tmp_path: Path, prefix: str) -> Path:
    source = Path(prefix)
    for path in source.parent.glob(source.name + ".*"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path / source.name


def test_a_flipped_data_byte_of_a_tensorflow_checkpoint_is_caught(tmp_path):
    prefix = _copy(tmp_path, TF2)
    data = Path(f"{prefix}.data-00000-of-00001")
    content = bytearray(data.read_bytes())
    content[130] ^= 0x01  # inside model/dense/kernel (bytes 128..176)
    data.write_bytes(bytes(content))
    with pytest.raises(ac.CorruptCheckpointError, match="dense/kernel.*fails its checksum"):
        ac.load_checkpoint(str(prefix)).verify()
    model, step = _tf2_objects()
    with pytest.raises(ac.CorruptCheckpointError):
        ac.Checkpoint(model=model, step=step).restore(str(prefix))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_a_damaged_tensorflow_index_fails_as_corrupt_never_otherwise(tmp_path_factory, data):
    index = Path(f"{TF1}.index").read_bytes()
    position = data.draw(st.integers(0, len(index) - 1))
    damaged = bytearray(index)
    damaged[position] ^= data.draw(st.integers(1, 255))
    folder = tmp_path_factory.mktemp("damaged")
    prefix = _copy(folder, TF1)
    Path(f"{prefix}.index").write_bytes(bytes(damaged))
    try:
        reader = ac.load_checkpoint(str(prefix))
        reader.verify()
    except ac.CorruptCheckpointError:
        pass  # (UnsupportedFormatError is one too)


# ---------------------------------------------------------------------------------------------
# The way back: asyncckpt convert --to tf


def _saved(tmp_path: Path) -> tuple[str, dict]:
    model = ac.Module()
    model.kernel = ac.Variable(np.arange(12, dtype=np.float32).reshape(3, 4))
    model.empty = ac.Variable(np.zeros((0, 2)))
    model.brain = ac.Variable(np.array([1.5, -2.0], ml_dtypes.bfloat16))
    values = {"model/kernel": model.kernel.numpy(), "model/empty": model.empty.numpy(), "model/brain": model.brain.numpy()}
    path = ac.Checkpoint(model=model, step=ac.Variable(np.int64(9))).save(str(tmp_path / "ours" / "ckpt"))
    return path, values


def test_convert_to_tf_writes_a_checkpoint_that_reads_back_and_restores(tmp_path, capsys):
    path, values = _saved(tmp_path)
    target = str(tmp_path / "tf" / "ckpt-1")
    assert cli.main(["convert", path, target, "--to", "tf"]) == 0
    assert f"wrote TensorFlow checkpoint {target}" in capsys.readouterr().out
    reader = ac.load_checkpoint(target)
    assert type(reader).__name__ == "TensorFlowReader" and not reader.name_based
    for name, value in values.items():
        np.testing.assert_array_equal(reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE"), value)
    reader.verify()
    model = ac.Module()
    model.kernel = ac.Variable(np.zeros((3, 4), np.float32))
    model.empty = ac.Variable(np.ones((0, 2)))
    model.brain = ac.Variable(np.zeros(2, ml_dtypes.bfloat16))
    step = ac.Variable(np.int64(0))
    ac.Checkpoint(model=model, step=step).restore(target).assert_consumed()
    assert int(step.numpy()) == 9 and model.kernel.numpy()[2, 3] == 11
    assert cli.main(["convert", path, target, "--to", "tf"]) == 1  # never over an existing checkpoint
    assert "refusing to overwrite" in capsys.readouterr().err


def test_tensorflow_restores_what_convert_wrote(tmp_path):
    tf = pytest.importorskip("tensorflow", reason="needs TensorFlow (pip install .[tensorflow])")
    path, values = _saved(tmp_path)
    target = str(tmp_path / "tf" / "ckpt-1")
    assert cli.main(["convert", path, target, "--to", "tf"]) == 0
    module = tf.Module()
    module.kernel = tf.Variable(np.zeros((3, 4), np.float32))
    module.empty = tf.Variable(np.ones((0, 2)))
    module.brain = tf.Variable(tf.zeros(2, tf.bfloat16))
    step = tf.Variable(0, dtype=tf.int64)
    tf.train.Checkpoint(model=module, step=step).restore(target).assert_consumed()
    assert int(step.numpy()) == 9
    np.testing.assert_array_equal(module.kernel.numpy(), values["model/kernel"])
    np.testing.assert_array_equal(tf.cast(module.brain, tf.float32).numpy(), values["model/brain"].astype(np.float32))


def test_convert_to_safetensors_and_back(tmp_path, capsys):
    safetensors = pytest.importorskip("safetensors.numpy")
    path, values = _saved(tmp_path)
    target = str(tmp_path / "model.safetensors")
    assert cli.main(["convert", path, target, "--to", "safetensors"]) == 0
    loaded = safetensors.load_file(target)
    assert set(loaded) == {"model/kernel", "model/empty", "model/brain", "step", "save_counter"}
    np.testing.assert_array_equal(loaded["model/kernel"], values["model/kernel"])
    assert loaded["model/brain"].dtype == ml_dtypes.bfloat16
    back = str(tmp_path / "back" / "ckpt")
    assert cli.main(["convert", target, back, "--to", "asyncckpt"]) == 0
    np.testing.assert_array_equal(ac.load_variable(back, "model/kernel"), values["model/kernel"])
    assert cli.main(["convert", path, target, "--to", "safetensors"]) == 1  # never over an existing file
    assert "refusing to overwrite" in capsys.readouterr().err


def test_convert_to_a_torch_state_dict_and_back_unpickling_nothing_else(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    path, values = _saved(tmp_path)
    target = str(tmp_path / "weights.pt")
    assert cli.main(["convert", path, target, "--to", "pt"]) == 0
    state = torch.load(target, weights_only=True)
    assert state["model/brain"].dtype == torch.bfloat16
    np.testing.assert_array_equal(state["model/kernel"].numpy(), values["model/kernel"])
    back = str(tmp_path / "back" / "ckpt")
    assert cli.main(["convert", target, back, "--to", "asyncckpt"]) == 0
    np.testing.assert_array_equal(ac.load_variable(back, "model/kernel"), values["model/kernel"])
    torch.save({"layer": {"w": torch.ones(2)}, "step": 3}, tmp_path / "mixed.pt")
    assert cli.main(["convert", str(tmp_path / "mixed.pt"), str(tmp_path / "x" / "ckpt"), "--to", "asyncckpt"]) == 1
    assert "step is a int, not a tensor" in capsys.readouterr().err

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"w": torch.ones(1), "evil": Payload()}, tmp_path / "evil.pt")
    assert cli.main(["convert", str(tmp_path / "evil.pt"), str(tmp_path / "y" / "ckpt"), "--to", "asyncckpt"]) == 1
    out, err = capsys.readouterr()
    assert "unpickled!" not in out and "torch.load(weights_only=True) refused it (Weights only load failed" in err


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_hostile_protos_with_valid_checksums_are_corrupt_never_otherwise(blob):
    """An index a hostile writer sealed with correct block checksums: each proto decoder alone."""
    from asyncckpt import tensorflow_bundle as bundle

    for decode in (lambda: bundle.parse_entry(blob, "k", source="s"), lambda: bundle.parse_header(blob, source="s"),
                   lambda: bundle.parse_object_graph(blob, source="s"),
                   lambda: bundle.decode_strings(blob, 3, what="s")):
        try:
            decode()
        except ac.CorruptCheckpointError:
            pass
    try:
        bundle.read_table(bundle.build_table([(b"", blob), (b"k", blob)]), source="s")
    except ac.CorruptCheckpointError:
        pass


def test_object_metadata_reads_like_tensorflows_proto_for_both_formats(tmp_path):
    for path in (TF2, ac.Checkpoint(model=_tf2_objects()[0]).save(str(tmp_path / "ours"))):
        graph = ac.object_metadata(path)
        root = graph.nodes[0]
        model = graph.nodes[root.children[0].node_id]
        assert root.children[0].local_name == "model" and graph["nodes"][0]["children"][0]["local_name"] == "model"
        dense = graph.nodes[[child.node_id for child in model.children if child.local_name == "dense"][0]]
        kernel = graph.nodes[[child.node_id for child in dense.children if child.local_name == "kernel"][0]]
        assert kernel.attributes[0].name == "VARIABLE_VALUE"
        assert kernel.attributes[0].checkpoint_key == "model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE"
        assert kernel.slot_variables == []
