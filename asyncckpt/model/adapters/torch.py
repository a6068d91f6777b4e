"""PyTorch state: modules, optimizers, schedulers, scalers, generators and tensors as trackables.

Imported only when a torch value reaches :func:`asyncckpt.model.adapters.adapt`.

Saving a CPU tensor copies nothing up front: a :class:`TensorSource` serves its bytes from the
tensor's own memory. PyTorch changes tensors in place without telling anyone, so the sources are
guarded the way ``Variable`` is, from the two places training changes saved tensors:

* every ``torch.optim`` optimizer's ``step()`` (a global step pre-hook): before the step changes
  its parameters and moments, the bytes of theirs not yet written are copied to staging;
* every module's forward (a global forward pre-hook, registered only while a save is in flight):
  before a forward updates the module's own buffers (batch-norm statistics), likewise.

Other in-place changes of a saved tensor while a save is writing it (an EMA update by hand,
``load_state_dict`` of your own) must wait for ``checkpoint.sync()``. A CUDA tensor is captured on
the device when ``save()`` is called (the same device capture as a device ``Variable``, ordered on
the current stream) when CuPy is installed, and copied to the host at ``save()`` otherwise.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from asyncckpt import _arrays
from asyncckpt.dtypes import describe_dtype, dtype_from_string
from asyncckpt._runtime import process_state
from asyncckpt.model.adapters import leaves
from asyncckpt.model.adapters.pytree import PyTree
from asyncckpt.model.adapters.rng import RandomState
from asyncckpt.model.adapters.stateful import StateDict

__all__ = [
    "ModuleState", "TensorGuards", "TensorSource", "adapt", "destination", "from_numpy", "host_view", "is_array", "new",
    "numpy_dtype", "restored", "save_value", "to_numpy_view",
]

#: torch dtypes stored through a same-size carrier (torch cannot export these to NumPy), with the
#: ml_dtypes name they are stored as (ml_dtypes is imported only when such a tensor is seen).
_VIEWED = {
    torch.bfloat16: (torch.int16, "bfloat16"),
    torch.float8_e4m3fn: (torch.uint8, "float8_e4m3fn"),
    torch.float8_e5m2: (torch.uint8, "float8_e5m2"),
    torch.float8_e4m3fnuz: (torch.uint8, "float8_e4m3fnuz"),
    torch.float8_e5m2fnuz: (torch.uint8, "float8_e5m2fnuz"),
}
_VIEWED_BY_NAME = {name: (torch_type, carrier) for torch_type, (carrier, name) in _VIEWED.items()}


#: How structures name this framework's arrays (``ArrayRef.kind``).
KIND = "torch"


_STRIDED = torch.strided


def is_array(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy (or ``ml_dtypes``) dtype a torch dtype is stored as."""
    viewed = _VIEWED.get(dtype)
    if viewed is not None:
        return dtype_from_string(viewed[1])
    return np.dtype(torch.empty((), dtype=dtype).numpy().dtype)


def to_numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy array sharing a CPU tensor's memory (bfloat16 and float8 through a same-size view)."""
    tensor = tensor.detach()
    viewed = _VIEWED.get(tensor.dtype)
    if viewed is None:
        return tensor.numpy()
    carrier, name = viewed
    return tensor.view(carrier).numpy().view(dtype_from_string(name))


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing a host array's memory (the inverse of :func:`to_numpy_view`)."""
    viewed = _VIEWED_BY_NAME.get(describe_dtype(array.dtype))
    if viewed is None:
        return torch.from_numpy(array)
    torch_type, carrier = viewed
    return torch.from_numpy(array.view(numpy_dtype(carrier))).view(torch_type)


def _describe(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)} on {tensor.device}"


# ---------------------------------------------------------------------------------------------
# Saving: guarded sources


