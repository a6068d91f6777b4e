"""The state file codec and its file operations (``asyncckpt.checkpoint_management``).

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

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncckpt import checkpoint_management as cm
from asyncckpt.checkpoint_management import CheckpointState, CheckpointStateParseError

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
    assert cm.parse_checkpoint_state(text) == state
    assert cm.format_checkpoint_state(state) == text


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
    assert cm.format_checkpoint_state(state) == text
    parsed = protobuf_state_class()
    text_format.Merge(text, parsed)
    assert repr(cm.parse_checkpoint_state(text)) == repr(
        CheckpointState(
            parsed.model_checkpoint_path,
            list(parsed.all_model_checkpoint_paths),
            list(parsed.all_model_checkpoint_timestamps),
            parsed.last_preserved_timestamp,
        )
    )


def test_older_protobuf_octal_utf8_is_read():
    state = cm.parse_checkpoint_state('model_checkpoint_path: "/d/\\303\\251t\\303\\251/ckpt-1"\n')
    assert state.model_checkpoint_path == "/d/\u00e9t\u00e9/ckpt-1"


def test_tf_test_file_with_indentation_and_dot_slash():
    # Literal from TensorFlow's checkpoint_management_test.py (testCheckPointCompletesRelativePaths).
    state = cm.parse_checkpoint_state(
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
    assert cm.format_checkpoint_state(CheckpointState("m", ["m"], [], 0.0)) == (
        'model_checkpoint_path: "m"\nall_model_checkpoint_paths: "m"\n'
    )
    assert cm.format_checkpoint_state(CheckpointState()) == ""


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
    assert cm.parse_checkpoint_state(text) == expected


def test_nan_timestamp_parses():
    state = cm.parse_checkpoint_state("all_model_checkpoint_timestamps: nan last_preserved_timestamp: -NaN")
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
        cm.parse_checkpoint_state(text)


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
    assert cm.parse_checkpoint_state(cm.format_checkpoint_state(state)) == state


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
        state = cm.parse_checkpoint_state(text)
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
        state = cm.get_checkpoint_state(tmp_path)
    except ValueError as exc:
        # The one documented error: the file parses but names no model checkpoint path.
        assert str(exc) == f"Invalid checkpoint state loaded from {tmp_path}"
        assert cm.parse_checkpoint_state(data.decode("utf-8")).model_checkpoint_path == ""
        return
    if state is not None:
        _assert_valid_state(state)
        assert state.model_checkpoint_path
    assert cm.latest_checkpoint(tmp_path) is None  # no checkpoint exists, whatever the file says


def test_latest_checkpoint_of_an_unlookupable_path_is_none(tmp_path, caplog):
    write_state(tmp_path, 'model_checkpoint_path: "' + "n" * 300 + '"\n')  # longer than any file name
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        assert cm.latest_checkpoint(tmp_path) is None
    assert any(r.levelno == logging.ERROR and "Couldn't match files" in r.getMessage() for r in caplog.records)


def test_oversized_state_file_is_refused_with_a_warning(tmp_path, caplog):
    write_state(tmp_path, b'model_checkpoint_path: "a"\n' + b" " * cm.MAX_STATE_FILE_BYTES)
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        assert cm.get_checkpoint_state(tmp_path) is None
    assert any("larger than" in r.getMessage() for r in caplog.records)
    assert any("Checkpoint ignored" in r.getMessage() for r in caplog.records)


def test_non_utf8_state_file_is_refused_with_a_warning(tmp_path, caplog):
    write_state(tmp_path, b'model_checkpoint_path: "\xff"\n')
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        assert cm.get_checkpoint_state(tmp_path) is None
    assert any("not valid UTF-8" in r.getMessage() for r in caplog.records)


def test_get_checkpoint_state_joins_only_relative_paths(tmp_path):
    write_state(tmp_path, 'model_checkpoint_path: "/elsewhere/m-1"\nall_model_checkpoint_paths: "sub/m-0"\n')
    state = cm.get_checkpoint_state(pathlib.Path(tmp_path))
    assert state.model_checkpoint_path == "/elsewhere/m-1"
    # Reading never appends the model path: the lists are what the file says, joined.
    assert state.all_model_checkpoint_paths == [os.path.join(str(tmp_path), "sub/m-0")]


# ---------------------------------------------------------------- writing the file


def read_text(directory, name="checkpoint") -> str:
    with open(os.path.join(str(directory), name), encoding="utf-8") as handle:
        return handle.read()


def test_update_writes_tf_text_with_paths_relative_to_the_directory(tmp_path):
    cm.update_checkpoint_state(tmp_path, tmp_path / "ckpt-10")
    assert read_text(tmp_path) == TF_SAVE


def test_update_stores_paths_outside_the_directory_absolute(tmp_path):
    outside = tmp_path.parent / "elsewhere" / "ckpt-1"
    cm.update_checkpoint_state(
        str(tmp_path), str(tmp_path / "sub" / "ckpt-2"), [str(outside), str(tmp_path / "sub" / "ckpt-2")]
    )
    assert read_text(tmp_path) == (
        'model_checkpoint_path: "sub/ckpt-2"\n'
        f'all_model_checkpoint_paths: "{outside}"\n'
        'all_model_checkpoint_paths: "sub/ckpt-2"\n'
    )
    state = cm.get_checkpoint_state(tmp_path)
    assert state.all_model_checkpoint_paths == [str(outside), os.path.join(str(tmp_path), "sub/ckpt-2")]


def test_update_resolves_relative_arguments_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cm.update_checkpoint_state("run", "run/ckpt-3")
    assert read_text(tmp_path / "run") == 'model_checkpoint_path: "ckpt-3"\nall_model_checkpoint_paths: "ckpt-3"\n'
    assert cm.get_checkpoint_state("run").model_checkpoint_path == os.path.join("run", "ckpt-3")


def test_update_appends_the_model_path_when_not_last(tmp_path):
    cm.update_checkpoint_state(tmp_path, tmp_path / "c-2", [str(tmp_path / "c-1")], all_model_checkpoint_timestamps=None)
    assert cm.get_checkpoint_state(tmp_path).all_model_checkpoint_paths == [
        str(tmp_path / "c-1"),
        str(tmp_path / "c-2"),
    ]


def test_update_writes_timestamps_and_preserved_timestamp(tmp_path):
    cm.update_checkpoint_state(
        tmp_path,
        tmp_path / "ckpt-2",
        [tmp_path / "ckpt-1", tmp_path / "ckpt-2"],
        all_model_checkpoint_timestamps=[1700000000.123456, 1700000600.5],
        last_preserved_timestamp=1699999999.0,
    )
    assert read_text(tmp_path) == TF_MANAGER


def test_update_rejects_timestamps_not_matching_paths(tmp_path):
    with pytest.raises(ValueError, match="Checkpoint timestamps, if provided, must match checkpoint paths"):
        cm.update_checkpoint_state(tmp_path, tmp_path / "c-1", [tmp_path / "c-1"], all_model_checkpoint_timestamps=[1.0, 2.0])
    assert not os.path.exists(tmp_path / "checkpoint")


def test_update_rejects_the_state_file_as_model_path(tmp_path):
    target = str(tmp_path / "checkpoint")
    message = f"Save path '{target}' conflicts with path used for checkpoint state.  Please use a different save path."
    with pytest.raises(RuntimeError, match=re.escape(message)):
        cm.update_checkpoint_state(tmp_path, target)
    with pytest.raises(RuntimeError, match="conflicts with path used for checkpoint state"):
        cm.update_checkpoint_state(tmp_path, tmp_path / "state", latest_filename="state")


def test_update_rejects_an_empty_model_path(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        cm.update_checkpoint_state(tmp_path, "")


def test_update_creates_the_directory_and_honours_latest_filename(tmp_path):
    directory = tmp_path / "new" / "dir"
    cm.update_checkpoint_state(directory, directory / "m-1", latest_filename="my_state")
    assert read_text(directory, "my_state") == 'model_checkpoint_path: "m-1"\nall_model_checkpoint_paths: "m-1"\n'
    assert cm.get_checkpoint_state(directory) is None
    assert cm.get_checkpoint_state(directory, "my_state").model_checkpoint_path == str(directory / "m-1")


def test_update_replaces_atomically_and_leaves_no_temporary_files(tmp_path):
    cm.update_checkpoint_state(tmp_path, tmp_path / "c-1")
    before = os.stat(tmp_path / "checkpoint").st_ino
    cm.update_checkpoint_state(tmp_path, tmp_path / "c-2")
    # A rename installs a new inode; an in-place rewrite would keep the old one (and be tearable).
    assert os.stat(tmp_path / "checkpoint").st_ino != before
    assert sorted(os.listdir(tmp_path)) == [".checkpoint.lock", "checkpoint"]
    assert cm.get_checkpoint_state(tmp_path).model_checkpoint_path == str(tmp_path / "c-2")


def test_failed_write_keeps_the_old_state_and_removes_the_temporary_file(tmp_path):
    cm.update_checkpoint_state(tmp_path, tmp_path / "c-1")
    with pytest.raises(UnicodeEncodeError):
        cm.update_checkpoint_state(tmp_path, tmp_path / "c-\udcff")  # not encodable: the write fails
    assert read_text(tmp_path) == 'model_checkpoint_path: "c-1"\nall_model_checkpoint_paths: "c-1"\n'
    assert sorted(os.listdir(tmp_path)) == [".checkpoint.lock", "checkpoint"]


# ---------------------------------------------------------------- the cross-process lock


def test_state_writes_wait_for_the_documented_lock_file(tmp_path):
    import fcntl
    import threading

    lock_path = tmp_path / ".checkpoint.lock"
    with open(lock_path, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # what another process's read-modify-write holds
        writer = threading.Thread(target=cm.update_checkpoint_state, args=(tmp_path, tmp_path / "c-1"))
        writer.start()
        writer.join(0.3)
        blocked = writer.is_alive()
        written_while_held = os.path.exists(tmp_path / "checkpoint")
        fcntl.flock(held, fcntl.LOCK_UN)
    writer.join()
    assert blocked and not written_while_held
    assert cm.get_checkpoint_state(tmp_path).model_checkpoint_path == str(tmp_path / "c-1")


def test_lock_file_follows_latest_filename(tmp_path):
    cm.update_checkpoint_state(tmp_path, tmp_path / "c-1", latest_filename="state")
    assert sorted(os.listdir(tmp_path)) == [".state.lock", "state"]


# ---------------------------------------------------------------- CheckpointManager

import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

import numpy as np  # noqa: E402

import asyncckpt as ac  # noqa: E402
from asyncckpt import pipeline  # noqa: E402
from asyncckpt._runtime import get_runtime  # noqa: E402
from asyncckpt.format import index_path  # noqa: E402
from asyncckpt.storage import default_storage  # noqa: E402

from _fakes import FailingStorage, GatedStorage  # noqa: E402

V_KEY = "v/.ATTRIBUTES/VARIABLE_VALUE"


def committed_on_disk(prefix: str) -> bool:
    """Whether ``P.index`` exists, looked up without waiting for pending writes."""
    return os.path.exists(index_path(prefix))


def state_on_disk(directory) -> CheckpointState | None:
    """The state file as it is on disk right now, without waiting for pending writes."""
    path = os.path.join(str(directory), "checkpoint")
    if not os.path.exists(path):
        return None
    return cm.parse_checkpoint_state(read_text(directory))


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_to_keep": 1.5}, ValueError, "got 1.5."),
        ({"max_to_keep": True}, ValueError, "got True."),
        ({"max_to_keep": 2, "keep_checkpoint_every_n_hours": -1}, ValueError, "keep_checkpoint_every_n_hours"),
        ({"max_to_keep": 2, "step_counter": 0, "checkpoint_interval": -1}, ValueError, "checkpoint_interval"),
        ({"max_to_keep": 2, "checkpoint_name": ""}, ValueError, "checkpoint_name"),
        ({"max_to_keep": 2, "init_fn": 3}, TypeError, "init_fn"),
    ],
)
def test_manager_rejects_bad_arguments(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        cm.CheckpointManager(ac.Checkpoint(), tmp_path, **kwargs)


def test_manager_rejects_a_non_checkpoint_and_leaves_the_counter_uncreated(tmp_path):
    with pytest.raises(TypeError, match="must be an asyncckpt.Checkpoint"):
        cm.CheckpointManager(ac.Variable(np.zeros(2)), tmp_path, max_to_keep=1)
    checkpoint = ac.Checkpoint(v=ac.Variable(np.zeros(2)))
    cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=1)
    keys = [key for key, _ in ac.list_variables(checkpoint.write(str(tmp_path / "w")))]
    assert V_KEY in keys and "save_counter/.ATTRIBUTES/VARIABLE_VALUE" not in keys


def test_manager_accepts_numpy_integers_and_rejects_non_integer_numbers(tmp_path):
    manager = cm.CheckpointManager(ac.Checkpoint(), tmp_path, max_to_keep=np.int64(2))
    assert manager.save(checkpoint_number=np.int32(4)).endswith("ckpt-4")
    with pytest.raises(TypeError, match="checkpoint_number"):
        manager.save(checkpoint_number=4.0)
    with pytest.raises(TypeError, match="checkpoint_number"):
        manager.save(checkpoint_number=ac.Variable(np.float32(4)))


def test_injected_clock_drives_timestamps_and_preservation(tmp_path):
    clock = Clock(1000.0)
    manager = cm.CheckpointManager(
        ac.Checkpoint(), tmp_path, max_to_keep=1, keep_checkpoint_every_n_hours=1.0, clock=clock
    )
    clock.now = 1000.0 + 3600.0
    first = manager.save()
    clock.now += 60.0
    second = manager.save()
    state = cm.get_checkpoint_state(tmp_path)
    assert state.all_model_checkpoint_timestamps == [4660.0]
    assert state.last_preserved_timestamp == 4600.0  # first was preserved, not deleted
    assert ac.checkpoint_exists(first) and manager.checkpoints == [second]


def test_hostile_state_file_makes_a_fresh_manager(tmp_path, caplog):
    write_state(tmp_path, b"model_checkpoint_path: {}\n")
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        manager = cm.CheckpointManager(ac.Checkpoint(), tmp_path, max_to_keep=2)
    assert manager.latest_checkpoint is None and manager.checkpoints == []
    assert any("Checkpoint ignored" in r.getMessage() for r in caplog.records)
    path = manager.save()
    assert cm.latest_checkpoint(tmp_path) == path


def test_nan_preserved_timestamp_keeps_every_recorded_checkpoint(tmp_path, caplog):
    checkpoint = ac.Checkpoint()
    kept = [checkpoint.write(str(tmp_path / f"ckpt-{n}")) for n in (1, 2)]
    write_state(
        tmp_path,
        'model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-1"\nall_model_checkpoint_paths: "ckpt-2"\n'
        "all_model_checkpoint_timestamps: 1.0\nall_model_checkpoint_timestamps: 2.0\nlast_preserved_timestamp: nan\n",
    )
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        manager = cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=1, clock=Clock(100.0))
    assert any("nan" in r.getMessage() for r in caplog.records)
    assert manager.checkpoints == []
    newest = manager.save(checkpoint_number=3)
    assert all(ac.checkpoint_exists(p) for p in kept)
    assert cm.get_checkpoint_state(tmp_path) == CheckpointState(newest, [newest], [100.0], 100.0)


def test_user_callbacks_run_before_bookkeeping_and_deletion_follows_commit(tmp_path):
    manager = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.zeros(3))), tmp_path, max_to_keep=1)
    first = manager.save()
    seen = []

    def callback(path):
        # The new checkpoint is durable, the old one is not deleted yet, the state file is unchanged.
        seen.append((path, committed_on_disk(path), committed_on_disk(first), state_on_disk(tmp_path).model_checkpoint_path))

    options = ac.CheckpointOptions(experimental_write_callbacks=[callback])
    second = manager.save(options=options)
    assert seen == [(second, True, True, "ckpt-1")]
    assert options.experimental_write_callbacks == [callback]  # the caller's options are not mutated
    assert not ac.checkpoint_exists(first)
    final = state_on_disk(tmp_path)
    assert (final.model_checkpoint_path, final.all_model_checkpoint_paths) == ("ckpt-2", ["ckpt-2"])


def test_manager_properties_read_inside_a_write_callback_do_not_deadlock(tmp_path):
    checkpoint = ac.Checkpoint(v=ac.Variable(np.zeros(3)))
    manager = cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=2)
    first = manager.save()
    seen = []
    options = ac.CheckpointOptions(
        enable_async=True, experimental_write_callbacks=[lambda: seen.append(manager.latest_checkpoint)]
    )
    second = manager.save(options=options)
    manager.sync()
    assert seen == [first]  # the callback ran before the bookkeeping of its own save
    assert manager.latest_checkpoint == second


# ---------------------------------------------------------------- asynchronous saves


@pytest.fixture
def gated():
    return GatedStorage(default_storage(), get_runtime())


def async_options(storage=None):
    settings = ac.WriteSettings(storage=storage) if storage is not None else None
    return ac.CheckpointOptions(enable_async=True, write_settings=settings)


def test_async_save_bookkeeping_waits_for_durable_data(tmp_path, gated):
    variable = ac.Variable(np.arange(4, dtype=np.float32))
    checkpoint = ac.Checkpoint(v=variable)
    manager = cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=1)
    first = manager.save()
    second = manager.save(options=async_options(gated))
    # save() returned: the counter moved, but nothing of the second checkpoint is durable yet.
    assert second.endswith("ckpt-2") and checkpoint.save_counter.numpy() == 2
    gated.reached.wait()
    assert pipeline.has_pending_writes(second)
    assert not committed_on_disk(second) and committed_on_disk(first)
    assert state_on_disk(tmp_path).model_checkpoint_path == "ckpt-1"
    variable.assign(np.zeros(4, np.float32))  # after the snapshot: not in the checkpoint
    gated.open_gate()
    assert manager.latest_checkpoint == second  # waits for the save's bookkeeping
    assert manager.checkpoints == [second]
    assert not committed_on_disk(first)
    assert state_on_disk(tmp_path).all_model_checkpoint_paths == ["ckpt-2"]
    np.testing.assert_array_equal(ac.load_variable(second, V_KEY), np.arange(4, dtype=np.float32))


def test_restore_or_initialize_waits_for_a_pending_first_save(tmp_path, gated):
    variable = ac.Variable(np.float32(5.0))
    checkpoint = ac.Checkpoint(v=variable)
    init_calls = []
    manager = cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=2, init_fn=lambda: init_calls.append(1))
    path = manager.save(options=async_options(gated))
    gated.reached.wait()
    variable.assign(np.float32(-1.0))
    result = []
    worker = threading.Thread(target=lambda: result.append(manager.restore_or_initialize()))
    worker.start()
    worker.join(0.2)
    assert worker.is_alive() and result == []  # blocked on the pending save, not initialising
    gated.open_gate()
    worker.join()
    assert result == [path] and init_calls == []
    assert variable.numpy() == 5.0


def test_async_saves_number_from_the_one_save_counter(tmp_path):
    checkpoint = ac.Checkpoint(v=ac.Variable(np.zeros(2)))
    manager = cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=2)
    paths = [manager.save(options=async_options()) for _ in range(4)]
    assert [os.path.basename(p) for p in paths] == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4"]
    assert manager.checkpoints == paths[2:]
    assert cm.latest_checkpoint(tmp_path) == paths[-1] == manager.latest_checkpoint
    assert [ac.checkpoint_exists(p) for p in paths] == [False, False, True, True]
    assert checkpoint.save_counter.numpy() == 4


def test_failed_async_save_leaves_state_and_old_checkpoints(tmp_path):
    checkpoint = ac.Checkpoint(v=ac.Variable(np.zeros(2)))
    manager = cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=1)
    first = manager.save()
    failed = manager.save(options=async_options(FailingStorage(default_storage(), fail_on=1)))
    # Neither waiting property hangs on the failed save, nor reports it.
    assert manager.latest_checkpoint == first and manager.checkpoints == [first]
    with pytest.raises(OSError, match="No space left on device"):
        manager.sync()
    assert not ac.checkpoint_exists(failed) and ac.checkpoint_exists(first)
    assert cm.latest_checkpoint(tmp_path) == first
    third = manager.save()
    assert manager.checkpoints == [third] and not ac.checkpoint_exists(first)


def test_failed_sync_save_records_nothing(tmp_path):
    checkpoint = ac.Checkpoint(v=ac.Variable(np.zeros(2)))
    manager = cm.CheckpointManager(checkpoint, tmp_path, max_to_keep=1)
    first = manager.save()
    options = ac.CheckpointOptions(write_settings=ac.WriteSettings(storage=FailingStorage(default_storage(), 1)))
    with pytest.raises(OSError):
        manager.save(options=options)
    assert manager.latest_checkpoint == first and manager.checkpoints == [first]
    assert cm.latest_checkpoint(tmp_path) == first


# ---------------------------------------------------------------- several managers, one directory


def test_two_managers_keep_each_others_entries(tmp_path):
    a = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.zeros(2))), tmp_path, max_to_keep=2, checkpoint_name="a")
    b = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.ones(2))), tmp_path, max_to_keep=2, checkpoint_name="b")
    saved = []
    for _ in range(4):
        saved.append(a.save())
        saved.append(b.save())
    kept = [p for p in saved if ac.checkpoint_exists(p)]
    assert [os.path.basename(p) for p in kept] == ["a-3", "b-3", "a-4", "b-4"]
    state = cm.get_checkpoint_state(tmp_path)
    assert state.all_model_checkpoint_paths == kept  # the union, oldest first, nothing deleted listed
    assert state.model_checkpoint_path == cm.latest_checkpoint(tmp_path) == saved[-1]
    assert a.checkpoints == kept[0::2] and b.checkpoints == kept[1::2]
    # A later manager adopts both sets and keeps the newest two of them.
    c = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.ones(2))), tmp_path, max_to_keep=2)
    assert c.checkpoints == kept
    newest = c.save()
    assert cm.get_checkpoint_state(tmp_path).all_model_checkpoint_paths == [kept[-1], newest]


def test_checkpoints_deleted_by_another_manager_are_forgotten(tmp_path):
    a = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.zeros(2))), tmp_path, max_to_keep=3, checkpoint_name="a")
    a1 = a.save()
    # b adopts a-1 (it is in the state file) and deletes it when it needs the room.
    b = cm.CheckpointManager(ac.Checkpoint(v=ac.Variable(np.ones(2))), tmp_path, max_to_keep=1, checkpoint_name="b")
    assert b.checkpoints == [a1]
    b1 = b.save()
    assert not ac.checkpoint_exists(a1)
    a2 = a.save()
    assert a.checkpoints == [a2]  # a-1 is gone and no longer listed anywhere
    assert cm.get_checkpoint_state(tmp_path).all_model_checkpoint_paths == [b1, a2]


_WORKER = """
import os, sys, time
import numpy as np
import asyncckpt as ac

