"""The state file codec and its file operations (``asyncckpt.state_file``).

The golden strings below are what protobuf's ``text_format.MessageToString`` prints for
TensorFlow's ``CheckpointState`` proto (current protobuf, ``as_utf8=True``), and what an older
protobuf printed for non-ASCII paths (octal UTF-8 bytes): we must write the first byte for byte
and read both.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import re
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncckpt import state_file as sf
from asyncckpt.state_file import CheckpointState, CheckpointStateParseError

# ---------------------------------------------------------------- golden TensorFlow text

TF_SAVE = 'model_checkpoint_path: "ckpt-10"\nall_model_checkpoint_paths: "ckpt-10"\n'
TF_MANAGER = (
    'model_checkpoint_path: "ckpt-2"\n'
    'all_model_checkpoint_paths: "ckpt-1"\n'
    'all_model_checkpoint_paths: "ckpt-2"\n'
    "all_model_checkpoint_timestamps: 1700000000.123456\n"
    "all_model_checkpoint_timestamps: 1700000600.5\n"
    "last_preserved_timestamp: 1699999999.0\n"
)
TF_ESCAPES = (
    'model_checkpoint_path: "/abs/dir \u00e9/ck\\"p\\\\t\\n\\t\\\'\\001"\n'
    'all_model_checkpoint_paths: "x"\n'
    'all_model_checkpoint_paths: "/abs/dir \u00e9/ck\\"p\\\\t\\n\\t\\\'\\001"\n'
    "all_model_checkpoint_timestamps: 1e+20\n"
    "all_model_checkpoint_timestamps: 1e-07\n"
    "last_preserved_timestamp: 10000.0\n"
)
TF_SPECIAL_FLOATS = (
    'model_checkpoint_path: "a"\n'
    'all_model_checkpoint_paths: "a"\n'
    "all_model_checkpoint_timestamps: inf\n"
    "last_preserved_timestamp: -0.0\n"
)
TF_DEL_AND_CJK = (
    'model_checkpoint_path: "\u65e5\u672c"\nall_model_checkpoint_paths: "\\177"\nall_model_checkpoint_timestamps: 3.0\n'
)


@pytest.mark.parametrize(
    ("text", "state"),
    [
        (TF_SAVE, CheckpointState("ckpt-10", ["ckpt-10"], [], 0.0)),
        (TF_MANAGER, CheckpointState("ckpt-2", ["ckpt-1", "ckpt-2"], [1700000000.123456, 1700000600.5], 1699999999.0)),
        (
            TF_ESCAPES,
            CheckpointState(
                "/abs/dir \u00e9/ck\"p\\t\n\t'\x01",
                ["x", "/abs/dir \u00e9/ck\"p\\t\n\t'\x01"],
                [1e20, 1e-7],
                10000.0,
            ),
        ),
        (TF_SPECIAL_FLOATS, CheckpointState("a", ["a"], [math.inf], -0.0)),
        (TF_DEL_AND_CJK, CheckpointState("\u65e5\u672c", ["\x7f"], [3.0], 0.0)),
    ],
    ids=["save", "manager", "escapes", "special-floats", "del-and-cjk"],
)
def test_tf_text_parses_and_is_written_byte_for_byte(text, state):
    assert sf.parse_checkpoint_state(text) == state
    assert sf.format_checkpoint_state(state) == text


@pytest.fixture(scope="module")
def protobuf_state_class():
    """TensorFlow's ``CheckpointState`` message built at run time, when protobuf is installed."""
    descriptor_pb2 = pytest.importorskip("google.protobuf.descriptor_pb2")
    from google.protobuf import descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="checkpoint_state.proto", package="tensorflow", syntax="proto3")
    message = proto.message_type.add(name="CheckpointState")
    for number, (name, kind, label) in enumerate(
        [
            ("model_checkpoint_path", field.TYPE_STRING, field.LABEL_OPTIONAL),
            ("all_model_checkpoint_paths", field.TYPE_STRING, field.LABEL_REPEATED),
            ("all_model_checkpoint_timestamps", field.TYPE_DOUBLE, field.LABEL_REPEATED),
            ("last_preserved_timestamp", field.TYPE_DOUBLE, field.LABEL_OPTIONAL),
        ],
        start=1,
    ):
        message.field.add(name=name, number=number, type=kind, label=label)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.CheckpointState"))


