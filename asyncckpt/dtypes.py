"""Which dtypes a checkpoint can hold, and the string its manifest records each one by.

NumPy's own dtypes are recorded by their little-endian type string (``"<f4"``), as ever. The
``ml_dtypes`` types -- bfloat16, the float8/float6/float4 families, int4/uint4/int2/uint2 -- are
recorded by name (``"bfloat16"``): NumPy's type string for them is ambiguous (``"<V2"`` is also
plain 2-byte void), so it could not say which type the bytes are. Sub-byte types are stored as
ml_dtypes holds them, one element per byte. The table is an allowlist: anything else is refused
when saved and, read from a manifest, is an unknown dtype.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "STORABLE_DTYPES",
    "ML_DTYPE_NAMES",
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
#: The ``ml_dtypes`` types a checkpoint can hold, by the name the manifest records; those an older
#: ml_dtypes lacks are left out of :data:`STORABLE_DTYPES`.
ML_DTYPE_NAMES = tuple(
    name
    for name in (
        "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz",
        "float8_e4m3", "float8_e3m4", "float8_e8m0fnu", "float4_e2m1fn", "float6_e2m3fn", "float6_e3m2fn",
        "int4", "uint4", "int2", "uint2",
    )
    if hasattr(ml_dtypes, name)
)

# Manifest string -> the little-endian dtype of the stored bytes, and back.
_BY_STRING: dict[str, np.dtype] = {
    **{np.dtype(name).newbyteorder("<").str: np.dtype(name).newbyteorder("<") for name in _NUMPY_NAMES},
    **{name: np.dtype(getattr(ml_dtypes, name)) for name in ML_DTYPE_NAMES},
}
_STRINGS: dict[np.dtype, str] = {dtype: text for text, dtype in _BY_STRING.items()}
_NAMED = frozenset(_BY_STRING[name] for name in ML_DTYPE_NAMES)
_ML_INTEGERS = frozenset(_BY_STRING[name] for name in ("int4", "uint4", "int2", "uint2") if name in _BY_STRING)

#: The dtypes a checkpoint can store as raw bytes, in native byte order.
STORABLE_DTYPES = frozenset(dtype.newbyteorder("=") for dtype in _BY_STRING.values())

_SUPPORTED = (
    "bool, (u)int8-64, float16/32/64, complex64/128 and the ml_dtypes types " + ", ".join(ML_DTYPE_NAMES)
)


def stored_dtype(dtype: Any) -> np.dtype:
    """The little-endian dtype a value of ``dtype`` is stored as; ``TypeError`` if none is."""
    try:
        little = np.dtype(dtype).newbyteorder("<")
    except TypeError as exc:
        raise TypeError(f"dtype {dtype!r} cannot be stored in a checkpoint") from exc
    if little not in _STRINGS or little.fields is not None:
        raise TypeError(
            f"dtype {np.dtype(dtype)} cannot be stored in a checkpoint; use a numeric or bool dtype "
            f"({_SUPPORTED}); strings and Python objects belong in a PythonState"
        )
    return little


def dtype_string(dtype: Any) -> str:
    """The manifest string of ``dtype``: ``"<f4"``, ``"|b1"``, ``"bfloat16"``…; ``TypeError`` if unstorable."""
    return _STRINGS[stored_dtype(dtype)]


def dtype_from_string(text: Any) -> np.dtype:
    """The dtype a manifest string names; ``ValueError`` for one outside the allowlist."""
    try:
        return _BY_STRING[text]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {text!r}") from None


def describe_dtype(dtype: Any) -> str:
    """``dtype`` in the manifest's spelling, for messages: ``">f4"`` as NumPy writes it, ``"bfloat16"``."""
    dtype = np.dtype(dtype)
    return dtype.name if dtype.newbyteorder("=") in _NAMED else dtype.str


def check_dtype_supported(dtype: Any) -> np.dtype:
    """``np.dtype(dtype)`` if a checkpoint can store it (any byte order), else ``TypeError``."""
    stored_dtype(dtype)
    return np.dtype(dtype)


def integer_limits(dtype: np.dtype) -> tuple[int, int] | None:
    """``(min, max)`` of an integer dtype, NumPy's or ml_dtypes' (int4…); ``None`` for other kinds."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
    elif dtype in _ML_INTEGERS:
        info = ml_dtypes.iinfo(dtype)
    else:
        return None
    return int(info.min), int(info.max)
