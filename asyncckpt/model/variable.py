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
import time
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from asyncckpt import _arrays
from asyncckpt._runtime import process_state
from asyncckpt.dtypes import check_dtype_supported, integer_limits
from asyncckpt.model import adapters
from asyncckpt.model.trackable import Trackable

__all__ = ["Variable", "VARIABLE_VALUE_KEY", "check_restorable"]

VARIABLE_VALUE_KEY = "VARIABLE_VALUE"
_DEFAULT_NAME = "Variable"


class MutationGuards:
    """The process's mutation-hook state shared by every ``Variable`` (owned by the process state).

    ``bulk`` holds guards registered in bulk: ``(table, hook)`` pairs where ``table`` maps
    ``id(variable)`` to the token ``hook`` is called with; it is replaced as a whole (never
    mutated), so readers need no lock. ``in_flight`` maps a thread id to the sequence number of
    its outermost mutation in progress: a guard being installed waits for the mutations that may
    have looked for hooks before it existed (:meth:`wait_for_mutations_in_flight`); plain dict
    stores keep the cost of a mutation at a few hundred nanoseconds. A forked child starts with
    none of the parent's guards (their snapshots do not exist there).
    """

    def __init__(self) -> None:
        self.bulk: tuple[tuple[Mapping[int, Any], Callable[[Any], None]], ...] = ()
        self.in_flight: dict[int, int] = {}
        self.sequence = itertools.count()
        self._lock = threading.Lock()

    def add_bulk(self, entry: tuple[Mapping[int, Any], Callable[[Any], None]]) -> None:
        with self._lock:
            self.bulk = (*self.bulk, entry)

    def remove_bulk(self, entry: tuple[Mapping[int, Any], Callable[[Any], None]]) -> None:
        with self._lock:
            self.bulk = tuple(other for other in self.bulk if other is not entry)

    def wait_for_mutations_in_flight(self) -> None:
        """Wait until every mutation that started before this call has finished.

        Called right after a hook is published: a mutation that started earlier may have read the
        hooks before the new one was there, and must not still be changing its array when the
        snapshot that installed the hook starts reading it. Later mutations see the hook. The
        calling thread's own mutation (a hook that saves) is not waited for.
        """
        in_flight = self.in_flight
        pending = dict(in_flight)
        pending.pop(threading.get_ident(), None)
        delay = 1e-5
        while pending:
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)
            pending = {thread: sequence for thread, sequence in pending.items() if in_flight.get(thread) == sequence}


