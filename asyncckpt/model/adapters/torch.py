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

import collections
import threading
import weakref
from itertools import repeat
from operator import is_ as _is
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from asyncckpt import _arrays
from asyncckpt.dtypes import describe_dtype, dtype_from_string
from asyncckpt._runtime import process_state
from asyncckpt.model.adapters import leaves, typed_json
from asyncckpt.model.adapters.pytree import PyTree
from asyncckpt.model.adapters.rng import RandomState
from asyncckpt.model.adapters.stateful import STATE_DICT_KEY, StateDict
from asyncckpt.model.adapters.structure import leaf_name, split_arrays

__all__ = [
    "ModuleState", "OptimizerState", "TensorGuards", "TensorSource", "adapt", "destination", "from_numpy", "host_view", "is_array", "mismatch", "new",
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
_PLAIN_TENSOR_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))


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


def save_value(tensor: torch.Tensor) -> Any:
    """What a save takes ``tensor``'s bytes from (see the module docstring)."""
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


def restored(value: Any, like: torch.Tensor, *, into: bool = False) -> torch.Tensor:
    """A tensor like ``like`` (dtype, shape, device) holding host array ``value``; ``like`` itself with ``into``."""
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


# ---------------------------------------------------------------------------------------------
# Objects


class _RememberedSources:
    """The tensor sources of an adapter's last save, by tensor object and by batch.

    A module's ``state_dict(keep_vars=True)`` and an optimizer's ``state_dict()`` hand out the same
    tensor objects save after save. A batch (all of a module's tensors, all of an optimizer's
    state) whose tensors are the same objects over the same memory (data pointer, size, strides,
    dtype) as last time has the same sources: found in one pass of C-level comparisons instead of
    a lookup per tensor, which was most of a 1,000-tensor repeat save's stall. A tensor that moved
    is looked up alone, by object, then by memory. The last save's tensors are held until the next.
    """

    __slots__ = ("_last", "_now", "_batches", "_batches_now")

    def __init__(self) -> None:
        self._last: dict[int, tuple] = {}
        self._now: dict[int, tuple] = {}
        self._batches: dict[str, tuple[list, list, list]] = {}  # name -> (tensors, memory, sources)
        self._batches_now: dict[str, tuple[list, list, list]] = {}

    def begin(self) -> None:
        guards = _guards()
        if guards.stepping:
            guards.wait_for_other_steps()
        self._last, self._now = self._now, {}
        self._batches, self._batches_now = self._batches_now, {}

    def last(self, batch: str) -> list | None:
        """The tensors of ``batch`` at the last save, while it was all guarded sources or views."""
        last = self._batches.get(batch)
        return last[0] if last is not None else None

    def sources(self, batch: str, tensors: list, names: list[str], *, guard_small: bool = False) -> list:
        """The sources of ``tensors`` (attributes ``names``), the same objects as last save where they can be.

        With ``guard_small`` tensors of any size get guarded sources: for state that only
        ``optimizer.step()`` changes (a step count), which the step hook watches.
        """
        memory = [(t.data_ptr(), t.size(), t.stride(), t.dtype) for t in tensors]
        last = self._batches.get(batch)
        if last is not None and len(last[0]) == len(tensors) and all(map(_is, tensors, last[0])) and memory == last[1]:
            self._batches_now[batch] = last
            return last[2]
        if last is not None:  # what moved is looked up alone; the rest is found by object
            for tensor, known, source in zip(*last):
                self._last.setdefault(id(tensor), (tensor, known, source))
        found = [self.source(tensor, name, known, guard_small) for tensor, name, known in zip(tensors, names, memory)]
        if all(type(source) is TensorSource or type(source) is np.ndarray for source in found):
            # (an array is a small tensor's view, copied by every save: valid while the memory is)
            self._batches_now[batch] = (list(tensors), memory, found)
        return found

    def source(self, leaf: Any, name: str, memory: tuple | None = None, guard_small: bool = False) -> Any:
        if type(leaf) is torch.nn.Parameter or type(leaf) is torch.Tensor:
            if memory is None:
                memory = (leaf.data_ptr(), leaf.size(), leaf.stride(), leaf.dtype)
            entry = self._last.get(id(leaf))
            if entry is not None and entry[0] is leaf and entry[1] == memory:
                self._now[id(leaf)] = entry
                return entry[2]
            if guard_small and leaf.is_cpu and leaf.layout is _STRIDED and not (leaf.is_conj() or leaf.is_neg()):
                value = _guards().source_for(leaf)
            else:
                value = leaves.save_value(leaf, name)
            if type(value) is TensorSource:
                self._now[id(leaf)] = (leaf, memory, value)
            return value
        return leaves.save_value(leaf, name)


