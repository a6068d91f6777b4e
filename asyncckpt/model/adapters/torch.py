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
from asyncckpt.errors import UnsupportedFormatError
from asyncckpt._runtime import process_state
from asyncckpt.model.adapters import leaves
from asyncckpt.model.adapters.pytree import PyTree
from asyncckpt.model.adapters.rng import RandomState
from asyncckpt.model.adapters.stateful import StateDict

__all__ = [
    "TensorGuards", "TensorSource", "adapt", "before_change", "boxes", "destination", "from_numpy", "host_view",
    "is_array", "mismatch", "new",
    "numpy_dtype", "restored", "save_value", "state_dict_class", "to_numpy_view",
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

#: Tensors of at most this many elements are copied when ``save()`` is called instead of being
#: guarded: a learning rate or a loss scale costs less to copy than to watch, and schedulers
#: change them outside ``optimizer.step()`` (``group["lr"].fill_(...)``). An optimizer's ``state``
#: (AdamW's step counters) is guarded whatever its size: only the watched ``step()`` changes it.
SMALL_TENSOR_ELEMENTS = 16

#: How long a save waits for an optimizer step running on another thread before giving up.
STEP_WAIT_SECONDS = 60.0


class _SourceRef(weakref.ref):
    """A weak reference to a :class:`TensorSource` that remembers which storage it views."""

    __slots__ = ("storage",)


class TensorGuards:
    """The process's guards over saved CPU tensors (owned by the process state).

    A source is found by the memory it views (data pointer, shape, strides, dtype), so every
    tensor over the same bytes -- the parameter, its ``.data``, a ``state_dict()`` entry, a
    ``detach()`` -- shares one source, and a tensor whose memory was replaced gets a new one (a
    source never changes what it shows: a write in flight keeps reading the bytes it started on).
    Hooks are looked up by *storage*: whichever tensor over a storage is about to change, every
    source over that storage copies what it still owes. ``bulk`` and ``single`` hold the snapshots'
    hooks as ``Variable``'s guards do; ``pending`` is false while no hook is registered, which is all
    the global pre-hooks look at on a step or forward with no save in flight.
    """

    def __init__(self) -> None:
        self.sources: weakref.WeakValueDictionary[tuple, TensorSource] = weakref.WeakValueDictionary()
        self._by_storage: dict[int, tuple[_SourceRef, ...]] = {}
        self.bulk: tuple[tuple[Mapping[int, Any], Callable[[Any], None]], ...] = ()
        self.single: dict[int, list[Callable]] = {}
        self._forward_hook: Any = None  # the global forward pre-hook's handle, while registered
        self._lock = threading.RLock()  # re-entrant: a collected source's callback may run under it
        self._steps = threading.Condition(threading.Lock())
        self.stepping: dict[int, set[int]] = {}  # thread ident -> ids of the optimizers it is stepping
        _install_global_hooks()  # once per process: the guards are made once per process state

    @property
    def pending(self) -> bool:
        return bool(self.bulk or self.single)

    def source_for(self, tensor: torch.Tensor) -> "TensorSource":
        key = _memory_key(tensor)
        source = self.sources.get(key)
        if source is None:
            source = TensorSource(tensor)
            ref = _SourceRef(source, self._forget)
            ref.storage = source.storage
            with self._lock:
                self.sources[key] = source
                self._by_storage[ref.storage] = (*self._by_storage.get(ref.storage, ()), ref)
        return source

    def _forget(self, ref: _SourceRef) -> None:
        with self._lock:
            left = tuple(other for other in self._by_storage.get(ref.storage, ()) if other is not ref)
            if left:
                self._by_storage[ref.storage] = left
            else:
                self._by_storage.pop(ref.storage, None)

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

            _remove_inherited_forward_hooks()
            self._forward_hook = register_module_forward_pre_hook(_on_forward)

    def stop_watching_forwards(self) -> None:
        with self._lock:
            if self.pending:
                return
            if self._forward_hook is not None:
                self._forward_hook.remove()
                self._forward_hook = None
            else:  # registered by the process this one was forked from
                _remove_inherited_forward_hooks()

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
        bulk, single, by_storage = self.bulk, self.single, self._by_storage
        for tensor in tensors:
            if tensor is not None and _maybe_dtensor(tensor):
                tensor = tensor._local_tensor  # a DTensor's own memory is its local tensor's
            if tensor is None or not tensor.is_cpu:
                continue  # an unset parameter (bias=False); device tensors are captured at save(), never guarded
            refs = by_storage.get(tensor.untyped_storage().data_ptr())
            if refs is None:
                continue
            for ref in refs:
                source = ref()
                if source is None:
                    continue
                key = id(source)
                for table, hook in bulk:
                    token = table.get(key)
                    if token is not None:
                        hook(token)
                for hook in single.get(key, ()):
                    hook(source)

    # ------------------------------------------------------------------ steps on other threads
    def step_started(self, optimizer: Any) -> None:
        steps = self.stepping.setdefault(threading.get_ident(), set())
        steps.add(id(optimizer))

    def step_ended(self, optimizer: Any) -> None:
        ident = threading.get_ident()
        with self._steps:
            steps = self.stepping.get(ident)
            if steps is not None:
                steps.discard(id(optimizer))  # a step that raised is forgotten by its next one
                if not steps:
                    del self.stepping[ident]
            self._steps.notify_all()

    def wait_for_other_steps(self) -> None:
        """Return once no other thread is inside an optimizer step (its tensors are half-updated).

        A save takes its snapshot after this, so a step another thread started before ``save()``
        finishes first and its hook-less changes do not reach the checkpoint.
        """
        if not self.stepping:
            return
        me = threading.get_ident()
        alive = {thread.ident for thread in threading.enumerate()}
        with self._steps:
            def others_done() -> bool:
                return not any(self.stepping.get(ident) for ident in alive if ident != me)

            if not self._steps.wait_for(others_done, timeout=STEP_WAIT_SECONDS):
                raise RuntimeError(
                    f"an optimizer step has been running on another thread for {STEP_WAIT_SECONDS:.0f} s; "
                    "save() waits for steps in flight so that it does not write half-updated tensors"
                )


def _guards() -> TensorGuards:
    return process_state().owned(TensorGuards)


def _memory_key(tensor: torch.Tensor) -> tuple:
    """What identifies the bytes a tensor shows: equal keys, equal bytes (while either is alive)."""
    if tensor.is_cpu:
        return (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)
    return (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device)


class TensorSource:
    """A snapshot source over one tensor's memory as it is now (see :mod:`asyncckpt.io.snapshot`).

    A CPU tensor's bytes are read from a NumPy view of it, guarded by :class:`TensorGuards`; a
    CUDA tensor is handed to the device capture as it is. The view is taken once: a tensor whose
    memory is replaced (``param.data = ...``) gets a new source at the next save.
    """

    __slots__ = ("tensor", "array", "storage", "__weakref__")
    _fixed_array = True  # its array never changes (a new memory gets a new source): a layout may keep it

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor.detach()
        self.array: Any = to_numpy_view(self.tensor) if tensor.is_cpu else self.tensor
        self.storage = tensor.untyped_storage().data_ptr()

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


def _sharded():
    from asyncckpt.model.adapters import torch_sharded  # noqa: PLC0415 (it imports this module)

    return torch_sharded


def _maybe_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` may be a DTensor: not a plain tensor or parameter (the cheap test first)."""
    kind = type(tensor)
    return kind is not torch.Tensor and kind is not torch.nn.Parameter and _sharded().is_dtensor(tensor)


def save_value(tensor: torch.Tensor, name: str = "") -> Any:
    """What a save takes ``tensor``'s bytes from (see the module docstring); a DTensor's: its own shard."""
    if _maybe_dtensor(tensor):
        return _sharded().save_value(tensor, name)
    guards = _guards()
    if guards.stepping:
        guards.wait_for_other_steps()
    if tensor.is_cpu and tensor.layout is _STRIDED and not (tensor.is_conj() or tensor.is_neg()):
        if tensor.numel() <= SMALL_TENSOR_ELEMENTS:
            return to_numpy_view(tensor)  # a plain array: copied by the save when save() is called
        return guards.source_for(tensor)  # the usual case, in the fewest calls into torch
    if tensor.layout != torch.strided:
        raise TypeError(f"a {tensor.layout} tensor cannot be saved as it is; convert it with .to_dense() first")
    if tensor.is_conj() or tensor.is_neg():  # a lazy view: its values exist only once resolved (a copy of ours)
        return leaves.FrozenArray(to_numpy_view(tensor.detach().resolve_conj().resolve_neg().cpu()))
    if tensor.device.type == "cpu" or _device_capturable(tensor):
        return guards.source_for(tensor)
    if tensor.device.type == "meta":
        raise ValueError(f"a tensor on the meta device ({_describe(tensor)}) has no values to save")
    return leaves.FrozenArray(to_numpy_view(tensor.detach().to("cpu")))  # our own copy: nobody changes it


def _on_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    guards = process_state().owned(TensorGuards)
    guards.step_started(optimizer)
    if not guards.pending:
        return
    tensors = [param for group in optimizer.param_groups for param in group["params"]]
    tensors += [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]
    guards.before_change(tensors)


def _on_step_end(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    process_state().owned(TensorGuards).step_ended(optimizer)


def _on_forward(module: torch.nn.Module, args: Any) -> None:
    guards = process_state().owned(TensorGuards)
    if guards.pending:
        guards.before_change([*module._parameters.values(), *module._buffers.values()])
    else:
        guards.stop_watching_forwards()


def _remove_inherited_forward_hooks() -> None:
    """Drop forward pre-hooks of ours that a forked child inherited with torch's module state."""
    from torch.nn.modules import module as modules  # noqa: PLC0415

    registered = getattr(modules, "_global_forward_pre_hooks", {})
    for key, hook in list(registered.items()):
        if hook is _on_forward:
            registered.pop(key, None)


def _install_global_hooks() -> None:
    """Register the step hooks once per process (they survive a fork with torch's state)."""
    installed = process_state().owned(_StepHook)
    if not installed.done:
        installed.install()


class _StepHook:
    """Whether this process registered the global optimizer-step hooks (a forked child inherits them).

    They stay registered: PyTorch iterates its step hooks live, so removing one while another
    thread steps could break that step; two calls per step cost nothing measurable.
    """

    def __init__(self) -> None:
        from torch.optim import optimizer as optimizer_hooks  # noqa: PLC0415

        self.done = _on_step in getattr(optimizer_hooks, "_global_optimizer_pre_hooks", {}).values()
        self._lock = threading.Lock()

    def install(self) -> None:
        with self._lock:
            if self.done:
                return
            from torch.optim.optimizer import (  # noqa: PLC0415
                register_optimizer_step_post_hook,
                register_optimizer_step_pre_hook,
            )

            register_optimizer_step_pre_hook(_on_step)
            register_optimizer_step_post_hook(_on_step_end)
            self.done = True


# ---------------------------------------------------------------------------------------------
# Restoring


def destination(tensor: torch.Tensor, spec: Any) -> Any:
    """The tensor's memory to read a checkpoint value into, when dtype and shape match exactly."""
    if _maybe_dtensor(tensor):
        return _sharded().destination(tensor, spec)
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


def mismatch(tensor: torch.Tensor, spec: Any) -> str | None:
    """Why a checkpoint value of ``spec`` cannot restore ``tensor`` (no cast, no reshape), or ``None``."""
    if numpy_dtype(tensor.dtype) != np.dtype(spec.dtype) or tuple(tensor.shape) != tuple(spec.shape):
        return f"the checkpoint value is {np.dtype(spec.dtype)}{list(spec.shape)} but the live tensor is {_describe(tensor)}"
    return None


def boxes(tensor: torch.Tensor) -> Any:
    """For a DTensor, a request for this rank's box only; ``None`` for a whole tensor."""
    return _sharded().boxes(tensor) if _maybe_dtensor(tensor) else None


def before_change(tensors: Iterable[Any]) -> None:
    """Let pending saves copy what they still need of ``tensors``, about to change in place."""
    _guards().before_change(tensors)


def restored(value: Any, like: torch.Tensor, *, into: bool = False) -> torch.Tensor:
    """A tensor like ``like`` (dtype, shape, device) holding host array ``value``; ``like`` itself with ``into``."""
    if _maybe_dtensor(like):
        return _sharded().restored(value, like, into=into)
    array = np.asarray(value)
    problem = mismatch(like, array)
    if problem is not None:
        raise ValueError(problem)
    tensor = new(array)
    if into and like.device.type != "meta":
        if like.is_cpu:
            _guards().before_change([like])
        with torch.no_grad():
            like.copy_(tensor)
        return like
    return tensor if like.device.type == "cpu" else tensor.to(like.device)


def host_view(tensor: torch.Tensor) -> Any:
    """A CPU tensor's memory as NumPy (a lazy conjugate or negation resolved first); a device tensor as it is."""
    if tensor.layout != torch.strided:
        raise TypeError(f"a {tensor.layout} tensor cannot be stored as it is; convert it with .to_dense() first")
    if tensor.device.type == "meta":
        raise ValueError(f"a tensor on the meta device ({_describe(tensor)}) has no values")
    if tensor.is_conj() or tensor.is_neg():
        tensor = tensor.detach().resolve_conj().resolve_neg()
    return to_numpy_view(tensor) if tensor.device.type == "cpu" else tensor


def new(value: Any) -> torch.Tensor:
    """A CPU tensor holding host array ``value`` (state the live object did not have yet)."""
    array = np.asarray(value)
    return from_numpy(array if array.flags.c_contiguous else array.copy())  # (ascontiguousarray makes 0-d 1-d)


def state_dict_class(value: Any) -> type[StateDict]:
    """The :class:`StateDict` kind for a torch object (``StateDict(model)`` is a ``ModuleState``)."""
    from asyncckpt.model.adapters.torch_objects import ModuleState, OptimizerState  # noqa: PLC0415 (imports this)

    if isinstance(value, torch.nn.Module):
        return ModuleState
    if isinstance(value, torch.optim.Optimizer):
        return OptimizerState
    return StateDict


def adapt(value: Any) -> Any:
    """The trackable for a torch object, or ``None`` when it has no state to checkpoint."""
    if isinstance(value, torch.Tensor):
        return PyTree(value)
    if isinstance(value, torch.Generator):
        return RandomState(value)
    kind = type(value)
    if callable(getattr(kind, "state_dict", None)) and callable(getattr(kind, "load_state_dict", None)):
        return state_dict_class(value)(value)  # modules, optimizers, LR schedulers, GradScaler
    return None


def save_arrays(arrays: Mapping[str, np.ndarray], path: str) -> None:
    """``torch.save`` a state dict of CPU tensors over ``arrays`` (bfloat16 and float8 included)."""
    torch.save({name: from_numpy(np.ascontiguousarray(value)) for name, value in arrays.items()}, path)


def load_arrays(path: str) -> dict[str, np.ndarray]:
    """The tensors of a torch file as host arrays by ``/``-joined path, read with ``weights_only=True``.

    ``torch.load(weights_only=True)`` builds tensors and plain containers only, never other objects;
    anything else in the file, or a value that is not a tensor, is refused naming it.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch's refusals (an UnpicklingError among them) end here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedFormatError(f"{path} holds more than tensors, or is not a torch file: "
                                     f"torch.load(weights_only=True) refused it ({first})") from None
    flat: dict[str, np.ndarray] = {}

    def walk(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            flat[name] = np.ascontiguousarray(to_numpy_view(value.detach().cpu()))
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{name}/{key}" if name else str(key), item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(f"{name}/{index}" if name else str(index), item)
        else:
            raise TypeError(f"{path}: {name or 'the file'} is a {type(value).__name__}, not a tensor; only "
                            "tensors (in dicts and lists) are converted")

    walk("", state)
    return flat
