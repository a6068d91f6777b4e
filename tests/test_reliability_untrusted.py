"""Untrusted input: a checkpoint or state file from someone else is data, and stays in its directory.

* No code path of asyncckpt can run code from a file: the package source holds no ``pickle``,
  ``marshal``, ``shelve``, ``eval`` or ``exec`` outside comments and strings.
* Hostile manifests -- sealed with a valid ``manifest_crc32c``, as an attacker who knows the format
  would -- that name files outside the checkpoint, claim absurd shapes or sizes, unknown dtypes or
  an unknown format version get a clear ``CorruptCheckpointError`` (``UnsupportedFormatError``)
  from restore, ``verify()`` and ``asyncckpt verify``, without huge allocations.
* Symbolic links leading out of the folder are refused.
* Hypothesis fuzzes the object graph (which the format layer treats as opaque) through a full
  restore, and hostile but parseable state files through a ``CheckpointManager``.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tokenize
from pathlib import Path

import crc32c
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncckpt as ac
from asyncckpt import cli
from asyncckpt import io as ckio
from asyncckpt.errors import CorruptCheckpointError, UnsupportedFormatError
from asyncckpt.format import MAX_INDEX_BYTES, seal_manifest
from asyncckpt.naming import index_path

from _fakes import json_paths, manifest_editor  # noqa: E402

PACKAGE = Path(ac.__file__).parent

# ---------------------------------------------------------------------------------------------
# No deserialisation of code


_FORBIDDEN = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "eval", "exec"}


def code_uses_of_deserialisers(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` of every code token (not comment, not string) naming a forbidden module or builtin.

    Any identifier containing "pickle" counts too (``allow_pickle=True``).
    """
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and (token.string in _FORBIDDEN or "pickle" in token.string.lower()):
            found.append((token.start[0], token.string))
    return found


def test_the_scanner_finds_code_and_ignores_comments_and_strings():
    source = (
        "import json  # never pickle.loads here\n"
        '"""The value is never unpickled or passed to eval()."""\n'
        "value = eval(text)\n"
        "from marshal import loads\n"
        "array = np.load(f, allow_pickle=True)\n"
        "exec(code)\n"
    )
    assert code_uses_of_deserialisers(source) == [(3, "eval"), (4, "marshal"), (5, "allow_pickle"), (6, "exec")]