_protobuf_states = st.builds(
    CheckpointState,
    # NUL is refused in paths by design (see test_grammar_rejects_malformed_text).
    model_checkpoint_path=st.text(st.characters(blacklist_characters="\x00"), max_size=20).filter(bool),
    all_model_checkpoint_paths=st.lists(st.text(st.characters(blacklist_characters="\x00"), max_size=20), max_size=3),
    all_model_checkpoint_timestamps=st.lists(st.floats(), max_size=3),
    last_preserved_timestamp=st.floats(),
)


@settings(max_examples=200)
@given(state=_protobuf_states)
def test_protobuf_text_format_agrees_when_installed(protobuf_state_class, state):
    """Differential check against the real protobuf text format (skipped where it is absent)."""
    from google.protobuf import text_format

    message = protobuf_state_class(
        model_checkpoint_path=state.model_checkpoint_path,
        all_model_checkpoint_paths=state.all_model_checkpoint_paths,
        all_model_checkpoint_timestamps=state.all_model_checkpoint_timestamps,
        last_preserved_timestamp=state.last_preserved_timestamp,
    )
    text = text_format.MessageToString(message)
    assert sf.format_checkpoint_state(state) == text
    parsed = protobuf_state_class()
    text_format.Merge(text, parsed)
    assert repr(sf.parse_checkpoint_state(text)) == repr(
        CheckpointState(
            parsed.model_checkpoint_path,
            list(parsed.all_model_checkpoint_paths),
            list(parsed.all_model_checkpoint_timestamps),
            parsed.last_preserved_timestamp,
        )
    )


def test_older_protobuf_octal_utf8_is_read():
    state = sf.parse_checkpoint_state('model_checkpoint_path: "/d/\\303\\251t\\303\\251/ckpt-1"\n')
    assert state.model_checkpoint_path == "/d/\u00e9t\u00e9/ckpt-1"


def test_tf_test_file_with_indentation_and_dot_slash():
    # Literal from TensorFlow's checkpoint_management_test.py (testCheckPointCompletesRelativePaths).
    state = sf.parse_checkpoint_state(
        """
        model_checkpoint_path: "./model.ckpt-687529"
        all_model_checkpoint_paths: "./model.ckpt-687500"
        all_model_checkpoint_paths: "./model.ckpt-687529"
        """
    )
    assert state.model_checkpoint_path == "./model.ckpt-687529"
    assert state.all_model_checkpoint_paths == ["./model.ckpt-687500", "./model.ckpt-687529"]
    assert state.all_model_checkpoint_timestamps == []
    assert state.last_preserved_timestamp == 0.0


def test_format_omits_proto3_defaults():
    assert sf.format_checkpoint_state(CheckpointState("m", ["m"], [], 0.0)) == (
        'model_checkpoint_path: "m"\nall_model_checkpoint_paths: "m"\n'
    )
    assert sf.format_checkpoint_state(CheckpointState()) == ""


# ---------------------------------------------------------------- the grammar


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model_checkpoint_path: 'single'", CheckpointState("single")),
        ('model_checkpoint_path: "con" \'cat\' "enated"', CheckpointState("concatenated")),
        ('# comment\nmodel_checkpoint_path: "a"  # trailing\n', CheckpointState("a")),
        ('model_checkpoint_path: "a"; last_preserved_timestamp: 2,', CheckpointState("a", last_preserved_timestamp=2.0)),
        ('model_checkpoint_path: "a"\nmodel_checkpoint_path: "b"', CheckpointState("b")),
        ('all_model_checkpoint_paths: ["a", "b"] all_model_checkpoint_paths: "c"', CheckpointState("", ["a", "b", "c"])),
        ("all_model_checkpoint_timestamps: []", CheckpointState()),
        (
            "all_model_checkpoint_timestamps: [1, -2.5, .5e1, 3f, 1., -inf, Infinity]",
            CheckpointState("", [], [1.0, -2.5, 5.0, 3.0, 1.0, -math.inf, math.inf]),
        ),
        ('model_checkpoint_path: "\\a\\b\\f\\v\\?\\x41\\101\\7"', CheckpointState("\a\b\f\v?AA\x07")),
        ("last_preserved_timestamp: 1e400", CheckpointState(last_preserved_timestamp=math.inf)),
    ],
)
def test_grammar_accepts_text_format_variants(text, expected):
    assert sf.parse_checkpoint_state(text) == expected


