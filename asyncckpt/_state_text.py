"""The text codec of the ``checkpoint`` state file: TensorFlow's ``CheckpointState`` text format.

Pure: strings in, :class:`CheckpointState` out, and back, byte for byte as TensorFlow writes them.
The text is untrusted input, parsed by hand with a strict grammar for exactly these four fields
(no protobuf dependency, nothing evaluated)::

    model_checkpoint_path: "ckpt-10"
    all_model_checkpoint_paths: "ckpt-9"
    all_model_checkpoint_paths: "ckpt-10"
    all_model_checkpoint_timestamps: 1700000000.25
    all_model_checkpoint_timestamps: 1700000600.5
    last_preserved_timestamp: 1699999999.0

Reading and writing the file (atomically, under a lock) is :mod:`asyncckpt.state_file`'s job.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterator

__all__ = ["CheckpointState", "CheckpointStateParseError", "format_checkpoint_state", "parse_checkpoint_state"]




@dataclasses.dataclass(frozen=True)
class CheckpointState:
    """The contents of a ``checkpoint`` state file (TensorFlow's ``CheckpointState`` proto).

    Attributes
    ----------
    model_checkpoint_path : str
        Prefix of the most recent checkpoint.
    all_model_checkpoint_paths : list of str
        Prefixes of the checkpoints a manager still tracks, oldest first; the last one is
        ``model_checkpoint_path``.
    all_model_checkpoint_timestamps : list of float
        Seconds since the epoch at which each path in ``all_model_checkpoint_paths`` was
        recorded. Empty for state written by `asyncckpt.Checkpoint.save` (unmanaged paths).
    last_preserved_timestamp : float
        When the manager last preserved a checkpoint because of
        ``keep_checkpoint_every_n_hours``; ``0.0`` when the file does not say.
    """

    model_checkpoint_path: str = ""
    all_model_checkpoint_paths: list = dataclasses.field(default_factory=list)
    all_model_checkpoint_timestamps: list = dataclasses.field(default_factory=list)
    last_preserved_timestamp: float = 0.0


class CheckpointStateParseError(ValueError):
    """The text of a state file does not follow the ``CheckpointState`` text-format grammar."""


_STRING_FIELDS = ("model_checkpoint_path", "all_model_checkpoint_paths")
_REPEATED_FIELDS = ("all_model_checkpoint_paths", "all_model_checkpoint_timestamps")
_FIELD_ORDER = (
    "model_checkpoint_path",
    "all_model_checkpoint_paths",
    "all_model_checkpoint_timestamps",
    "last_preserved_timestamp",
)

# One token at a time; anything that matches none of these is a syntax error. Whitespace is ASCII
# only, strings may not span lines, and numbers follow the text-format float grammar (an optional
# minus, decimal or exponent notation without a leading zero, an optional ``f`` suffix, or
# inf/infinity/nan).
_TOKEN_RE = re.compile(
    r"""
      (?P<space>[ \t\r\n\f\v]+)
    | (?P<comment>\#[^\n]*)
    | (?P<string>"(?:[^"\\\n]|\\[^\n])*"|'(?:[^'\\\n]|\\[^\n])*')
    | (?P<number>-?(?:(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[fF]?
                     |(?i:inf(?:inity)?f?|nanf?)))
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<punct>[:\[\],;])
    """,
    re.VERBOSE,
)
_SPECIAL_FLOAT_RE = re.compile(r"(-?)(?:(inf(?:inity)?)|nan)f?", re.IGNORECASE)
_SIMPLE_ESCAPES = {
    "a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11,
    "\\": 92, "'": 39, '"': 34, "?": 63,
}  # fmt: skip
_OCTAL_RE = re.compile(r"[0-7]{1,3}")
_HEX_RE = re.compile(r"x([0-9A-Fa-f]{1,2})")


def _tokenize(text: str) -> Iterator[tuple[str, str, int]]:
    pos = 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise CheckpointStateParseError(f"unexpected character {text[pos]!r} at offset {pos}")
        kind = match.lastgroup
        if kind not in ("space", "comment"):
            yield kind, match.group(), pos
        pos = match.end()


def _unescape(literal: str, offset: int) -> str:
    """Decode one quoted string token the way protobuf's text format does (C escapes, UTF-8)."""
    body = literal[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        char = body[i]
        if char != "\\":
            out += char.encode("utf-8", "surrogatepass")
            i += 1
            continue
        nxt = body[i + 1]  # the token grammar guarantees a character after a backslash
        if nxt in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[nxt])
            i += 2
        elif (octal := _OCTAL_RE.match(body, i + 1)) is not None:
            value = int(octal.group(), 8)
            if value > 0xFF:
                raise CheckpointStateParseError(f"octal escape \\{octal.group()} out of range at offset {offset}")
            out.append(value)
            i = octal.end()
        elif (hexa := _HEX_RE.match(body, i + 1)) is not None:
            out.append(int(hexa.group(1), 16))
            i = hexa.end()
        else:
            raise CheckpointStateParseError(f"invalid escape \\{nxt} in string at offset {offset}")
    try:
        value = out.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointStateParseError(f"string at offset {offset} is not valid UTF-8") from exc
    if "\x00" in value:
        # No file system accepts NUL in a path; refusing it here keeps every later os call safe.
        raise CheckpointStateParseError(f"string at offset {offset} contains a NUL character")
    return value


def _parse_float(token: str, offset: int) -> float:
    special = _SPECIAL_FLOAT_RE.fullmatch(token)
    if special is not None:
        if special.group(2) is None:
            return math.nan
        return -math.inf if special.group(1) else math.inf
    try:
        return float(token.rstrip("fF"))
    except ValueError:  # pragma: no cover - the token regex only admits valid floats
        raise CheckpointStateParseError(f"invalid number {token!r} at offset {offset}") from None


def parse_checkpoint_state(text: str) -> CheckpointState:
    """Parse the text format of a ``CheckpointState`` proto, exactly as stored on disk.

    Accepts what protobuf's text-format parser accepts for this message: fields in any order,
    ``#`` comments, optional ``,``/``;`` separators, single or double quotes, adjacent string
    literals concatenated, C escapes (``\\n``, ``\\"``, ``\\\\``, octal ``\\NNN``, hex ``\\xHH``),
    ``[a, b]`` lists for repeated fields, and a repeated singular field keeping its last value
    (``text_format.Merge`` semantics). Paths are returned as written (not joined with a
    directory), and nothing is checked beyond syntax.

    Parameters
    ----------
    text : str
        The file contents.

    Returns
    -------
    CheckpointState

    Raises
    ------
    CheckpointStateParseError
        On any unknown field, syntax error, bad escape, non-UTF-8 string or NUL in a path.
    """
    tokens = list(_tokenize(text))
    values: dict[str, Any] = {
        "model_checkpoint_path": "",
        "all_model_checkpoint_paths": [],
        "all_model_checkpoint_timestamps": [],
        "last_preserved_timestamp": 0.0,
    }
    pos = 0

    def peek() -> tuple[str, str, int] | None:
        return tokens[pos] if pos < len(tokens) else None

    def take(kind: str | None = None, text_: str | None = None) -> tuple[str, str, int]:
        nonlocal pos
        token = peek()
        if token is None:
            raise CheckpointStateParseError(f"unexpected end of input (expected {text_ or kind})")
        if (kind is not None and token[0] != kind) or (text_ is not None and token[1] != text_):
            raise CheckpointStateParseError(f"unexpected {token[1]!r} at offset {token[2]} (expected {text_ or kind})")
        pos += 1
        return token

    def take_value(field: str) -> Any:
        if field in _STRING_FIELDS:
            first = take("string")
            parts = [_unescape(first[1], first[2])]
            while (token := peek()) is not None and token[0] == "string":
                take()
                parts.append(_unescape(token[1], token[2]))
            return "".join(parts)
        token = peek()
        if token is not None and token[0] == "ident" and _SPECIAL_FLOAT_RE.fullmatch(token[1]):
            take()
            return _parse_float(token[1], token[2])
        token = take("number")
        return _parse_float(token[1], token[2])

    while peek() is not None:
        _, name, offset = take("ident")
        if name not in values:
            raise CheckpointStateParseError(f"unknown field {name!r} at offset {offset}")
        take("punct", ":")
        if name in _REPEATED_FIELDS and (token := peek()) is not None and token[1] == "[":
            take()
            if (token := peek()) is not None and token[1] == "]":
                take()
            else:
                values[name].append(take_value(name))
                while (token := peek()) is not None and token[1] == ",":
                    take()
                    values[name].append(take_value(name))
                take("punct", "]")
        elif name in _REPEATED_FIELDS:
            values[name].append(take_value(name))
        else:
            values[name] = take_value(name)
        if (token := peek()) is not None and token[1] in (",", ";"):
            take()
    return CheckpointState(**values)


_ESCAPES = {i: f"\\{i:03o}" for i in [*range(32), 127]}
_ESCAPES.update({9: r"\t", 10: r"\n", 13: r"\r", 34: r"\"", 39: r"\'", 92: r"\\"})


def _escape(value: str) -> str:
    """C-escape a string as current protobuf releases do in text format (``as_utf8=True``).

    ASCII control characters become octal escapes and non-ASCII characters stay as they are;
    older protobuf releases wrote the UTF-8 bytes of non-ASCII characters as octal escapes,
    which `parse_checkpoint_state` reads as well.
    """
    return value.translate(_ESCAPES)


def format_checkpoint_state(state: CheckpointState) -> str:
    """Render a `CheckpointState` exactly as ``text_format.MessageToString`` renders the proto.

    Fields come in field-number order, one per line; proto3 defaults (an empty model path, a
    zero ``last_preserved_timestamp``) are omitted; doubles use Python's shortest round-trip
    ``str``; strings are C-escaped (see `_escape`).
    """
    lines = []
    for name in _FIELD_ORDER:
        value = getattr(state, name)
        items = value if name in _REPEATED_FIELDS else [value]
        for item in items:
            if name in _STRING_FIELDS:
                if name not in _REPEATED_FIELDS and item == "":
                    continue
                lines.append(f'{name}: "{_escape(item)}"\n')
            else:
                item = float(item)
                if name not in _REPEATED_FIELDS and item == 0.0 and math.copysign(1.0, item) > 0:
                    continue
                lines.append(f"{name}: {item!s}\n")
    return "".join(lines)