class TensorGuards:
    """The process's guards over saved CPU tensors (owned by the process state).

    ``sources`` finds a tensor's :class:`TensorSource` (by ``id`` of the tensor; the source holds
    the tensor, so the id stays its own); ``bulk`` and ``single`` hold the snapshots' hooks as
    ``Variable``'s guards do. ``pending`` is false while no hook is registered, which is all the
    global pre-hooks look at on a step or forward with no save in flight.
    """

    def __init__(self) -> None:
        self.sources: weakref.WeakValueDictionary[int, TensorSource] = weakref.WeakValueDictionary()
        self.bulk: tuple[tuple[Mapping[int, Any], Callable[[Any], None]], ...] = ()
        self.single: dict[int, list[Callable]] = {}
        self._forward_hook: Any = None  # the global forward pre-hook's handle, while registered
        self._lock = threading.Lock()
        _install_global_hooks()  # once per process: the guards are made once per process state

    @property
    def pending(self) -> bool:
        return bool(self.bulk or self.single)

    def source_for(self, tensor: torch.Tensor) -> "TensorSource":
        source = self.sources.get(id(tensor))
        if source is None or source.tensor is not tensor:
            source = TensorSource(tensor)
            self.sources[id(tensor)] = source
        else:
            source.refresh()
        return source

    def add_bulk(self, entry: tuple[Mapping[int, Any], Callable[[Any], None]]) -> None:
        with self._lock:
            self.bulk = (*self.bulk, entry)
            self._watch_forwards()

    def remove_bulk(self, entry: tuple[Mapping[int, Any], Callable[[Any], None]]) -> None:
        with self._lock:
            self.bulk = tuple(other for other in self.bulk if other is not entry)

    def add_single(self, source: "TensorSource", hook: Callable) -> None:
        with self._lock:
            self.single = {**self.single, id(source): [*self.single.get(id(source), ()), hook]}
            self._watch_forwards()

    def _watch_forwards(self) -> None:
        """Register the forward pre-hook while hooks are pending (with the lock held).

        A global forward hook puts every module call on PyTorch's slow path (about 2 µs each),
        so it is there only while a save is in flight: the first forward that finds nothing
        pending removes it (PyTorch iterates a copy of its hooks, so that is safe).
        """
        if self._forward_hook is None:
            from torch.nn.modules.module import register_module_forward_pre_hook  # noqa: PLC0415

            self._forward_hook = register_module_forward_pre_hook(_on_forward)

    def stop_watching_forwards(self) -> None:
        with self._lock:
            if self._forward_hook is not None and not self.pending:
                self._forward_hook.remove()
                self._forward_hook = None

    def remove_single(self, source: "TensorSource", hook: Callable) -> None:
        with self._lock:
            hooks = [other for other in self.single.get(id(source), ()) if other is not hook]
            single = dict(self.single)
            if hooks:
                single[id(source)] = hooks
            else:
                single.pop(id(source), None)
            self.single = single

    def before_change(self, tensors: Iterable[Any]) -> None:
        """Let pending saves copy what they still need of ``tensors``, which are about to change."""
        bulk, single, sources = self.bulk, self.single, self.sources
        for tensor in tensors:
            source = sources.get(id(tensor))
            if source is None or source.tensor is not tensor:
                continue
            key = id(source)
            for table, hook in bulk:
                token = table.get(key)
                if token is not None:
                    hook(token)
            for hook in single.get(key, ()):
                hook(source)


def _guards() -> TensorGuards:
    return process_state().owned(TensorGuards)


class TensorSource:
    """A snapshot source over a tensor's own memory (see :mod:`asyncckpt.io.snapshot`).

    A CPU tensor's bytes are read from a NumPy view of it, guarded by :class:`TensorGuards`; a
    CUDA tensor is handed to the device capture as it is.
    """

    __slots__ = ("tensor", "array", "_memory", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.array: Any = None
        self._memory: Any = None
        self.refresh()

    def refresh(self) -> None:
        """Take the tensor's current memory (``param.data = ...`` may have replaced it)."""
        tensor = self.tensor
        memory = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device)
        if memory == self._memory:
            return  # the same bytes as at the last save: the view still shows them
        self._memory = memory
        self.array = to_numpy_view(tensor) if tensor.device.type == "cpu" else tensor.detach()

    def _snapshot_array(self) -> Any:
        return self.array

    def _add_mutation_hook(self, hook: Callable) -> None:
        _guards().add_single(self, hook)

    def _remove_mutation_hook(self, hook: Callable) -> None:
        _guards().remove_single(self, hook)

    @classmethod
    def _add_mutation_hooks(cls, table: Mapping[int, Any], hook: Callable[[Any], None]) -> Callable[[], None]:
        guards = _guards()
        entry = (table, hook)
        guards.add_bulk(entry)
        return lambda: guards.remove_bulk(entry)


def _device_capturable(tensor: torch.Tensor) -> bool:
    """A CUDA tensor the device capture can take: CuPy is there and the dtype has a CUDA array interface."""
    return tensor.device.type == "cuda" and tensor.dtype not in _VIEWED and _arrays.cupy_module() is not None


def save_value(tensor: torch.Tensor) -> Any:
    """What a save takes ``tensor``'s bytes from (see the module docstring)."""
    if tensor.is_cpu and tensor.layout is _STRIDED and not (tensor.is_conj() or tensor.is_neg()):
        return _guards().source_for(tensor)  # the usual case, in the fewest calls into torch
    if tensor.layout != torch.strided:
        raise TypeError(f"a {tensor.layout} tensor cannot be saved as it is; convert it with .to_dense() first")
    if tensor.is_conj() or tensor.is_neg():  # a lazy view: its values exist only once resolved (a copy of ours)
        return leaves.FrozenArray(to_numpy_view(tensor.detach().resolve_conj().resolve_neg().cpu()))
    if tensor.device.type == "cpu" or _device_capturable(tensor):
        return _guards().source_for(tensor)
    if tensor.device.type == "meta":
        raise ValueError(f"a tensor on the meta device ({_describe(tensor)}) has no values to save")
    return leaves.FrozenArray(to_numpy_view(tensor.detach().to("cpu")))  # our own copy: nobody changes it