def test_nan_timestamp_parses():
    state = sf.parse_checkpoint_state("all_model_checkpoint_timestamps: nan last_preserved_timestamp: -NaN")
    assert math.isnan(state.all_model_checkpoint_timestamps[0])
    assert math.isnan(state.last_preserved_timestamp)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('unknown_field: "x"', "unknown field 'unknown_field'"),
        ('model_checkpoint_path "x"', "expected :"),
        ("model_checkpoint_path: { }", "unexpected character '{'"),
        ("model_checkpoint_path: 5", "expected string"),
        ('last_preserved_timestamp: "5"', "expected number"),
        ('model_checkpoint_path: "a', "unexpected character '\"'"),
        ('model_checkpoint_path: "a\nb"', "unexpected character '\"'"),
        ('model_checkpoint_path: "\\q"', "invalid escape \\q"),
        ('model_checkpoint_path: "\\u00e9"', "invalid escape \\u"),
        ('model_checkpoint_path: "\\400"', "out of range"),
        ('model_checkpoint_path: "\\377"', "not valid UTF-8"),
        ('model_checkpoint_path: "a\\000b"', "NUL"),
        ("last_preserved_timestamp: 01", "unexpected '1'"),
        ("last_preserved_timestamp: 0x10", "unknown field 'x10'"),
        ("last_preserved_timestamp: [1]", "expected number"),
        ('model_checkpoint_path: ["a"]', "expected string"),
        ("all_model_checkpoint_paths: [\"a\" \"b\"", "expected ]"),
        ("all_model_checkpoint_paths:", "unexpected end of input"),
        ('model_checkpoint_path: "a" "b" ;;', "unexpected ';'"),
        ("model_checkpoint_path:\u00a0'a'", "unexpected character"),
    ],
)
def test_grammar_rejects_malformed_text(text, message):
    with pytest.raises(CheckpointStateParseError, match=re.escape(message)):
        sf.parse_checkpoint_state(text)


_state_strings = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=30)
_states = st.builds(
    CheckpointState,
    model_checkpoint_path=_state_strings.filter(bool),
    all_model_checkpoint_paths=st.lists(_state_strings, max_size=4),
    all_model_checkpoint_timestamps=st.lists(st.floats(allow_nan=False), max_size=4),
    last_preserved_timestamp=st.floats(allow_nan=False),
)


@given(_states)
def test_format_then_parse_round_trips(state):
    assert sf.parse_checkpoint_state(sf.format_checkpoint_state(state)) == state


def _assert_valid_state(state: CheckpointState) -> None:
    assert isinstance(state.model_checkpoint_path, str) and "\x00" not in state.model_checkpoint_path
    assert all(isinstance(p, str) and "\x00" not in p for p in state.all_model_checkpoint_paths)
    assert all(isinstance(t, float) for t in state.all_model_checkpoint_timestamps)
    assert isinstance(state.last_preserved_timestamp, float)


_fragments = st.sampled_from(
    [
        "model_checkpoint_path", "all_model_checkpoint_paths", "all_model_checkpoint_timestamps",
        "last_preserved_timestamp", ":", " ", "\n", '"a"', "'b'", '"\\n"', '"\\101"', '"\\x41"',
        '"\\303\\251"', '"\\377"', "1", "-1.5", "1e3", "inf", "nan", "[", "]", ",", ";", "#c\n", "{", '"',
        "\\", "\x00", "\u00e9",
    ]
)  # fmt: skip


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), st.lists(_fragments, max_size=25).map("".join)))
def test_arbitrary_text_parses_or_raises_parse_error_only(text):
    try:
        state = sf.parse_checkpoint_state(text)
    except CheckpointStateParseError:
        return
    _assert_valid_state(state)


