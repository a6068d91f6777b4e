"""PyTorch objects as trackables: modules and optimizers through their ``state_dict()``.

:class:`ModuleState` saves a module's parameters and buffers under their own names and reads a
restore straight into them; :class:`OptimizerState` saves an optimizer's state and groups and
records its parameters' shapes. Both find a repeat save's tensor sources in one pass
(:class:`_RememberedSources`). The tensors' snapshot sources and guards are in
:mod:`asyncckpt.model.adapters.torch`.
"""

from __future__ import annotations

import collections
from itertools import repeat
from operator import is_ as _is
from typing import Any

import numpy as np
import torch

from asyncckpt.model.adapters import leaves, typed_json
from asyncckpt.model.adapters.stateful import STATE_DICT_KEY, StateDict
from asyncckpt.model.adapters.structure import leaf_name, split_arrays
from asyncckpt.model.adapters.torch import _STRIDED, KIND, TensorSource, _guards

__all__ = ["ModuleState", "OptimizerState", "PARAMETER_SHAPES_KEY", "STATE_DICT_KEY"]

_PLAIN_TENSOR_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))

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
        arrays = {STATE_DICT_KEY: self._flat_structure(keys, (KIND,) * len(keys), keys)}  # each key its own tensor
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

    def _restore_destination(self, name: str, spec: Any) -> Any:
        """As for any state; and a moment of a DTensor parameter the optimizer has not made yet
        (before its first step) is restored as a DTensor placed like its parameter, from the
        parameter's box only -- the optimizer's step could not mix it with the parameter otherwise."""
        target = super()._restore_destination(name, spec)
        if target is None and name not in self._live_leaves():
            param = self._sharded_parameter(name, spec)
            if param is not None:
                self._live_leaves()[name] = param  # the leaf to place it like (never read into)
                return leaves.boxes(param)
        return target

    def _sharded_parameter(self, name: str, spec: Any) -> Any:
        """The DTensor parameter state attribute ``name`` (``state.<index>.<field>``) belongs to, of ``spec``'s shape."""
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or isinstance(spec.dtype, str):
            return None
        params = [param for group in self._obj.param_groups for param in group["params"]]
        index = int(parts[1])
        if index >= len(params) or tuple(params[index].shape) != tuple(spec.shape):
            return None
        param = params[index]
        return param if leaves.boxes(param) is not None else None

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
