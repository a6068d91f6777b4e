"""Typed JSON for the non-array parts of framework state (optimizer hyperparameters, scheduler counters).

``state_dict()`` values mix arrays with Python data: ints, floats (``nan``, ``inf``, ``-0.0``),
strings, ``None``, tuples, dicts with integer keys. Plain JSON loses half of that (tuples become
lists, integer keys become strings, ``nan`` is not JSON), and pickle would run code on load. This
codec keeps every type exactly and reads back nothing but data:

* ``str``, ``bool``, ``int`` and ``None`` are themselves;
* every other value is a one-key object naming its type: ``{"float": "0x1.8p+1"}`` (``float.hex``,
  exact), ``{"list": [...]}``, ``{"tuple": [...]}``, ``{"dict": [[key, value], ...]}`` (keys
  typed too, order kept), and the references the adapters put in place of arrays:
  ``{"array": attribute}`` (with ``"kind": "torch"`` or ``"jax"`` for a framework's array),
  ``{"prng_key": attribute, "impl": name}``.

Since every JSON object in the document is such a tag, user data can never be mistaken for one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ArrayRef", "PrngKeyRef", "encode", "decode", "dumps", "loads", "path_text"]

#: Most nesting levels a document may have (a hostile file must not exhaust the stack).
MAX_DEPTH = 64


class ArrayRef(str):
    """The attribute name an array leaf is stored under, standing in the structure for the array.

    ``kind`` names the array type to rebuild where the live state has no leaf to follow
    (``"torch"``, ``"jax"``; empty for NumPy).
    """

    kind: str

    def __new__(cls, name: str, kind: str = "") -> "ArrayRef":
        ref = super().__new__(cls, name)
        ref.kind = kind
        return ref


class PrngKeyRef(str):
    """The attribute name of a typed PRNG key's key data; ``impl`` names the key's implementation."""

    impl: str

    def __new__(cls, name: str, impl: str) -> "PrngKeyRef":
        ref = super().__new__(cls, name)
        ref.impl = impl
        return ref


def path_text(path: tuple) -> str:
    """``("state", 0, "exp_avg")`` → ``"state.0.exp_avg"``, for names and messages."""
    return ".".join(str(part) for part in path) or "(the root)"


#: Python's own limit on the digits of an integer it reads back from text (``sys.get_int_max_str_digits``).
_MAX_INT_BITS = 14_000


def encode(value: Any, where: tuple = (), depth: int = 0) -> Any:
    """The JSON-ready form of ``value``; ``TypeError`` naming its path ``where`` for anything that is not data.

    Nesting is counted as :func:`decode` counts it (keys included): what a save writes, a restore reads.
    """
    kind = type(value)
    if value is None or kind is str or kind is bool:
        return value
    if kind is int:
        if value.bit_length() > _MAX_INT_BITS:
            raise TypeError(f"cannot store the integer at {path_text(where)}: it has more than 4,000 digits")
        return value
    if depth > MAX_DEPTH:
        raise ValueError(f"the state is nested more than {MAX_DEPTH} levels deep at {path_text(where)}")
    if kind is ArrayRef:
        return {"array": str(value), "kind": value.kind} if value.kind else {"array": str(value)}
    if kind is float:
        return {"float": value.hex()}
    if kind is dict or isinstance(value, Mapping):
        return {"dict": [[encode(key, (*where, "(a key)"), depth + 1), encode(item, (*where, key), depth + 1)]
                         for key, item in value.items()]}
    if kind is list or kind is tuple or isinstance(value, (list, tuple)):
        name = "tuple" if isinstance(value, tuple) else "list"
        return {name: [encode(item, (*where, index), depth + 1) for index, item in enumerate(value)]}
    if kind is PrngKeyRef:
        return {"prng_key": str(value), "impl": value.impl}
    number = _python_number(value)
    if number is not None:
        return encode(number, where, depth)
    raise TypeError(
        f"cannot store a value of type {kind.__module__}.{kind.__qualname__} at {path_text(where)}: "
        "checkpoints hold arrays and plain data (numbers, strings, None, lists, tuples, dicts), never pickled "
        "objects; convert it in state_dict() or keep it in a PythonState"
    )


def _python_number(value: Any) -> int | float | bool | None:
    """NumPy scalars (and other 0-d numbers with ``item()``) as the Python number they hold."""
    item = getattr(value, "item", None)
    if item is None or getattr(value, "ndim", None) != 0 or getattr(value, "dtype", None) is None:
        return None
    result = item()
    return result if type(result) in (int, float, bool) else None


def decode(document: Any, on_ref: Callable[[Any], Any], depth: int = 0) -> Any:
    """The inverse of :func:`encode`; ``on_ref`` turns an ``ArrayRef``/``PrngKeyRef`` into its value."""
    if depth > MAX_DEPTH:
        raise ValueError(f"the structure is nested more than {MAX_DEPTH} levels deep")
    if document is None or type(document) in (str, bool, int):
        return document
    if type(document) is not dict or len(document) not in (1, 2):
        raise ValueError(f"not a typed value: {_preview(document)}")
    if len(document) == 2:
        if not all(isinstance(v, str) for v in document.values()):
            raise ValueError(f"not a typed value: {_preview(document)}")
        if set(document) == {"prng_key", "impl"}:
            return on_ref(PrngKeyRef(document["prng_key"], document["impl"]))
        if set(document) == {"array", "kind"}:
            return on_ref(ArrayRef(document["array"], document["kind"]))
        raise ValueError(f"not a typed value: {_preview(document)}")
    ((kind, body),) = document.items()
    if kind == "float" and isinstance(body, str):
        try:
            return float.fromhex(body)
        except ValueError:
            raise ValueError(f"not a float: {_preview(body)}") from None
    if kind == "array" and isinstance(body, str):
        return on_ref(ArrayRef(body))
    if kind in ("list", "tuple") and type(body) is list:
        items = [decode(item, on_ref, depth + 1) for item in body]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict" and type(body) is list:
        result = {}
        for pair in body:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError(f"not a dict entry: {_preview(pair)}")
            key = decode(pair[0], on_ref, depth + 1)
            try:
                result[key] = decode(pair[1], on_ref, depth + 1)
            except TypeError:  # an unhashable key
                raise ValueError(f"not a valid dict key: {_preview(pair[0])}") from None
        return result
    raise ValueError(f"not a typed value: {_preview(document)}")


def _preview(value: Any) -> str:
    return json.dumps(value)[:80]


def dumps(value: Any) -> bytes:
    """``value`` (with array references in it) as typed JSON bytes."""
    return json.dumps(encode(value), separators=(",", ":"), allow_nan=False).encode("utf-8")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid in typed JSON")


def loads(data: bytes, on_ref: Callable[[Any], Any]) -> Any:
    """The value :func:`dumps` wrote; ``ValueError`` for anything else (never runs code)."""
    try:
        document = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: also an integer too long to read
        raise ValueError(f"the structure is not typed JSON: {exc}") from None
    return decode(document, on_ref)