def _on_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    guards = process_state().owned(TensorGuards)
    if not guards.pending:
        return
    tensors = [param for group in optimizer.param_groups for param in group["params"]]
    tensors += [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]
    guards.before_change(tensors)


def _on_forward(module: torch.nn.Module, args: Any) -> None:
    guards = process_state().owned(TensorGuards)
    if guards.pending:
        guards.before_change([*module._parameters.values(), *module._buffers.values()])
    else:
        guards.stop_watching_forwards()


def _install_global_hooks() -> None:
    """Register the step pre-hook once per process (it survives a fork with torch's state)."""
    installed = process_state().owned(_StepHook)
    if not installed.done:
        installed.install()


class _StepHook:
    """Whether this process registered the global optimizer-step pre-hook (a forked child inherits it).

    It stays registered: PyTorch iterates its step hooks live, so removing one while another
    thread steps could break that step; one call per step costs nothing measurable.
    """

    def __init__(self) -> None:
        from torch.optim import optimizer as optimizer_hooks  # noqa: PLC0415

        self.done = _on_step in getattr(optimizer_hooks, "_global_optimizer_pre_hooks", {}).values()
        self._lock = threading.Lock()

    def install(self) -> None:
        with self._lock:
            if self.done:
                return
            from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: PLC0415

            register_optimizer_step_pre_hook(_on_step)
            self.done = True


# ---------------------------------------------------------------------------------------------
# Restoring


def destination(tensor: torch.Tensor, spec: Any) -> Any:
    """The tensor's memory to read a checkpoint value into, when dtype and shape match exactly."""
    if numpy_dtype(tensor.dtype) != np.dtype(spec.dtype) or tuple(tensor.shape) != tuple(spec.shape):
        return None
    if tensor.device.type == "cpu":
        if not tensor.is_contiguous() or tensor.is_conj() or tensor.is_neg():
            return None
        _guards().before_change([tensor])
        return to_numpy_view(tensor)
    if _device_capturable(tensor) and tensor.is_contiguous():
        return tensor.detach()
    return None


def restored(value: Any, like: torch.Tensor) -> torch.Tensor:
    """A tensor like ``like`` (dtype, shape, device) holding host array ``value``."""
    array = np.asarray(value)
    dtype = numpy_dtype(like.dtype)
    if array.dtype != dtype or tuple(array.shape) != tuple(like.shape):
        raise ValueError(
            f"the checkpoint value is {array.dtype}{list(array.shape)} but the live tensor is {_describe(like)}"
        )
    tensor = new(array)
    return tensor if like.device.type == "cpu" else tensor.to(like.device)


def host_view(tensor: torch.Tensor) -> Any:
    """A CPU tensor's memory as NumPy; a device tensor as it is."""
    return to_numpy_view(tensor) if tensor.device.type == "cpu" else tensor


def new(value: Any) -> torch.Tensor:
    """A CPU tensor holding host array ``value`` (state the live object did not have yet)."""
    array = np.asarray(value)
    return from_numpy(array if array.flags.c_contiguous else array.copy())  # (ascontiguousarray makes 0-d 1-d)


# ---------------------------------------------------------------------------------------------
# Objects


class ModuleState(StateDict):
    """A ``torch.nn.Module``: its parameters and buffers by their own names (``layer1.weight``).

    Saves ``state_dict(keep_vars=True)`` -- the parameters themselves, so the guards know them --
    and restores by reading into them, then ``load_state_dict`` (which keeps the values read in
    place, and checks that every key is there unless ``strict=False``).
    """

    def _state_dict(self) -> Any:
        return self._obj.state_dict(keep_vars=True)

    def _flat_names(self) -> bool:
        return True


def adapt(value: Any) -> Any:
    """The trackable for a torch object, or ``None`` when it has no state to checkpoint."""
    if isinstance(value, torch.nn.Module):
        return ModuleState(value)
    if isinstance(value, torch.Tensor):
        return PyTree(value)
    if isinstance(value, torch.Generator):
        return RandomState(value)
    kind = type(value)
    if callable(getattr(kind, "state_dict", None)) and callable(getattr(kind, "load_state_dict", None)):
        return StateDict(value)  # optimizers, LR schedulers, GradScaler
    return None
