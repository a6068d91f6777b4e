"""``RandomState``: a random number generator's state, so that a resumed run draws the same numbers.

One line per generator: ``Checkpoint(..., rng=RandomState(generator))``. Takes Python's
``random`` module or a ``random.Random``, a ``numpy.random.Generator`` or ``RandomState``, a
``torch.Generator``, and the ``torch`` and ``torch.cuda`` modules (the global CPU generator; every
CUDA device's). The state is stored as typed JSON in a ``PythonState`` (restored as soon as the
object is matched), never pickled.
"""

from __future__ import annotations

import random
import sys
import types
from typing import Any

import numpy as np

from asyncckpt.model.adapters import typed_json
from asyncckpt.model.python_state import PythonState

__all__ = ["RandomState"]


def _plain(value: Any) -> Any:
    """NumPy arrays inside a generator state (MT19937's key) as tagged tuples typed JSON can hold."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.tolist())
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _arrays_back(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 3 and value[0] == "ndarray":
        return np.asarray(value[2], dtype=_number_dtype(value[1]))
    if isinstance(value, dict):
        return {key: _arrays_back(item) for key, item in value.items()}
    return value


def _number_dtype(text: Any) -> np.dtype:
    """The dtype a saved generator array names, when it is a plain number type (the file is untrusted)."""
    try:
        dtype = np.dtype(text) if isinstance(text, str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "uifb" or dtype.itemsize > 8:
        raise ValueError(f"a generator state array of dtype {text!r}: expected integers or floats")
    return dtype


class RandomState(PythonState):
    """Save and restore the state of ``generator`` (see the module docstring for what it takes)."""

    def __init__(self, generator: Any) -> None:
        self._get, self._set, self._kind = _accessors(generator)
        self.generator = generator

    def __repr__(self) -> str:
        return f"RandomState({self._kind})"

    def serialize(self) -> bytes:
        return typed_json.dumps({"kind": self._kind, "state": _plain(self._get())})

    def deserialize(self, string_value: bytes) -> None:
        document = typed_json.loads(string_value, lambda ref: ref)
        if not isinstance(document, dict) or document.get("kind") != self._kind:
            saved = document.get("kind") if isinstance(document, dict) else None
            raise ValueError(f"the checkpoint holds the state of a {saved!r} generator, not of a {self._kind!r} one")
        if "state" not in document:
            raise ValueError(f"the checkpoint's entry for {self!r} holds no generator state")
        try:
            self._set(_arrays_back(document["state"]))
        except (TypeError, ValueError, KeyError, IndexError, OverflowError, RuntimeError) as exc:
            raise ValueError(f"the checkpoint's state for {self!r} is not one the generator takes: {exc}") from None


def _torch_bytes(tensor: Any) -> str:
    return bytes(tensor.numpy()).hex()


def _torch_tensor(text: str) -> Any:
    torch = sys.modules["torch"]  # only reached for a torch generator: torch is imported
    return torch.frombuffer(bytearray.fromhex(text), dtype=torch.uint8)


def _accessors(generator: Any):
    """``(get_state, set_state, kind name)`` for a supported generator; ``TypeError`` otherwise."""
    torch = sys.modules.get("torch")
    if generator is random or isinstance(generator, random.Random):
        return generator.getstate, lambda state: generator.setstate(state), "python"
    if isinstance(generator, np.random.Generator):
        bits = generator.bit_generator

        def set_bits(state: Any) -> None:
            bits.state = state

        return lambda: bits.state, set_bits, f"numpy.{type(bits).__name__}"
    if isinstance(generator, np.random.RandomState):
        return (lambda: generator.get_state(legacy=False)), generator.set_state, "numpy.RandomState"
    if torch is not None and isinstance(generator, torch.Generator):
        return (
            lambda: _torch_bytes(generator.get_state()),
            lambda state: generator.set_state(_torch_tensor(state)),
            f"torch.Generator({generator.device.type})",
        )
    if torch is not None and generator is torch:
        return (lambda: _torch_bytes(torch.get_rng_state())), (lambda s: torch.set_rng_state(_torch_tensor(s))), "torch"
    if torch is not None and isinstance(generator, types.ModuleType) and generator is getattr(torch, "cuda", None):
        return (
            lambda: [_torch_bytes(state) for state in torch.cuda.get_rng_state_all()],
            lambda states: torch.cuda.set_rng_state_all([_torch_tensor(state) for state in states]),
            "torch.cuda",
        )
    raise TypeError(
        f"RandomState takes Python's random module or a random.Random, a numpy.random.Generator or RandomState, "
        f"a torch.Generator, or the torch / torch.cuda modules; got {type(generator).__name__}"
    )