class _TorchStateDict(StateDict):
    """A :class:`StateDict` whose repeat saves find their tensors' sources again cheaply."""

    def __init__(self, obj: Any, **load_options: Any) -> None:
        super().__init__(obj, **load_options)
        self._remembered = _RememberedSources()

    def _serialize_to_tensors(self) -> dict[str, Any]:
        self._remembered.begin()
        return super()._serialize_to_tensors()

    def _save_value(self, leaf: Any, name: str) -> Any:
        return self._remembered.source(leaf, name)


class ModuleState(_TorchStateDict):
    """A ``torch.nn.Module``: its parameters and buffers by their own names (``layer1.weight``).

    Saves ``state_dict(keep_vars=True)`` -- the parameters themselves. A restore first checks the
    names: with ``strict`` (the default) the checkpoint must hold exactly the module's keys, and
    a difference fails the restore before anything changes (``load_state_dict`` itself would
    copy the matching keys first); with ``strict=False`` only the module's own keys are read and
    the checkpoint's others stay unused (``assert_consumed`` names them). Values are then read
    straight into the parameters and buffers, and ``load_state_dict`` gets the result.
    """

    def _state_dict(self) -> Any:
        return self._obj.state_dict(keep_vars=True)

    def _flat_names(self) -> bool:
        return True

    def _flat_arrays(self, state: Any) -> dict[str, Any] | None:
        """The usual module state -- plain tensors under their own names, none twice -- in one pass."""
        if type(state) not in (dict, collections.OrderedDict):
            return super()._flat_arrays(state)
        keys = tuple(state)
        tensors = list(state.values())
        known = self._flat_signature is not None and self._flat_signature[0] == keys
        if ((not known and not all(type(name) is str and name for name in keys))
                or not set(map(type, tensors)) <= _PLAIN_TENSOR_TYPES or len(set(map(id, tensors))) != len(tensors)):
            return super()._flat_arrays(state)  # tied weights, extra state, other leaves: the general path
        names = list(keys)
        signature = (keys, (KIND,) * len(keys), keys)  # what the general path records for this state
        if self._flat_signature != signature:
            structure = {name: typed_json.ArrayRef(name, KIND) for name in names}
            self._flat_encoded, self._flat_signature = typed_json.dumps(structure), signature
        arrays = {STATE_DICT_KEY: self._flat_encoded}
        arrays.update(zip(names, self._remembered.sources("module", tensors, names)))
        return arrays

    @property
    def _strict(self) -> bool:
        return bool(self._load_options.get("strict", True))

    def _may_read_in_place(self, saved_arrays: set[str], live: dict[str, Any]) -> bool:
        return not self._strict or saved_arrays == set(live)

    def _wanted_attributes(self, saved: set[str], live: dict[str, Any]) -> set[str]:
        if self._strict:
            return saved
        return {name for name in saved if name in live or name == self.STRUCTURE_KEY}

    def _skips(self, ref: Any, restored_tensors: dict[str, Any]) -> bool:
        return not self._strict and str(ref) not in restored_tensors

    def _check_before_load(self, state: Any) -> None:
        if not self._strict or not isinstance(state, dict):
            return
        live = list(self._state_dict())
        known = set(live)
        missing = [key for key in live if key not in state]
        unexpected = [key for key in state if key not in known]
        if missing or unexpected:
            lines = [f"Error(s) in loading state_dict for {type(self._obj).__name__} (nothing was restored):"]
            if missing:
                lines.append("Missing key(s) in state_dict: " + ", ".join(f'"{key}"' for key in missing) + ".")
            if unexpected:
                lines.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{key}"' for key in unexpected) + ".")
            raise RuntimeError("\n\t".join(lines))


#: The attribute recording the shapes of an optimizer's parameters, group by group.
PARAMETER_SHAPES_KEY = "PARAMETER_SHAPES_JSON"