def test_the_package_never_unpickles_or_evaluates():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) >= 20
    offenders = {
        str(path.relative_to(PACKAGE)): found
        for path in sources
        if (found := code_uses_of_deserialisers(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}, f"code that could run what a checkpoint holds: {offenders}"


# ---------------------------------------------------------------------------------------------
# Hostile manifests through every reading path


def _model(fill: bool):
    model = ac.Module()
    model.w = ac.Variable(np.arange(12, dtype=np.float32).reshape(3, 4) if fill else np.zeros((3, 4), np.float32))
    optimizer = ac.optimizers.Adam(0.1)
    if fill:
        optimizer.apply_gradients([(np.ones((3, 4), np.float32), model.w)])
    else:
        optimizer.apply_gradients([(np.zeros((3, 4), np.float32), model.w)])  # creates the slots
    return model, optimizer, ac.Checkpoint(model=model, optimizer=optimizer)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(folder, manifest document)`` of a checkpoint with a model and Adam slots."""
    folder = tmp_path_factory.mktemp("saved")
    _, _, checkpoint = _model(fill=True)
    checkpoint.write(str(folder / "ckpt"))
    return folder, json.loads(Path(index_path(str(folder / "ckpt"))).read_bytes())


@pytest.fixture
def hostile(saved, tmp_path):
    """A copy of the saved checkpoint and a function writing a sealed, edited manifest over it."""
    return manifest_editor(*saved, tmp_path)


W = "model/w/.ATTRIBUTES/VARIABLE_VALUE"


def _set(*path_and_value):
    *path, value = path_and_value

    def edit(document):
        target = document
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return edit


HOSTILE = [
    ("data-dir-parent", _set("data_dir", "../elsewhere"), "not a plain directory name"),
    ("data-dir-absolute", _set("data_dir", "/etc"), "not a plain directory name"),
    ("extent-escapes", _set("tensors", W, "extents", 0, "file", "../../../../etc/passwd"), "not a plain file name"),
    ("extent-absolute", _set("tensors", W, "extents", 0, "file", "/etc/passwd"), "not a plain file name"),
    ("extent-subdirectory", _set("tensors", W, "extents", 0, "file", "a/b"), "not a plain file name"),
    ("unknown-dtype", _set("tensors", W, "dtype", "<U4"), "unknown dtype"),
    ("object-dtype", _set("tensors", W, "dtype", "|O"), "unknown dtype"),
    ("big-endian", _set("tensors", W, "dtype", ">f4"), "unknown dtype"),
    ("absurd-shape", _set("tensors", W, "shape", [2**31, 2**31, 2**31]), "is too large"),
    ("too-many-dims", _set("tensors", W, "shape", [1] * 65), "at most 64"),
    ("negative-dim", _set("tensors", W, "shape", [-3, -4]), "shape dimension"),
    ("beyond-2^53", _set("tensors", W, "nbytes", 2**60), "nbytes"),
    ("float-offset", _set("tensors", W, "extents", 0, "offset", 0.5), "offset"),
]


@pytest.mark.parametrize(("edit", "message"), [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_hostile_manifest_is_refused_by_every_reader(hostile, capsys, edit, message):
    write, _ = hostile
    prefix = write(edit)
    with pytest.raises(CorruptCheckpointError, match=message) as raised:
        _model(fill=False)[2].restore(prefix)
    assert prefix in str(raised.value)
    with pytest.raises(CorruptCheckpointError, match=message):
        ckio.open_reader(prefix).verify()
    assert cli.main(["verify", prefix]) == 1
    assert message in capsys.readouterr().err


def test_unknown_format_version_is_refused_by_every_reader(hostile, capsys):
    write, _ = hostile
    prefix = write(_set("format_version", 3))
    with pytest.raises(UnsupportedFormatError, match="format_version 3"):
        _model(fill=False)[2].restore(prefix)
    assert cli.main(["verify", prefix]) == 1
    assert "format_version 3" in capsys.readouterr().err


def test_a_consistent_but_absurd_size_fails_as_corrupt_without_allocating_it(hostile):
    """1 PiB claimed by a well-formed record: the read fails on the short file, before any allocation."""
    write, document = hostile
    nbytes = 2**50
    extent = dict(document["tensors"][W]["extents"][0], length=nbytes)

    def edit(edited):
        edited["tensors"][W] = {"dtype": "|u1", "shape": [nbytes], "nbytes": nbytes, "crc32c": 0, "extents": [extent]}

    prefix = write(edit)
    reader = ckio.open_reader(prefix)
    assert reader.spec(W).shape == (nbytes,)  # well-formed: only reading finds it out
    for action in (lambda: reader.read(W), reader.verify):
        with pytest.raises(CorruptCheckpointError, match="truncated") as raised:
            action()
        assert repr(W) in str(raised.value)


def _resealed(sealed: bytes, old: bytes, new: bytes) -> bytes:
    """``sealed`` with ``old`` replaced by ``new`` and a valid checksum again (JSON no encoder writes)."""
    body = sealed.split(b",", 1)[1].replace(old, new)
    return b'{"manifest_crc32c":%d,%s' % (crc32c.crc32c(body), body)


def test_a_number_beyond_a_double_is_refused_as_corrupt(hostile):
    """``1e400`` reads as infinity in plain JSON: the NaN/Infinity ban must cover it too."""
    write, _ = hostile
    prefix = write(_set("object_graph", "nodes", 0, "x", 12345.5))
    index = Path(index_path(prefix))
    index.write_bytes(_resealed(index.read_bytes(), b"12345.5", b"1e400"))
    with pytest.raises(CorruptCheckpointError, match="1e400 is out of range") as raised:
        _model(fill=False)[2].restore(prefix)
    assert index_path(prefix) in str(raised.value)
    with pytest.raises(CorruptCheckpointError, match="out of range"):
        ckio.open_reader(prefix)


def test_an_empty_shape_with_absurd_dimensions_is_refused_as_corrupt(hostile, capsys):
    """``[0, 2**53, 2**53]`` holds no bytes, yet NumPy cannot make it: refused when the manifest is read."""
    write, _ = hostile

    def edit(document):
        document["tensors"][W] = {"dtype": "<f4", "shape": [0, 2**53, 2**53], "nbytes": 0, "crc32c": 0,
                                  "extents": []}

    prefix = write(edit)
    with pytest.raises(CorruptCheckpointError, match="is too large") as raised:
        ckio.open_reader(prefix).read(W)
    assert repr(W) in str(raised.value) and index_path(prefix) in str(raised.value)
    assert cli.main(["verify", prefix]) == 1
    assert "is too large" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Values restored on creation must fit what they become


def _adam_with_slot_m(slot_value) -> ac.Checkpoint:
    """A checkpoint of a (4,) float32 variable whose Adam slot ``m`` is ``slot_value`` instead."""
    v = ac.Variable(np.zeros(4, np.float32))
    optimizer = ac.optimizers.Adam(0.1)
    optimizer.apply_gradients([(np.ones(4, np.float32), v)])
    optimizer._self_slots[v._unique_id]["m"] = ac.Variable(slot_value)
    return ac.Checkpoint(v=v, optimizer=optimizer)


SLOT_M = "v/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE"


@pytest.mark.parametrize(("slot_value", "message"), [
    (np.zeros(1000, np.float32), r"incompatible tensor with shape \(1000,\) when attempting to restore variable "
                                 r"with shape \(4,\)"),
    (np.zeros(4, np.float64), "of dtype float64 from .* of dtype float32"),
], ids=["shape", "dtype"])
def test_a_slot_created_from_the_checkpoint_must_fit_its_variable(tmp_path, slot_value, message):
    """A (1000,) slot for a (4,) variable used to restore, and fail later with a broadcast error."""
    path = _adam_with_slot_m(slot_value).save(str(tmp_path / "ckpt"))
    v = ac.Variable(np.zeros(4, np.float32))
    optimizer = ac.optimizers.Adam(0.1)
    with pytest.raises(ValueError, match=message) as raised:
        ac.Checkpoint(v=v, optimizer=optimizer).restore(path)
    assert f"checkpoint key {SLOT_M!r} of {path}" in str(raised.value)
    assert optimizer.get_slot(v, "m") is None


def test_a_hyperparameter_created_from_the_checkpoint_must_be_a_scalar(tmp_path):
    impostor = ac.AutoTrackable()
    impostor.learning_rate = ac.Variable(np.full(3, 0.1, np.float32))
    path = ac.Checkpoint(optimizer=impostor).save(str(tmp_path / "ckpt"))
    v = ac.Variable(np.zeros(4, np.float32))
    optimizer = ac.optimizers.Adam(0.1)
    ac.Checkpoint(optimizer=optimizer).restore(path).expect_partial()
    with pytest.raises(ValueError, match=r"shape \(3,\) is not compatible with the explicitly supplied `shape` "
                                         r"argument \(\)") as raised:
        optimizer.apply_gradients([(np.ones(4, np.float32), v)])
    assert f"checkpoint key 'optimizer/learning_rate/.ATTRIBUTES/VARIABLE_VALUE' of {path}" in str(raised.value)
    np.testing.assert_array_equal(v.numpy(), np.zeros(4, np.float32))  # nothing changed


def test_a_save_counter_restored_on_creation_must_be_a_scalar(tmp_path):
    impostor = ac.AutoTrackable()
    impostor.save_counter = ac.Variable(np.zeros(3, np.int64))
    path = str(tmp_path / "ckpt")
    ac.Checkpoint(root=impostor).write(path)
    with pytest.raises(ValueError, match=r"shape \(3,\) is not compatible") as raised:
        ac.Checkpoint(v=ac.Variable(1.0)).restore(path)
    assert f"checkpoint key 'save_counter/.ATTRIBUTES/VARIABLE_VALUE' of {path}" in str(raised.value)


def test_restore_on_create_names_the_key_and_the_checkpoint(tmp_path):
    saved = ac.AutoTrackable()
    saved.w = ac.Variable(np.zeros(5, np.float32))
    path = ac.Checkpoint(model=saved).save(str(tmp_path / "ckpt"))
    model = ac.AutoTrackable()
    ac.Checkpoint(model=model).restore(path)
    with pytest.raises(ValueError, match="explicitly supplied `shape` argument") as raised:
        ac.add_variable(model, "w", shape=(4,))
    assert f"checkpoint key 'model/w/.ATTRIBUTES/VARIABLE_VALUE' of {path}" in str(raised.value)


def test_a_mismatched_restore_names_the_key_and_the_checkpoint(tmp_path):
    path = ac.Checkpoint(v=ac.Variable(np.zeros(2, np.float32))).save(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError) as raised:
        ac.Checkpoint(v=ac.Variable(np.zeros(1, np.float32))).restore(path)
    assert str(raised.value) == (
        "Received incompatible tensor with shape (2,) when attempting to restore variable with shape (1,) and name "
        f"Variable. The value is checkpoint key 'v/.ATTRIBUTES/VARIABLE_VALUE' of {path}."
    )


# ---------------------------------------------------------------------------------------------
# Symbolic links out of the folder


def test_a_data_directory_linked_outside_the_folder_is_refused_by_every_reader(hostile, tmp_path, capsys):
    write, document = hostile
    prefix = write(lambda edited: None)
    data_dir = Path(prefix).parent / document["data_dir"]
    outside = tmp_path / "outside"
    data_dir.rename(outside)
    data_dir.symlink_to(outside)
    with pytest.raises(CorruptCheckpointError, match="outside the checkpoint's folder"):
        _model(fill=False)[2].restore(prefix)
    assert cli.main(["verify", prefix]) == 1
    assert "outside the checkpoint's folder" in capsys.readouterr().err


def test_a_data_directory_linked_inside_the_folder_is_read(hostile):
    write, document = hostile
    prefix = write(lambda edited: None)
    folder = Path(prefix).parent
    (folder / document["data_dir"]).rename(folder / "moved.data-0000000000000001")
    (folder / document["data_dir"]).symlink_to("moved.data-0000000000000001")
    model, _, checkpoint = _model(fill=False)
    checkpoint.read(prefix).assert_consumed()
    np.testing.assert_array_equal(model.w.numpy(), _model(fill=True)[0].w.numpy())


def test_a_data_file_linked_outside_the_folder_is_refused(hostile, tmp_path):
    write, document = hostile
    prefix = write(lambda edited: None)
    data_file = Path(prefix).parent / document["data_dir"] / document["tensors"][W]["extents"][0]["file"]
    secret = tmp_path / "secret"
    secret.write_bytes(data_file.read_bytes())  # same bytes, so every checksum still matches
    data_file.unlink()
    data_file.symlink_to(secret)
    with pytest.raises(CorruptCheckpointError, match="outside"):
        ckio.open_reader(prefix).read(W)


# ---------------------------------------------------------------------------------------------
# Fuzzing the object graph through a full restore


_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-3, max_value=40), st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6), st.sampled_from(["VARIABLE_VALUE", W, "m", "..", "/", ".ATTRIBUTES"]),
)
_json_value = st.recursive(_json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(
        ["node_id", "local_name", "children", "attributes", "name", "checkpoint_key", "full_name", "slot_variables",
         "original_variable_node_id", "slot_name", "slot_variable_node_id", "has_checkpoint_values", "x"]), inner,
        max_size=3)), max_leaves=6)
_DELETE = object()


_fuzzed_graph_edits = given(
    edits=st.lists(st.tuples(st.integers(min_value=0), st.one_of(st.just(_DELETE), _json_value)), min_size=1,
                   max_size=3))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # 150: slow
@_fuzzed_graph_edits
def test_fuzzed_object_graphs_restore_or_raise_corrupt(saved, tmp_path, edits):
    folder, document = saved
    edited = json.loads(json.dumps(document))
    for choice, value in edits:
        paths = [p for p in json_paths(edited["object_graph"]) if p]
        if not paths:
            break
        path = paths[choice % len(paths)]
        target = edited["object_graph"]
        for part in path[:-1]:
            target = target[part]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    prefix = tmp_path / f"fuzz-{abs(hash(json.dumps(edits, default=str))) % 10**12}"
    data_dir = prefix.name + ".data-0000000000000000"
    if not (tmp_path / data_dir).exists():
        shutil.copytree(folder / document["data_dir"], tmp_path / data_dir)
    edited["data_dir"] = data_dir
    Path(index_path(str(prefix))).write_bytes(seal_manifest(edited))
    try:
        status = _model(fill=False)[2].restore(str(prefix))
    except CorruptCheckpointError:
        return
    except ValueError as error:  # an edge redirected to a value of another shape or dtype
        assert "incompatible" in str(error) or "dtype" in str(error), error
        return
    status.expect_partial()


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@_fuzzed_graph_edits
def test_many_fuzzed_object_graphs_restore_or_raise_corrupt(saved, tmp_path, edits):
    test_fuzzed_object_graphs_restore_or_raise_corrupt.hypothesis.inner_test(saved, tmp_path, edits)


# ---------------------------------------------------------------------------------------------
# Hostile but parseable state files


_paths = st.one_of(
    st.sampled_from(["ckpt-1", "./ckpt-1", "ckpt-2", "../outside/ckpt-1", "/nonexistent/ckpt-9", "", "a\nb", "ü/ckpt",
                     "x" * 300, "ckpt-1/..", "."]),
    st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12),
)
_timestamps = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e300]))


def _quote(text: str) -> str:
    return '"' + "".join(f"\\{ord(c):03o}" if ord(c) < 32 or c in '"\\' else c for c in text) + '"'


_hostile_state_files = given(model_path=_paths, paths=st.lists(_paths, max_size=4),
                             stamps=st.lists(_timestamps, max_size=5), preserved=_timestamps)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # 60: slow
@_hostile_state_files
def test_a_manager_on_a_hostile_state_file_saves_or_refuses_clearly(tmp_path_factory, model_path, paths, stamps,
                                                                     preserved):
    directory = tmp_path_factory.mktemp("state")
    _, _, checkpoint = _model(fill=True)
    checkpoint.write(str(directory / "ckpt-1"))
    lines = [f"model_checkpoint_path: {_quote(model_path)}"]
    lines += [f"all_model_checkpoint_paths: {_quote(path)}" for path in paths]
    lines += [f"all_model_checkpoint_timestamps: {stamp!r}" for stamp in stamps]
    lines += [f"last_preserved_timestamp: {preserved!r}"]
    (directory / "checkpoint").write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        manager = ac.CheckpointManager(checkpoint, directory, max_to_keep=1)
    except ValueError as error:  # TensorFlow's "Invalid checkpoint state" for an empty model path
        assert "Invalid checkpoint state" in str(error) and model_path == ""
        return
    try:
        path = manager.save()
    except ac.CheckpointError as error:  # the recorded latest is gone and ckpt-1 would be replaced
        assert "refusing to overwrite checkpoint" in str(error), error
        assert ckio.checkpoint_exists(str(directory / "ckpt-1"))
        return
    assert ac.latest_checkpoint(directory) == path
    state = ac.get_checkpoint_state(directory)
    assert state.model_checkpoint_path == path
    assert all(not math.isnan(t) for t in state.all_model_checkpoint_timestamps[-1:])


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@_hostile_state_files
def test_many_managers_on_hostile_state_files_save_or_refuse_clearly(tmp_path_factory, model_path, paths, stamps,
                                                                     preserved):
    test_a_manager_on_a_hostile_state_file_saves_or_refuses_clearly.hypothesis.inner_test(
        tmp_path_factory, model_path, paths, stamps, preserved)


def test_a_manager_never_deletes_checkpoints_outside_its_directory(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    _, _, checkpoint = _model(fill=True)
    precious = checkpoint.write(str(victim / "precious"))
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / "checkpoint").write_text(
        f'model_checkpoint_path: "{precious}"\nall_model_checkpoint_paths: "{precious}"\n'
        "all_model_checkpoint_timestamps: 1.0\nlast_preserved_timestamp: 0.5\n",
        encoding="utf-8",
    )
    manager = ac.CheckpointManager(_model(fill=True)[2], directory, max_to_keep=1)
    manager.save()
    manager.save()
    assert ckio.checkpoint_exists(precious), "the manager deleted a checkpoint outside its directory"


def _state_file(directory: Path, *entries: str) -> None:
    lines = [f"model_checkpoint_path: {_quote(entries[-1])}"]
    lines += [f"all_model_checkpoint_paths: {_quote(entry)}" for entry in entries]
    lines += ["all_model_checkpoint_timestamps: 1.0"] * len(entries) + ["last_preserved_timestamp: 0.5"]
    (directory / "checkpoint").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("entry", ["", "x" * 300], ids=["empty", "too-long"])
def test_a_manager_skips_a_state_file_entry_that_names_no_checkpoint(tmp_path, entry):
    _, _, checkpoint = _model(fill=True)
    checkpoint.write(str(tmp_path / "ckpt-1"))
    _state_file(tmp_path, entry, "ckpt-1")
    manager = ac.CheckpointManager(_model(fill=True)[2], tmp_path, max_to_keep=1)
    path = manager.save()
    assert ac.latest_checkpoint(tmp_path) == path


def test_a_manager_never_deletes_the_checkpoint_it_just_saved(tmp_path):
    _, _, checkpoint = _model(fill=True)
    checkpoint.write(str(tmp_path / "ckpt-1"))
    checkpoint.write(str(tmp_path / "ckpt-2"))
    _state_file(tmp_path, "./ckpt-2", "ckpt-1")  # as another tool might spell it
    manager = ac.CheckpointManager(_model(fill=True)[2], tmp_path, max_to_keep=1)
    manager.checkpoint.save_counter.assign(1)
    path = manager.save()  # ckpt-2 again
    assert ac.latest_checkpoint(tmp_path) == path


def test_an_oversized_index_is_refused_before_it_is_read(hostile, capsys):
    """A sparse ``P.index`` just over the limit: refused by size alone, nothing allocated for it."""
    write, _ = hostile
    prefix = write(lambda document: None)
    with open(index_path(prefix), "r+b") as index:
        index.truncate(MAX_INDEX_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(CorruptCheckpointError, match=r"larger than \d+ bytes") as raised:
        ckio.open_reader(prefix)
    assert index_path(prefix) in str(raised.value)
    with pytest.raises(CorruptCheckpointError, match="larger than"):
        _model(fill=False)[2].restore(prefix)
    assert cli.main(["verify", prefix]) == 1
    assert "larger than" in capsys.readouterr().err
    assert not ckio.checkpoint_exists(prefix)
    _model(fill=True)[2].write(prefix)  # a new save replaces it
    ckio.open_reader(prefix).verify()
