"""Which dtypes a checkpoint can hold, and the string its manifest records each one by.

NumPy's own dtypes are recorded by their little-endian type string (``"<f4"``), as ever. The
``ml_dtypes`` types -- bfloat16, the float8/float6/float4 families, int4/uint4/int2/uint2 -- are
recorded by name (``"bfloat16"``): NumPy's type string for them is ambiguous (``"<V2"`` is also
plain 2-byte void), so it could not say which type the bytes are. Sub-byte types are stored as
ml_dtypes holds them, one element per byte. The table is an allowlist: anything else is refused
when saved and, read from a manifest, is an unknown dtype.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "ML_DTYPE_CANDIDATES",
    "ml_dtype_names",
    "storable_dtypes",
    "stored_dtype",
    "dtype_string",
    "dtype_from_string",
    "describe_dtype",
    "check_dtype_supported",
    "integer_limits",
]

_NUMPY_NAMES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
)
#: The ``ml_dtypes`` types a checkpoint can hold, by the name the manifest records (those the
#: installed ml_dtypes has: :func:`ml_dtype_names`).
ML_DTYPE_CANDIDATES = (
    "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz",
    "float8_e4m3", "float8_e3m4", "float8_e8m0fnu", "float4_e2m1fn", "float6_e2m3fn", "float6_e3m2fn",
    "int4", "uint4", "int2", "uint2",
)

# Manifest string -> the little-endian dtype of the stored bytes, and back, for NumPy's own types.
_NUMPY_BY_STRING: dict[str, np.dtype] = {
    np.dtype(name).newbyteorder("<").str: np.dtype(name).newbyteorder("<") for name in _NUMPY_NAMES
}
_NUMPY_STRINGS: dict[np.dtype, str] = {dtype: text for text, dtype in _NUMPY_BY_STRING.items()}


class _MlTable(NamedTuple):
    names: tuple[str, ...]
    by_name: dict[str, np.dtype]
    names_by_dtype: dict[np.dtype, str]
    integers: frozenset
    module: Any


@functools.lru_cache(maxsize=1)
def _ml_table() -> _MlTable:
    """The ml_dtypes half of the table, built on first need.

    Importing ml_dtypes registers its types with NumPy and takes about a second, so it happens
    only when a manifest names one of them or a value has one (then it is imported already).
    """
    import ml_dtypes  # noqa: PLC0415 - see the docstring

    names = tuple(name for name in ML_DTYPE_CANDIDATES if hasattr(ml_dtypes, name))
    by_name = {name: np.dtype(getattr(ml_dtypes, name)) for name in names}
    integers = frozenset(by_name[name] for name in ("int4", "uint4", "int2", "uint2") if name in by_name)
    return _MlTable(names, by_name, {dtype: name for name, dtype in by_name.items()}, integers, ml_dtypes)


def _ml_name(dtype: np.dtype) -> str | None:
    """The manifest name of an ml_dtypes dtype, ``None`` for any other dtype (never imports ml_dtypes)."""
    if "ml_dtypes" not in sys.modules or dtype.type.__module__.partition(".")[0] != "ml_dtypes":
        return None
    return _ml_table().names_by_dtype.get(dtype.newbyteorder("="))


def ml_dtype_names() -> tuple[str, ...]:
    """The ml_dtypes names the installed ml_dtypes provides (imports it)."""
    return _ml_table().names


def storable_dtypes() -> frozenset:
    """Every dtype a checkpoint can store as raw bytes, in native byte order (imports ml_dtypes)."""
    table = _ml_table()
    return frozenset(dtype.newbyteorder("=") for dtype in (*_NUMPY_BY_STRING.values(), *table.by_name.values()))


def _supported() -> str:
    names = ", ".join(ML_DTYPE_CANDIDATES)
    return f"bool, (u)int8-64, float16/32/64, complex64/128 and the ml_dtypes types {names}"


def stored_dtype(dtype: Any) -> np.dtype:
    """The little-endian dtype a value of ``dtype`` is stored as; ``TypeError`` if none is."""
    try:
        little = np.dtype(dtype).newbyteorder("<")
    except TypeError as exc:
        raise TypeError(f"dtype {dtype!r} cannot be stored in a checkpoint") from exc
    if (little in _NUMPY_STRINGS and little.fields is None) or _ml_name(little) is not None:
        return little
    raise TypeError(
        f"dtype {np.dtype(dtype)} cannot be stored in a checkpoint; use a numeric or bool dtype "
        f"({_supported()}); strings and Python objects belong in a PythonState"
    )


def dtype_string(dtype: Any) -> str:
    """The manifest string of ``dtype``: ``"<f4"``, ``"|b1"``, ``"bfloat16"``…; ``TypeError`` if unstorable."""
    little = stored_dtype(dtype)
    return _NUMPY_STRINGS.get(little) or _ml_name(little)


def dtype_from_string(text: Any) -> np.dtype:
    """The dtype a manifest string names; ``ValueError`` for one outside the allowlist."""
    try:
        return _NUMPY_BY_STRING[text]
    except (KeyError, TypeError):
        pass
    if isinstance(text, str) and text in ML_DTYPE_CANDIDATES:
        found = _ml_table().by_name.get(text)
        if found is not None:
            return found
    raise ValueError(f"unknown dtype {text!r}") from None


def describe_dtype(dtype: Any) -> str:
    """``dtype`` in the manifest's spelling, for messages: ``">f4"`` as NumPy writes it, ``"bfloat16"``."""
    dtype = np.dtype(dtype)
    return dtype.name if _ml_name(dtype) is not None else dtype.str


def check_dtype_supported(dtype: Any) -> np.dtype:
    """``np.dtype(dtype)`` if a checkpoint can store it (any byte order), else ``TypeError``."""
    stored_dtype(dtype)
    return np.dtype(dtype)


def integer_limits(dtype: np.dtype) -> tuple[int, int] | None:
    """``(min, max)`` of an integer dtype, NumPy's or ml_dtypes' (int4…); ``None`` for other kinds."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
    elif _ml_name(dtype) is not None and dtype.newbyteorder("=") in _ml_table().integers:
        info = _ml_table().module.iinfo(dtype)
    else:
        return None
    return int(info.min), int(info.max)