def _guards() -> MutationGuards:
    return process_state().owned(MutationGuards)


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
        initial_value = adapters.leaves.host_view(initial_value)
        self._init_fields(_arrays.as_array(initial_value, dtype=dtype, device=device), name, trainable)

    @classmethod
    def wrap(cls, array: Any, name: str | None = None, trainable: bool = True) -> "Variable":
        """A variable that *shares* the memory of a GPU array instead of copying it.

        ``array`` is a CuPy array or any tensor exporting GPU memory through DLPack or
        ``__cuda_array_interface__`` (a PyTorch CUDA tensor, say). Training that updates the
        tensor in place -- a PyTorch optimizer step -- changes what the next save writes, and a
        restore writes into the tensor. Saves capture device values on the device when ``save()``
        is called, so updates enqueued after it returns are not written even though they call no
        hook. Host arrays are refused: a NumPy array changed behind the variable's back while an
        asynchronous save reads it could be written half-changed. Do not wrap arrays their owner
        treats as immutable (JAX arrays): a restore would change them in place.
        """
        if not _arrays.is_device_array(array):
            framework = " or pass the tensor (or its module) to Checkpoint directly, which guards it" if (
                adapters.leaves.is_array_leaf(array) and not isinstance(array, np.ndarray)) else ""
            raise TypeError(
                f"Variable.wrap needs a GPU array (CuPy, or a DLPack / __cuda_array_interface__ tensor), got "
                f"{type(array).__name__}; use Variable(value) to copy a host value{framework}"
            )
        view = _arrays.adopt_device_array(array)
        check_dtype_supported(view.dtype)
        variable = cls.__new__(cls)
        variable._maybe_initialize_trackable()
        variable._init_fields(view, name, trainable)
        return variable

    def _init_fields(self, array: Any, name: str | None, trainable: bool) -> None:
        self._array = array
        self._name = name if name is not None else _DEFAULT_NAME
        self._trainable = bool(trainable)
        self._unique_id = process_state().next_number("variable")
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
        guards = _guards()
        in_flight = guards.in_flight
        thread = threading.get_ident()
        outermost = thread not in in_flight
        if outermost:
            in_flight[thread] = next(guards.sequence)
        try:
            self._run_mutation_hooks(guards)
            update(self._array)
        finally:
            if outermost:
                del in_flight[thread]
        return self

    def _coerce(self, value: Any, what: str):
        """Bring ``value`` to this variable's dtype and shape, refusing silent lossy casts."""
        if isinstance(value, Variable):
            value = value._array
        value = adapters.leaves.host_view(value)  # a CPU torch tensor or JAX array as a NumPy array
        value = _arrays.adopt_device_array(value)  # PyTorch/JAX GPU tensors as zero-copy CuPy views
        module = _arrays.array_module(self._array)
        if _arrays.is_device_array(value) != _arrays.is_device_array(self._array):
            value = module.asarray(_arrays.to_numpy(value) if _arrays.is_device_array(value) else value)
        source_dtype = getattr(value, "dtype", None)
        if source_dtype is None:  # Python scalars and lists: judge by the values themselves
            host = np.asarray(value)
            source_dtype = host.dtype
            limits = integer_limits(self.dtype) if source_dtype.kind in "iu" else None
            if limits is not None:  # int4 and the like included: NumPy would wrap them silently
                if host.size and (host.min() < limits[0] or host.max() > limits[1]):
                    raise ValueError(
                        f"cannot {what} values outside [{limits[0]}, {limits[1]}] to {self._label()} "
                        f"of dtype {self.dtype}"
                    )
                source_dtype = self.dtype
        if not np.can_cast(np.dtype(source_dtype), self.dtype, casting="same_kind"):
            raise ValueError(
                f"cannot {what} a value of dtype {np.dtype(source_dtype)} to {self._label()} "
                f"of dtype {self.dtype}"
            )
        value = module.asarray(value, dtype=self.dtype)
        if value.shape != self._array.shape:
            try:
                value = module.broadcast_to(value, self._array.shape)
            except ValueError:
                raise ValueError(
                    f"cannot {what} a value of shape {tuple(value.shape)} to {self._label()} "
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
        """Call ``hook(self)`` before every in-place change; returns once no change is half-done."""
        with self._hooks_lock:
            self._mutation_hooks.append(hook)
        _guards().wait_for_mutations_in_flight()

    @classmethod
    def _add_mutation_hooks(cls, table: Mapping[int, Any], hook: Callable[[Any], None]) -> Callable[[], None]:
        """Guard many variables at once: before variable ``v`` changes, call ``hook(table[id(v)])``.

        ``table`` maps ``id(variable)`` to a token; the caller keeps those variables alive while
        the guard is installed. Costs the same for one variable or 10,000 (a snapshot guards every
        variable it writes this way). Returns a function that removes the guard.
        """
        guards = _guards()
        entry = (table, hook)
        guards.add_bulk(entry)
        guards.wait_for_mutations_in_flight()
        return lambda: guards.remove_bulk(entry)

    def _remove_mutation_hook(self, hook: Callable[["Variable"], None]) -> None:
        with self._hooks_lock:
            try:
                self._mutation_hooks.remove(hook)
            except ValueError:
                pass

    def _run_mutation_hooks(self, guards: MutationGuards | None = None) -> None:
        tables = (guards or _guards()).bulk
        if tables:
            key = id(self)
            for table, hook in tables:
                token = table.get(key)
                if token is not None:
                    hook(token)
        if self._mutation_hooks:
            with self._hooks_lock:
                hooks = list(self._mutation_hooks)
            for hook in hooks:
                hook(self)

    # ------------------------------------------------------------------ checkpointing
    def _serialize_to_tensors(self) -> dict[str, Any]:
        return {VARIABLE_VALUE_KEY: self}

    def _checkpoint_attribute_names(self) -> tuple[str, ...]:
        return (VARIABLE_VALUE_KEY,)

    def _restore_destination(self, name: str, spec: Any, source: str | None = None):
        """The live array to read the checkpoint value of attribute ``name`` into, or ``None``.

        Lets a restore read straight into this variable instead of into a new array that is then
        copied. ``spec`` (dtype and shape) is checked first, so a mismatch raises before anything
        is read; then the mutation hooks run, since the read changes the value in place. A device
        array is returned too: the reader fills it through pinned buffers and asynchronous uploads
        ordered on the current stream. Non-contiguous (and read-only host) arrays return ``None``:
        their value is read into a new host array and copied in.
        """
        if name != VARIABLE_VALUE_KEY:
            return None
        self._check_restorable(spec, source)  # ``source`` names the checkpoint value in the message
        array = self._array
        if _arrays.is_device_array(array):
            if not array.flags.c_contiguous:
                return None
        elif type(array) is not np.ndarray or not array.flags.c_contiguous or not array.flags.writeable:
            return None
        self._run_mutation_hooks()
        return array

    def _restore_from_tensors(self, restored_tensors: dict[str, Any]) -> None:
        value = restored_tensors[VARIABLE_VALUE_KEY]
        if value is self._array:  # read in place (host or device) through _restore_destination
            return
        self._check_restorable(value)
        self._mutate(lambda array: _arrays.copy_into(array, value))

    def _label(self) -> str:
        return _label(self._name)

    def _check_restorable(self, value: Any, source: str | None = None) -> None:
        """Shape and dtype of a checkpoint value (or its spec) must match exactly: no reshape, no cast."""
        check_restorable(value, self.shape, self.dtype, self._name, source)

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


def check_restorable(value: Any, shape: tuple[int, ...], dtype: np.dtype, name: str, source: str | None = None) -> None:
    """Refuse a checkpoint value (or its spec) for variable ``name`` unless shape and dtype match exactly.

    ``source`` says where the value comes from for the message (``checkpoint key 'k' of P``). The
    shape message is TensorFlow's, which ported code matches; nothing is reshaped or cast.
    """
    origin = f" from {source}" if source else ""
    label = _label(name)
    if isinstance(value, (bytes, bytearray, memoryview)) or isinstance(getattr(value, "dtype", None), str):
        raise ValueError(f"Received a byte string{origin} when attempting to restore {label} of dtype {dtype}.")
    value_shape = tuple(value.shape)
    if value_shape != tuple(shape):
        raise ValueError(
            f"Received incompatible tensor with shape {value_shape} when attempting to restore variable "
            f"with shape {tuple(shape)} and name {name}.{f' The value is {source}.' if source else ''}"
        )
    if np.dtype(value.dtype) != dtype:
        raise ValueError(
            f"Received a value of dtype {np.dtype(value.dtype)}{origin} when attempting to restore {label} of "
            f"dtype {dtype}: expected dtype {dtype} does not equal original dtype {np.dtype(value.dtype)}."
        )


def _label(name: str) -> str:
    """How messages name a variable: by its name, unless it kept the default one (which says nothing)."""
    return "a variable" if name == _DEFAULT_NAME else f"variable {name!r}"


def _unwrap(value: Any) -> Any:
    return value._array if isinstance(value, Variable) else value