# ---------------------------------------------------------------- reading the file


def write_state(directory, data: bytes | str, name="checkpoint") -> str:
    path = os.path.join(str(directory), name)
    with open(path, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=300), st.lists(_fragments, max_size=25).map(lambda f: "".join(f).encode())))
def test_get_checkpoint_state_on_hostile_bytes_returns_none_or_valid_state(tmp_path, data):
    write_state(tmp_path, data)
    try:
        state = sf.get_checkpoint_state(tmp_path)
    except ValueError as exc:
        # The one documented error: the file parses but names no model checkpoint path.
        assert str(exc) == f"Invalid checkpoint state loaded from {tmp_path}"
        assert sf.parse_checkpoint_state(data.decode("utf-8")).model_checkpoint_path == ""
        return
    if state is not None:
        _assert_valid_state(state)
        assert state.model_checkpoint_path
    assert sf.latest_checkpoint(tmp_path) is None  # no checkpoint exists, whatever the file says


def test_latest_checkpoint_of_an_unlookupable_path_is_none(tmp_path, caplog):
    write_state(tmp_path, 'model_checkpoint_path: "' + "n" * 300 + '"\n')  # longer than any file name
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        assert sf.latest_checkpoint(tmp_path) is None
    assert any(r.levelno == logging.ERROR and "Couldn't match files" in r.getMessage() for r in caplog.records)


def test_oversized_state_file_is_refused_with_a_warning(tmp_path, caplog):
    write_state(tmp_path, b'model_checkpoint_path: "a"\n' + b" " * sf.MAX_STATE_FILE_BYTES)
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        assert sf.get_checkpoint_state(tmp_path) is None
    assert any("larger than" in r.getMessage() for r in caplog.records)
    assert any("Checkpoint ignored" in r.getMessage() for r in caplog.records)


def test_non_utf8_state_file_is_refused_with_a_warning(tmp_path, caplog):
    write_state(tmp_path, b'model_checkpoint_path: "\xff"\n')
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        assert sf.get_checkpoint_state(tmp_path) is None
    assert any("not valid UTF-8" in r.getMessage() for r in caplog.records)


def test_get_checkpoint_state_joins_only_relative_paths(tmp_path):
    write_state(tmp_path, 'model_checkpoint_path: "/elsewhere/m-1"\nall_model_checkpoint_paths: "sub/m-0"\n')
    state = sf.get_checkpoint_state(pathlib.Path(tmp_path))
    assert state.model_checkpoint_path == "/elsewhere/m-1"
    # Reading never appends the model path: the lists are what the file says, joined.
    assert state.all_model_checkpoint_paths == [os.path.join(str(tmp_path), "sub/m-0")]


# ---------------------------------------------------------------- writing the file


def read_text(directory, name="checkpoint") -> str:
    with open(os.path.join(str(directory), name), encoding="utf-8") as handle:
        return handle.read()


def test_update_writes_tf_text_with_paths_relative_to_the_directory(tmp_path):
    sf.update_checkpoint_state(tmp_path, tmp_path / "ckpt-10")
    assert read_text(tmp_path) == TF_SAVE


def test_update_stores_paths_outside_the_directory_absolute(tmp_path):
    outside = tmp_path.parent / "elsewhere" / "ckpt-1"
    sf.update_checkpoint_state(
        str(tmp_path), str(tmp_path / "sub" / "ckpt-2"), [str(outside), str(tmp_path / "sub" / "ckpt-2")]
    )
    assert read_text(tmp_path) == (
        'model_checkpoint_path: "sub/ckpt-2"\n'
        f'all_model_checkpoint_paths: "{outside}"\n'
        'all_model_checkpoint_paths: "sub/ckpt-2"\n'
    )
    state = sf.get_checkpoint_state(tmp_path)
    assert state.all_model_checkpoint_paths == [str(outside), os.path.join(str(tmp_path), "sub/ckpt-2")]