directory, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
variable = ac.Variable(np.zeros(64, np.float32))
manager = ac.CheckpointManager(ac.Checkpoint(v=variable), directory, max_to_keep=2, checkpoint_name=name)
open(os.path.join(directory, "ready-" + name), "w").close()
while not os.path.exists(os.path.join(directory, "go")):
    time.sleep(0.002)
for step in range(count):
    variable.assign(np.full(64, step, np.float32))
    manager.save(options=ac.CheckpointOptions(enable_async=step % 2 == 1))
manager.sync()
print(",".join(manager.checkpoints))
"""


def test_two_processes_share_one_directory(tmp_path):
    directory, count, names = str(tmp_path), 12, ("w0", "w1")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, directory, name, str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    # Both managers are built on the empty directory before either saves, so neither adopts
    # (and may delete) the other's checkpoints.
    while not all(os.path.exists(os.path.join(directory, "ready-" + name)) for name in names):
        assert all(worker.poll() is None for worker in workers), [w.communicate() for w in workers]
        threading.Event().wait(0.005)
    open(os.path.join(directory, "go"), "w").close()
    outputs = [worker.communicate() for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs

    own = {name: out.strip().split(",") for name, (out, _) in zip(names, outputs)}
    for name in names:
        assert own[name] == [os.path.join(directory, f"{name}-{n}") for n in (count - 1, count)]
    existing = sorted(f[: -len(".index")] for f in os.listdir(directory) if f.endswith(".index"))
    assert existing == sorted(os.path.basename(p) for paths in own.values() for p in paths)
    state = cm.get_checkpoint_state(directory)
    # Every surviving checkpoint is listed, nothing deleted is, oldest first, latest last.
    assert sorted(os.path.basename(p) for p in state.all_model_checkpoint_paths) == existing
    assert state.all_model_checkpoint_timestamps == sorted(state.all_model_checkpoint_timestamps)
    assert state.model_checkpoint_path == state.all_model_checkpoint_paths[-1]
    assert cm.latest_checkpoint(directory) == state.model_checkpoint_path
    for path in state.all_model_checkpoint_paths:
        np.testing.assert_array_equal(ac.load_variable(path, V_KEY), np.full(64, int(path.rsplit("-", 1)[1]) - 1))