class OptimizerState(_TorchStateDict):
    """A ``torch.optim.Optimizer``: its ``state_dict()``, plus the shapes of the parameters it was for.

    ``load_state_dict`` checks only the number of parameters per group; moments restored into an
    optimizer over differently shaped parameters would fail at the next step (or, broadcast, not
    fail at all). The recorded shapes let a restore refuse that first, naming the parameter.
    """

    def __init__(self, obj: Any, **load_options: Any) -> None:
        super().__init__(obj, **load_options)
        self._per_parameter: tuple[list, bytes, list[str]] | None = None  # (layout, encoded, attributes)
        self._groups: tuple[str, bytes] | None = None  # (repr, encoded) of the last plain param_groups
        self._shapes: tuple[list, bytes] | None = None  # (sizes, encoded) of the parameters at the last save

    def _serialize_state(self, state: Any) -> dict[str, Any]:
        tensors = self._usual_optimizer_state(state)
        if tensors is None:
            tensors = super()._serialize_state(state)
        shapes = [[param.size() for param in group["params"]] for group in self._obj.param_groups]
        if self._shapes is None or self._shapes[0] != shapes:  # encoded again only when a shape changes
            self._shapes = (shapes, typed_json.dumps([[list(shape) for shape in group] for group in shapes]))
        tensors[PARAMETER_SHAPES_KEY] = self._shapes[1]
        return tensors

    def _usual_optimizer_state(self, state: Any) -> dict[str, Any] | None:
        """The attributes of ``{"state": {index: {name: value}}, "param_groups": [...]}``, else ``None``.

        For the usual state, tensors only (AdamW's three per parameter), none twice: the same
        attributes and bytes as the general path, with the per-parameter structure encoded only
        when its names change, the tensors' sources found as one batch and plain parameter groups
        encoded only when they change. For 1,000 tensors the general path's per-entry work was
        most of a repeat save's stall.
        """
        if type(state) is not dict or list(state) != ["state", "param_groups"] or type(state["state"]) is not dict:
            return None
        per_parameter = state["state"]
        if not all(type(entries) is dict for entries in per_parameter.values()):
            return None
        layout = [(index, tuple(values)) for index, values in per_parameter.items()]
        values = [value for entries in per_parameter.values() for value in entries.values()]
        last = self._remembered.last("state")
        if last is None or len(last) != len(values) or not all(map(_is, values, last)):  # (else checked before)
            if not all(map(isinstance, values, repeat(torch.Tensor))):
                return None  # plain values beside the tensors (a step count as a number): the general path
            if len(set(map(id, values))) != len(values):
                return None  # one tensor under two names: the general path saves it once
        if self._per_parameter is None or self._per_parameter[0] != layout:
            if not all(type(index) is int and all(type(name) is str and name for name in names) for index, names in layout):
                return None
            attributes = [leaf_name(("state", index, name)) for index, names in layout for name in names]
            names = iter(attributes)
            structure = {index: {name: typed_json.ArrayRef(next(names), KIND) for name in entries}
                         for index, entries in layout}
            self._per_parameter = (layout, typed_json.dumps(structure), attributes)
        _, encoded_state, attributes = self._per_parameter
        arrays: dict[str, Any] = {STATE_DICT_KEY: b""}
        arrays.update(zip(attributes, self._remembered.sources("state", values, attributes, guard_small=True)))
        arrays[STATE_DICT_KEY] = (b'{"dict":[["state",' + encoded_state + b'],["param_groups",'
                                  + self._encoded_groups(state["param_groups"], arrays) + b"]]}")
        return arrays

    def _encoded_groups(self, groups: Any, arrays: dict[str, Any]) -> bytes:
        """``param_groups`` as typed JSON (its tensors, a learning rate, added to ``arrays``).

        Groups of plain values only are encoded again only when their text changes (``repr``
        tells ``1``, ``1.0`` and ``True`` apart, as the encoding does).
        """
        key = repr(groups) if _plain(groups) else None
        if key is not None and self._groups is not None and self._groups[0] == key:
            return self._groups[1]

        def keep(name: str, leaf: Any) -> None:
            arrays[name] = self._save_value(leaf, name)

        structure = split_arrays({"param_groups": groups}, keep)["param_groups"]
        try:
            encoded = typed_json.dumps(structure)
        except TypeError as exc:
            raise TypeError(f"{type(self._obj).__name__}.state_dict(): {exc}") from None
        self._groups = (key, encoded) if key is not None else None
        return encoded

    def _restore_from_tensors(self, restored_tensors: dict[str, Any]) -> None:
        encoded = restored_tensors.get(PARAMETER_SHAPES_KEY)
        if isinstance(encoded, bytes):
            self._check_shapes(typed_json.loads(encoded, lambda ref: ref))
        super()._restore_from_tensors(restored_tensors)

    def _check_shapes(self, saved: Any) -> None:
        groups = self._obj.param_groups
        if type(saved) is not list or len(saved) != len(groups):
            return  # load_state_dict names a different number of groups itself
        for index, (shapes, group) in enumerate(zip(saved, groups)):
            if type(shapes) is not list or len(shapes) != len(group["params"]):
                return
            for position, (shape, param) in enumerate(zip(shapes, group["params"])):
                if shape != list(param.shape):
                    self._end_restore()
                    raise ValueError(
                        f"cannot restore {self!r}: its state in the checkpoint is for a parameter of shape {shape} "
                        f"at group {index}, position {position}, but the live parameter there is {list(param.shape)}"
                    )


_PLAIN_SCALARS = (bool, int, float, str, type(None))


def _plain(groups: Any) -> bool:
    """Whether ``param_groups`` holds only dicts, lists and plain scalars (no tensors, no objects)."""
    if type(groups) is not list:
        return False
    for group in groups:
        if type(group) is not dict:
            return False
        for key, value in group.items():
            if type(key) is not str:
                return False
            if type(value) in (list, tuple):
                if not all(type(item) in _PLAIN_SCALARS for item in value):
                    return False
            elif type(value) not in _PLAIN_SCALARS:
                return False
    return True


def state_dict_class(value: Any) -> type[StateDict]:
    """The :class:`StateDict` kind for a torch object (``StateDict(model)`` is a ``ModuleState``)."""
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