def test_update_resolves_relative_arguments_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sf.update_checkpoint_state("run", "run/ckpt-3")
    assert read_text(tmp_path / "run") == 'model_checkpoint_path: "ckpt-3"\nall_model_checkpoint_paths: "ckpt-3"\n'
    assert sf.get_checkpoint_state("run").model_checkpoint_path == os.path.join("run", "ckpt-3")


def test_update_appends_the_model_path_when_not_last(tmp_path):
    sf.update_checkpoint_state(tmp_path, tmp_path / "c-2", [str(tmp_path / "c-1")], all_model_checkpoint_timestamps=None)
    assert sf.get_checkpoint_state(tmp_path).all_model_checkpoint_paths == [
        str(tmp_path / "c-1"),
        str(tmp_path / "c-2"),
    ]


def test_update_writes_timestamps_and_preserved_timestamp(tmp_path):
    sf.update_checkpoint_state(
        tmp_path,
        tmp_path / "ckpt-2",
        [tmp_path / "ckpt-1", tmp_path / "ckpt-2"],
        all_model_checkpoint_timestamps=[1700000000.123456, 1700000600.5],
        last_preserved_timestamp=1699999999.0,
    )
    assert read_text(tmp_path) == TF_MANAGER


def test_update_rejects_timestamps_not_matching_paths(tmp_path):
    with pytest.raises(ValueError, match="Checkpoint timestamps, if provided, must match checkpoint paths"):
        sf.update_checkpoint_state(tmp_path, tmp_path / "c-1", [tmp_path / "c-1"], all_model_checkpoint_timestamps=[1.0, 2.0])
    assert not os.path.exists(tmp_path / "checkpoint")


def test_update_rejects_the_state_file_as_model_path(tmp_path):
    target = str(tmp_path / "checkpoint")
    message = f"Save path '{target}' conflicts with path used for checkpoint state.  Please use a different save path."
    with pytest.raises(RuntimeError, match=re.escape(message)):
        sf.update_checkpoint_state(tmp_path, target)
    with pytest.raises(RuntimeError, match="conflicts with path used for checkpoint state"):
        sf.update_checkpoint_state(tmp_path, tmp_path / "state", latest_filename="state")


def test_update_rejects_an_empty_model_path(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        sf.update_checkpoint_state(tmp_path, "")


def test_update_creates_the_directory_and_honours_latest_filename(tmp_path):
    directory = tmp_path / "new" / "dir"
    sf.update_checkpoint_state(directory, directory / "m-1", latest_filename="my_state")
    assert read_text(directory, "my_state") == 'model_checkpoint_path: "m-1"\nall_model_checkpoint_paths: "m-1"\n'
    assert sf.get_checkpoint_state(directory) is None
    assert sf.get_checkpoint_state(directory, "my_state").model_checkpoint_path == str(directory / "m-1")


def test_update_replaces_atomically_and_leaves_no_temporary_files(tmp_path):
    sf.update_checkpoint_state(tmp_path, tmp_path / "c-1")
    before = os.stat(tmp_path / "checkpoint").st_ino
    sf.update_checkpoint_state(tmp_path, tmp_path / "c-2")
    # A rename installs a new inode; an in-place rewrite would keep the old one (and be tearable).
    assert os.stat(tmp_path / "checkpoint").st_ino != before
    assert sorted(os.listdir(tmp_path)) == [".checkpoint.lock", "checkpoint"]
    assert sf.get_checkpoint_state(tmp_path).model_checkpoint_path == str(tmp_path / "c-2")


def test_failed_write_keeps_the_old_state_and_removes_the_temporary_file(tmp_path):
    sf.update_checkpoint_state(tmp_path, tmp_path / "c-1")
    with pytest.raises(UnicodeEncodeError):
        sf.update_checkpoint_state(tmp_path, tmp_path / "c-\udcff")  # not encodable: the write fails
    assert read_text(tmp_path) == 'model_checkpoint_path: "c-1"\nall_model_checkpoint_paths: "c-1"\n'
    assert sorted(os.listdir(tmp_path)) == [".checkpoint.lock", "checkpoint"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_state_file_mode_follows_the_umask(tmp_path, umask, mode):
    # Like any new file (and TensorFlow's), not mkstemp's 0600: others may read the checkpoints.
    previous = os.umask(umask)
    try:
        sf.update_checkpoint_state(tmp_path, tmp_path / "c-1")
        sf.update_checkpoint_state(tmp_path, tmp_path / "c-2")  # a replacement gets the same mode
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "checkpoint").st_mode) == mode


