"""``Variable``: a trackable owning one mutable array (NumPy, or CuPy on a GPU).

Every in-place change goes through ``assign``/``assign_add``/``assign_sub`` (or ``_mutate``), which
first run the registered mutation hooks. A pending snapshot registers such a hook so that it can copy
the old value before the change: that is how ``save()`` returns without copying everything while still
writing the values as they were when it was called. ``numpy()`` therefore returns a copy, never the
live array.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, Callable

import numpy as np

from asyncckpt import _arrays
from asyncckpt.trackable import Trackable

__all__ = ["Variable", "VARIABLE_VALUE_KEY"]

VARIABLE_VALUE_KEY = "VARIABLE_VALUE"
_unique_ids = itertools.count()


class Variable(Trackable):
    """A named, mutable array that checkpoints save and restore.

    Parameters
    ----------
    initial_value : array-like, device array, or callable returning one
        The value; it is copied, so later changes to the argument do not affect the variable.
    dtype : optional
        Cast the initial value to this dtype.
    name : str, optional
        A display name (checkpoint keys come from the object graph, not from this name).
    trainable : bool
        Whether optimizers and ``Module.trainable_variables`` see this variable.
    device : str, optional
        ``"cpu"`` (default for host values) or ``"cuda"``/``"cuda:N"`` (default for device values).
    """

    def __init__(
        self,
        initial_value: Any,
        dtype: Any = None,
        name: str | None = None,
        trainable: bool = True,
        device: str | None = None,
    ):
        self._maybe_initialize_trackable()
        if callable(initial_value):
            initial_value = initial_value()
        if isinstance(initial_value, Variable):
            initial_value = initial_value._array
        self._array = _arrays.as_array(initial_value, dtype=dtype, device=device)
        self._name = name if name is not None else "Variable"
        self._trainable = bool(trainable)
        self._unique_id = next(_unique_ids)
        self._mutation_hooks: list[Callable[["Variable"], None]] = []
        self._hooks_lock = threading.Lock()

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        return self._name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._array.dtype)

    @property
    def trainable(self) -> bool:
        return self._trainable

    @property
    def device(self) -> str:
        if _arrays.is_device_array(self._array):
            return f"cuda:{self._array.device.id}"
        return "cpu"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def array(self):
        """The live array, read-only where the array type supports it. Mutate through ``assign``."""
        if isinstance(self._array, np.ndarray):
            view = self._array.view()
            view.flags.writeable = False
            return view
        return self._array

    def numpy(self) -> np.ndarray:
        """A host copy of the current value."""
        return _arrays.to_numpy(self._array)

    def value(self):
        """A copy of the current value, on the variable's device."""
        return self._array.copy()

    # ------------------------------------------------------------------ mutation
    def _mutate(self, update: Callable[[Any], Any]) -> "Variable":
        """Run mutation hooks, then ``update(live_array)`` in place."""
        self._run_mutation_hooks()
        update(self._array)
        return self

    def _coerce(self, value: Any, what: str):
        """Bring ``value`` to this variable's dtype and shape, refusing silent lossy casts."""
        if isinstance(value, Variable):
            value = value._array
        module = _arrays.array_module(self._array)
        if _arrays.is_device_array(value) != _arrays.is_device_array(self._array):
            value = module.asarray(_arrays.to_numpy(value) if _arrays.is_device_array(value) else value)
        source_dtype = getattr(value, "dtype", None)
        if source_dtype is None:  # Python scalars and lists: judge by the values themselves
            host = np.asarray(value)
            source_dtype = host.dtype
            if source_dtype.kind in "iu" and self.dtype.kind in "iu":
                limits = np.iinfo(self.dtype)
                if host.size and (host.min() < limits.min or host.max() > limits.max):
                    raise ValueError(
                        f"cannot {what} values outside [{limits.min}, {limits.max}] to variable "
                        f"{self._name!r} of dtype {self.dtype}"
                    )
                source_dtype = self.dtype
        if not np.can_cast(np.dtype(source_dtype), self.dtype, casting="same_kind"):
            raise ValueError(
                f"cannot {what} a value of dtype {np.dtype(source_dtype)} to variable {self._name!r} "
                f"of dtype {self.dtype}"
            )
        value = module.asarray(value, dtype=self.dtype)
        if value.shape != self._array.shape:
            try:
                value = module.broadcast_to(value, self._array.shape)
            except ValueError:
                raise ValueError(
                    f"cannot {what} a value of shape {tuple(value.shape)} to variable {self._name!r} "
                    f"of shape {self.shape}"
                ) from None
        return value

    def assign(self, value: Any) -> "Variable":
        """Overwrite the value in place (shape and dtype must be compatible)."""
        value = self._coerce(value, "assign")

        def update(array):
            array[...] = value

        return self._mutate(update)

    def assign_add(self, delta: Any) -> "Variable":
        delta = self._coerce(delta, "add")

        def update(array):
            array += delta

        return self._mutate(update)

    def assign_sub(self, delta: Any) -> "Variable":
        delta = self._coerce(delta, "subtract")

        def update(array):
            array -= delta

        return self._mutate(update)

    # ------------------------------------------------------------------ snapshot source protocol
    def _snapshot_array(self):
        return self._array

    def _add_mutation_hook(self, hook: Callable[["Variable"], None]) -> None:
        with self._hooks_lock:
            self._mutation_hooks.append(hook)

    def _remove_mutation_hook(self, hook: Callable[["Variable"], None]) -> None:
        with self._hooks_lock:
            try:
                self._mutation_hooks.remove(hook)
            except ValueError:
                pass

    def _run_mutation_hooks(self) -> None:
        with self._hooks_lock:
            hooks = list(self._mutation_hooks)
        for hook in hooks:
            hook(self)

    # ------------------------------------------------------------------ checkpointing
    def _serialize_to_tensors(self) -> dict[str, Any]:
        return {VARIABLE_VALUE_KEY: self}

    def _checkpoint_attribute_names(self) -> tuple[str, ...]:
        return (VARIABLE_VALUE_KEY,)

    def _restore_from_tensors(self, restored_tensors: dict[str, Any]) -> None:
        value = restored_tensors[VARIABLE_VALUE_KEY]
        self._check_restorable(value)
        self._mutate(lambda array: _arrays.copy_into(array, value))

    def _check_restorable(self, value: Any, key: str | None = None) -> None:
        """Shape and dtype of a checkpoint value must match exactly: no reshape, no cast."""
        shape = tuple(value.shape)
        if shape != self.shape:
            raise ValueError(
                f"Received incompatible tensor with shape {shape} when attempting to restore variable "
                f"with shape {self.shape} and name {self._name}."
            )
        if np.dtype(value.dtype) != self.dtype:
            where = f" from key {key}" if key else ""
            raise ValueError(
                f"Received tensor{where} with dtype {np.dtype(value.dtype)} when attempting to restore "
                f"variable {self._name} with dtype {self.dtype}: expected dtype {self.dtype} does not "
                f"equal original dtype {np.dtype(value.dtype)}."
            )

    # ------------------------------------------------------------------ conversions
    def __array__(self, dtype=None, copy=None):
        array = self.numpy()
        return array if dtype is None else array.astype(dtype, copy=False)

    def __int__(self) -> int:
        return int(self.numpy())

    def __float__(self) -> float:
        return float(self.numpy())

    def __index__(self) -> int:
        return int(self.numpy())

    def __bool__(self) -> bool:
        return bool(self.numpy())

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d variable")
        return self.shape[0]

    def __getitem__(self, index):
        return self._array[index].copy()

    def __neg__(self):
        return -self._array

    def __add__(self, other):
        return self._array + _unwrap(other)

    def __radd__(self, other):
        return _unwrap(other) + self._array

    def __sub__(self, other):
        return self._array - _unwrap(other)

    def __rsub__(self, other):
        return _unwrap(other) - self._array

    def __mul__(self, other):
        return self._array * _unwrap(other)

    def __rmul__(self, other):
        return _unwrap(other) * self._array

    def __truediv__(self, other):
        return self._array / _unwrap(other)

    def __rtruediv__(self, other):
        return _unwrap(other) / self._array

    def __matmul__(self, other):
        return self._array @ _unwrap(other)

    def __rmatmul__(self, other):
        return _unwrap(other) @ self._array

    def __pow__(self, other):
        return self._array ** _unwrap(other)

    def __lt__(self, other):
        return self._array < _unwrap(other)

    def __le__(self, other):
        return self._array <= _unwrap(other)

    def __gt__(self, other):
        return self._array > _unwrap(other)

    def __ge__(self, other):
        return self._array >= _unwrap(other)

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"<asyncckpt.Variable {self._name!r} shape={self.shape} dtype={self.dtype} device={self.device}>"

    def __deepcopy__(self, memo):
        copied = Variable(self._array, name=self._name, trainable=self._trainable)
        memo[id(self)] = copied
        return copied

    def __reduce__(self):
        raise TypeError("asyncckpt.Variable cannot be pickled; save it with a Checkpoint")


def _unwrap(value: Any) -> Any:
    return value._array if isinstance(value, Variable) else value