def test_a_temporary_left_by_a_crash_is_replaced_by_the_next_write(tmp_path):
    (tmp_path / ".checkpoint.tmp").write_bytes(b"model_checkpoint_path: \"half")  # died before its rename
    sf.update_checkpoint_state(tmp_path, tmp_path / "c-1")
    assert sorted(os.listdir(tmp_path)) == [".checkpoint.lock", "checkpoint"]
    assert sf.get_checkpoint_state(tmp_path).model_checkpoint_path == str(tmp_path / "c-1")


def test_a_temporary_that_is_a_symbolic_link_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    directory = tmp_path / "run"
    directory.mkdir()
    os.symlink(outside, directory / ".checkpoint.tmp")
    sf.update_checkpoint_state(directory, directory / "c-1")
    assert outside.read_bytes() == b"precious"
    assert not os.path.islink(directory / "checkpoint")
    assert sorted(os.listdir(directory)) == [".checkpoint.lock", "checkpoint"]


# ---------------------------------------------------------------- the pending-deletions file


def test_pending_deletions_round_trip_relative_to_the_directory(tmp_path):
    assert sf._load_pending_deletions(str(tmp_path), None) is None
    paths = [str(tmp_path / "ckpt-1"), str(tmp_path / "sub" / 'we"ird\n'), "/elsewhere/ckpt-9"]
    sf._write_pending_deletions(str(tmp_path), None, paths)
    assert read_text(tmp_path, ".checkpoint.deleting") == (
        'model_checkpoint_path: "/elsewhere/ckpt-9"\n'
        'all_model_checkpoint_paths: "ckpt-1"\n'
        'all_model_checkpoint_paths: "sub/we\\"ird\\n"\n'
        'all_model_checkpoint_paths: "/elsewhere/ckpt-9"\n'
    )
    assert sf._load_pending_deletions(str(tmp_path), None) == paths
    sf._remove_pending_deletions(str(tmp_path), None)
    sf._remove_pending_deletions(str(tmp_path), None)  # already gone: not an error
    assert sorted(os.listdir(tmp_path)) == []
    with pytest.raises(ValueError, match="no checkpoint"):
        sf._write_pending_deletions(str(tmp_path), None, [])


@pytest.mark.parametrize("data", [b"all_model_checkpoint_paths: ckpt-1\n", b'all_model_checkpoint_paths: "\xff"\n'])
def test_an_unreadable_pending_deletions_file_names_nothing(tmp_path, caplog, data):
    (tmp_path / ".checkpoint.deleting").write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        assert sf._load_pending_deletions(str(tmp_path), None) == []
    assert any(".checkpoint.deleting ignored" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- the cross-process lock


def test_state_writes_wait_for_the_documented_lock_file(tmp_path):
    import fcntl
    import threading

    lock_path = tmp_path / ".checkpoint.lock"
    with open(lock_path, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # what another process's read-modify-write holds
        writer = threading.Thread(target=sf.update_checkpoint_state, args=(tmp_path, tmp_path / "c-1"))
        writer.start()
        writer.join(0.3)
        blocked = writer.is_alive()
        written_while_held = os.path.exists(tmp_path / "checkpoint")
        fcntl.flock(held, fcntl.LOCK_UN)
    writer.join()
    assert blocked and not written_while_held
    assert sf.get_checkpoint_state(tmp_path).model_checkpoint_path == str(tmp_path / "c-1")


def test_lock_file_follows_latest_filename(tmp_path):
    sf.update_checkpoint_state(tmp_path, tmp_path / "c-1", latest_filename="state")
    assert sorted(os.listdir(tmp_path)) == [".state.lock", "state"]
