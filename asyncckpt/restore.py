"""The restore engine: match a saved object graph to live objects, deferring what does not exist yet.

One ``RestoreCoordinator`` per ``restore()`` call holds the saved graph, the reader and which saved
node is bound to which live object. A ``CheckpointPosition`` is one saved node; restoring it into an
object binds the two, applies the node's values and walks its children breadth-first. A child the
live object does not have yet is queued on the parent (``_deferred_dependencies``) and restored when
it is tracked, or used as the initial value when it is created (restore-on-create).

The engine does no I/O itself: restoring a position is a generator (:meth:`CheckpointPosition.restore_steps`)
that yields a :class:`ReadRequest` for each batch of values it needs and is sent the values back.
:func:`run_blocking` serves the requests with blocking reads, :func:`run_async` by awaiting them,
so the blocking and the ``async`` restore run the same matching code on the caller's thread (whose
CUDA stream orders uploads into device variables).

Every restore has an increasing uid; an object is only assigned by a restore newer than the last one
it received, so the last ``restore()`` call wins whatever order objects are attached in.

The coordinator holds live objects weakly, so dropping the user's objects and the status frees
everything; when it is freed without ``expect_partial()``, unrestored values are logged.
"""

from __future__ import annotations

import collections
import logging
import weakref
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from asyncckpt._runtime import gc_paused, process_state
from asyncckpt.model.data_structures import TrackableDataStructure
from asyncckpt.errors import CorruptCheckpointError
from asyncckpt.graph import GraphView, list_objects, pretty_node_names
from asyncckpt.model.trackable import Trackable
from asyncckpt.model.sharded import ShardedVariable
from asyncckpt.model.variable import VARIABLE_VALUE_KEY, Variable, check_restorable

__all__ = [
    "ReadRequest",
    "RestoreSteps",
    "run_async",
    "run_blocking",
    "RestoreCoordinator",
    "CheckpointPosition",
    "CheckpointLoadStatus",
    "InitializationOnlyStatus",

    "validate_object_graph",
    "variable_from_position",
    "next_restore_uid",
]

logger = logging.getLogger("asyncckpt")


@dataclass(frozen=True)
class ReadRequest:
    """Values the engine needs next: ``keys`` of ``reader``, read into ``destinations`` where given.

    Served by :meth:`run` (blocking) or :meth:`arun` (awaited); either returns ``{key: value}``.
    """

    reader: Any
    keys: list[str]
    destinations: dict[str, Any]

    def run(self) -> dict[str, Any]:
        return self.reader.read_many(self.keys, out=self.destinations or None)

    async def arun(self) -> dict[str, Any]:
        return await self.reader.aread_many(self.keys, out=self.destinations or None)


#: A restore in steps: yields requests (anything with ``run``/``arun``), is sent their results.
RestoreSteps = Generator[Any, Any, Any]


def _resume(steps: RestoreSteps, outcome: tuple[bool, Any]) -> tuple[bool, Any]:
    """Hand ``outcome`` (``(True, result)`` or ``(False, error)``) back to ``steps``.

    Returns ``(False, next request)``, or ``(True, final value)`` once the steps are done. An
    error is thrown into the steps at the ``yield`` that made the failed request.
    """
    succeeded, value = outcome
    try:
        return False, (steps.send(value) if succeeded else steps.throw(value))
    except StopIteration as done:
        return True, done.value


def run_blocking(steps: RestoreSteps) -> Any:
    """Drive ``steps`` to the end, serving each request with its blocking ``run()``."""
    finished, value = _resume(steps, (True, None))
    while not finished:
        try:
            outcome = (True, value.run())
        except Exception as error:  # noqa: BLE001 - handed back to the steps, which decide
            outcome = (False, error)
        finished, value = _resume(steps, outcome)
    return value


async def run_async(steps: RestoreSteps) -> Any:
    """Drive ``steps`` to the end, awaiting each request's ``arun()``: the event loop never blocks on I/O."""
    finished, value = _resume(steps, (True, None))
    while not finished:
        try:
            outcome = (True, await value.arun())
        except Exception as error:  # noqa: BLE001 - handed back to the steps, which decide
            outcome = (False, error)
        finished, value = _resume(steps, outcome)
    return value


def next_restore_uid() -> int:
    """A uid larger than every earlier restore's: the last restore of an object wins."""
    return process_state().next_number("restore")


def validate_object_graph(graph: Any, keys: Sequence[str]) -> list[dict]:
    """Check an object graph read from disk; return its node list. Untrusted input: types only, no eval."""
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list) or not graph["nodes"]:
        raise CorruptCheckpointError("the checkpoint's object graph has no node list")
    nodes = graph["nodes"]
    count = len(nodes)
    key_set = keys if hasattr(keys, "__contains__") and not isinstance(keys, (list, tuple)) else set(keys)

    def node_id(value: Any, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < count:
            raise CorruptCheckpointError(f"object graph: {where} refers to node {value!r}, not one of 0..{count - 1}")
        return value

    for index, node in enumerate(nodes):
        if _usual_node(node, key_set, count):
            continue
        if not isinstance(node, dict):
            raise CorruptCheckpointError(f"object graph: node {index} is not an object")
        for field in ("children", "attributes", "slot_variables"):
            if not isinstance(node.setdefault(field, []), list):
                raise CorruptCheckpointError(f"object graph: node {index} has a non-list {field!r}")
        for child in node.setdefault("children", []):
            if not isinstance(child, dict) or not isinstance(child.get("local_name"), str):
                raise CorruptCheckpointError(f"object graph: node {index} has a malformed child edge")
            node_id(child.get("node_id"), f"a child of node {index}")
        for attribute in node.setdefault("attributes", []):
            if not isinstance(attribute, dict) or not all(
                isinstance(attribute.get(field), str) for field in ("name", "checkpoint_key")
            ):
                raise CorruptCheckpointError(f"object graph: node {index} has a malformed attribute")
            if attribute["checkpoint_key"] not in key_set:
                raise CorruptCheckpointError(
                    f"object graph: node {index} names key {attribute['checkpoint_key']!r}, "
                    "which the checkpoint does not contain"
                )
        for slot in node.setdefault("slot_variables", []):
            if not isinstance(slot, dict) or not isinstance(slot.get("slot_name"), str):
                raise CorruptCheckpointError(f"object graph: node {index} has a malformed slot variable")
            node_id(slot.get("original_variable_node_id"), f"a slot of node {index}")
            node_id(slot.get("slot_variable_node_id"), f"a slot of node {index}")
        if "has_checkpoint_values" in node and not isinstance(node["has_checkpoint_values"], bool):
            raise CorruptCheckpointError(f"object graph: node {index} has a non-boolean has_checkpoint_values")
    return nodes


def _usual_node(node: Any, key_set: Any, count: int) -> bool:
    """Whether ``node`` is well formed as asyncckpt writes nodes, checked with the least work.

    False means "look closer": :func:`validate_object_graph` then checks it field by field and
    says what is wrong.
    """
    if type(node) is not dict:
        return False
    children, attributes, slots = node.get("children"), node.get("attributes"), node.get("slot_variables", [])
    if type(children) is not list or type(attributes) is not list or type(slots) is not list or slots:
        return False
    for child in children:
        if type(child) is not dict or type(child.get("local_name")) is not str:
            return False
        target = child.get("node_id")
        if type(target) is not int or not 0 <= target < count:
            return False
    for attribute in attributes:
        if type(attribute) is not dict or type(attribute.get("name")) is not str:
            return False
        key = attribute.get("checkpoint_key")
        if type(key) is not str or key not in key_set:
            return False
    flag = node.get("has_checkpoint_values", False)
    if type(flag) is not bool:
        return False
    node.setdefault("slot_variables", [])
    return True


class _ObjectMap:
    """node id → live object, held weakly where the object allows it (tuples do not)."""

    def __init__(self):
        self._refs: dict[int, Callable[[], Any]] = {}

    def get(self, node_id: int, default: Any = None) -> Any:
        ref = self._refs.get(node_id)
        obj = ref() if ref is not None else None
        return default if obj is None else obj

    def __setitem__(self, node_id: int, obj: Any) -> None:
        try:
            self._refs[node_id] = weakref.ref(obj)
        except TypeError:
            self._refs[node_id] = lambda obj=obj: obj

    def __contains__(self, node_id: int) -> bool:
        return self.get(node_id) is not None

    def items(self):
        for node_id in list(self._refs):
            obj = self.get(node_id)
            if obj is not None:
                yield node_id, obj

    def values(self):
        return [obj for _, obj in self.items()]

    def __len__(self) -> int:
        return sum(1 for _ in self.items())


class _Unrestored:
    """The shared bookkeeping a finished restore reports on when the coordinator is freed."""

    def __init__(self, nodes: list[dict]):
        self.nodes = nodes
        self.matched_proto_ids: set[int] = set()
        self.unused_attributes: dict[int, list[str]] = {}
        self.expect_partial = False

    def report(self) -> None:
        if self.expect_partial:
            return
        unmatched = [i for i in range(len(self.nodes)) if i not in self.matched_proto_ids]
        if not unmatched and not self.unused_attributes:
            return
        names = pretty_node_names(self.nodes)
        logger.warning(
            "Detecting that an object or model or asyncckpt.Checkpoint is being deleted with unrestored "
            "values. See the following logs for the specific values in question. To silence these "
            "warnings, use `status.expect_partial()`. See the Checkpoint.restore documentation for "
            "details about the status object returned by the restore function."
        )
        for node_id in unmatched:
            logger.warning("Value in checkpoint could not be found in the restored object: %s", names[node_id])
        for node_id, attributes in self.unused_attributes.items():
            for attribute in attributes:
                logger.warning(
                    "An attribute in the restored object could not be found in the checkpoint. "
                    "Object: %s, attribute: %s",
                    names[node_id],
                    attribute,
                )


class RestoreCoordinator:
    """State of one ``restore()``: the saved graph, the reader and the saved-node ↔ object binding."""

    def __init__(self, object_graph: dict, reader: Any, *, skip_slot_variables: bool = False):
        key_set = getattr(reader, "key_set", None)
        self.nodes = validate_object_graph(object_graph, key_set() if key_set is not None else reader.keys())
        self.reader = reader
        self.restore_uid = next_restore_uid()
        self.skip_slot_variables = skip_slot_variables
        self.object_by_proto_id = _ObjectMap()
        self.all_python_objects: dict[int, Callable[[], Any]] = {}
        self._unrestored = _Unrestored(self.nodes)
        self.slot_restorations: dict[int, list[tuple[int, int, str]]] = {}
        self.deferred_slot_restorations: dict[int, list[tuple[Any, int, str]]] = {}
        self.slot_variable_node_ids: set[int] = set()
        for optimizer_id, node in enumerate(self.nodes):
            for slot in node["slot_variables"]:
                self.slot_variable_node_ids.add(slot["slot_variable_node_id"])
                if not skip_slot_variables:
                    self.slot_restorations.setdefault(slot["original_variable_node_id"], []).append(
                        (optimizer_id, slot["slot_variable_node_id"], slot["slot_name"])
                    )
        finalizer = weakref.finalize(self, self._unrestored.report)
        finalizer.atexit = False

    @property
    def matched_proto_ids(self) -> set[int]:
        return self._unrestored.matched_proto_ids

    @property
    def unused_attributes(self) -> dict[int, list[str]]:
        return self._unrestored.unused_attributes

    def expect_partial(self) -> None:
        self._unrestored.expect_partial = True

    def note_python_object(self, obj: Any) -> None:
        try:
            self.all_python_objects[id(obj)] = weakref.ref(obj)
        except TypeError:
            self.all_python_objects[id(obj)] = lambda obj=obj: obj

    def python_objects(self) -> list[Any]:
        return [obj for obj in (ref() for ref in self.all_python_objects.values()) if obj is not None]

    def describe_key(self, key: str) -> str:
        """``checkpoint key 'k' of P``: what messages about one value name."""
        return f"checkpoint key {key!r} of {getattr(self.reader, 'path', 'the checkpoint')}"

    def read_request(self, keys: Sequence[str], destinations: dict[str, Any] | None = None) -> ReadRequest:
        """A request for ``keys``; those in ``destinations`` are read into the given arrays."""
        return ReadRequest(self.reader, list(keys), dict(destinations or {}))


class CheckpointPosition:
    """One node of a saved object graph, within one restore."""

    __slots__ = ("checkpoint", "proto_id")

    def __init__(self, checkpoint: RestoreCoordinator, proto_id: int):
        self.checkpoint = checkpoint
        self.proto_id = proto_id

    @property
    def restore_uid(self) -> int:
        return self.checkpoint.restore_uid

    @property
    def object_proto(self) -> dict:
        return self.checkpoint.nodes[self.proto_id]

    @property
    def trackable(self) -> Any:
        return self.checkpoint.object_by_proto_id.get(self.proto_id)

    def create_child_position(self, node_id: int) -> "CheckpointPosition":
        return CheckpointPosition(self.checkpoint, node_id)

    def has_checkpoint_values(self) -> bool:
        proto = self.object_proto
        if "has_checkpoint_values" in proto:
            return proto["has_checkpoint_values"]
        return bool(proto["children"] or proto["attributes"] or proto["slot_variables"])

    def is_simple_variable(self) -> bool:
        """One ``VARIABLE_VALUE`` attribute and no children: its value can be an initial value."""
        proto = self.object_proto
        attributes = proto["attributes"]
        return len(attributes) == 1 and attributes[0]["name"] == VARIABLE_VALUE_KEY and not proto["children"]

    def value(self) -> Any:
        """The value of a simple variable (read now, checksum verified)."""
        key = self.object_proto["attributes"][0]["checkpoint_key"]
        return self.checkpoint.read_request([key]).run()[key]

    def value_spec(self) -> Any:
        """dtype and shape of a simple variable's value, known before anything is read."""
        return self.checkpoint.reader.spec(self.object_proto["attributes"][0]["checkpoint_key"])

    def value_shape(self) -> tuple[int, ...]:
        return tuple(self.value_spec().shape)

    def value_source(self) -> str:
        """Where a simple variable's value comes from, for messages: its key and checkpoint."""
        return self.checkpoint.describe_key(self.object_proto["attributes"][0]["checkpoint_key"])

    # ------------------------------------------------------------------ binding
    def bind_object(self, trackable: Any) -> bool:
        """Bind this node to ``trackable``; True if the binding is new."""
        checkpoint = self.checkpoint
        checkpoint.note_python_object(trackable)
        current = checkpoint.object_by_proto_id.get(self.proto_id)
        checkpoint.matched_proto_ids.add(self.proto_id)
        if current is None:
            checkpoint.object_by_proto_id[self.proto_id] = trackable
            return True
        if current is not trackable:
            logger.warning(
                "Inconsistent references when loading the checkpoint into this object graph. For example, in "
                "the saved checkpoint object, `model.layer.weight` and `model.layer_copy.weight` reference the "
                "same variable, while in the current object these are two different variables. The referenced "
                "variables are: (%r and %r).",
                current,
                trackable,
            )
        return False

    def restore(self, trackable: Any) -> None:
        """Bind to ``trackable``, and if that is new, restore it and everything below it (blocking)."""
        run_blocking(self.restore_steps(trackable))

    def restore_steps(self, trackable: Any) -> RestoreSteps:
        """:meth:`restore` as steps: yields the one :class:`ReadRequest` of the batch, if any."""
        if self.bind_object(trackable):
            yield from self._restore_descendants()

    def _restore_descendants(self) -> RestoreSteps:
        """Breadth-first over newly bound descendants; all their values are read in one batch."""
        checkpoint = self.checkpoint
        visit = collections.deque([self])
        pending: list[tuple[Any, dict[str, str]]] = []
        with gc_paused():  # matching 10,000 objects allocates a lot: no collector pauses meanwhile
            request = self._match_descendants(visit, pending)
        values = (yield request) if request is not None else {}
        for obj, attributes in pending:
            obj._restore_from_tensors({name: values[key] for name, key in attributes.items()})

    def _match_descendants(self, visit: collections.deque, pending: list) -> Any:
        """Bind the newly reached descendants; the batch's :class:`ReadRequest`, or ``None`` for none."""
        checkpoint = self.checkpoint
        while visit:
            position = visit.popleft()
            obj = position.trackable
            if obj is None:
                continue
            if isinstance(obj, Trackable) and checkpoint.restore_uid > obj._update_uid:
                attributes = position._consumable_attributes(obj)
                if attributes:
                    pending.append((obj, attributes))
                obj._update_uid = checkpoint.restore_uid
            position._queue_children(visit)
            position._queue_slot_variables(visit)
        keys = [key for _, attributes in pending for key in attributes.values()]
        return checkpoint.read_request(keys, self._destinations(pending)) if keys else None

    def _destinations(self, pending: list[tuple[Any, dict[str, str]]]) -> dict[str, Any]:
        """Live arrays the values can be read straight into (``Variable``), by checkpoint key.

        Host arrays are read into directly; device arrays through pinned buffers, uploaded on the
        device's upload stream in order with the current stream of the thread restoring.
        """
        reader = self.checkpoint.reader
        destinations = {}
        for obj, attributes in pending:
            provide = getattr(obj, "_restore_destination", None)
            if provide is None:
                continue
            for name, key in attributes.items():
                spec = reader.spec(key)
                if isinstance(obj, (Variable, ShardedVariable)):  # checked once, the message naming the key
                    destination = provide(name, spec, self.checkpoint.describe_key(key))
                else:
                    destination = provide(name, spec)
                if destination is not None:
                    destinations[key] = destination
        return destinations

    def _consumable_attributes(self, obj: Trackable) -> dict[str, str]:
        """``{attribute: key}`` for attributes ``obj`` can take; record the rest as unused."""
        saved = self.object_proto["attributes"]
        if not saved:
            return {}
        own = obj._restorable_attributes([attribute["name"] for attribute in saved])
        consumable = {}
        for attribute in saved:
            if attribute["name"] in own:
                consumable[attribute["name"]] = attribute["checkpoint_key"]
            else:
                self.checkpoint.unused_attributes.setdefault(self.proto_id, []).append(attribute["name"])
        return consumable

    def _queue_children(self, visit: collections.deque) -> None:
        checkpoint = self.checkpoint
        trackable = self.trackable
        for child in self.object_proto["children"]:
            if child["node_id"] in checkpoint.object_by_proto_id:
                continue
            child_position = self.create_child_position(child["node_id"])
            local_object = trackable._lookup_dependency(child["local_name"])
            if local_object is None:
                if child_position.has_checkpoint_values():
                    trackable._deferred_dependencies.setdefault(child["local_name"], []).append(child_position)
            elif child_position.bind_object(local_object):
                visit.append(child_position)

    def _queue_slot_variables(self, visit: collections.deque) -> None:
        checkpoint = self.checkpoint
        trackable = self.trackable
        for original_variable, slot_id, slot_name in checkpoint.deferred_slot_restorations.pop(self.proto_id, ()):
            _create_or_restore_slot(trackable, CheckpointPosition(checkpoint, slot_id), slot_name, original_variable)
        for optimizer_id, slot_id, slot_name in checkpoint.slot_restorations.pop(self.proto_id, ()):
            optimizer = checkpoint.object_by_proto_id.get(optimizer_id)
            if optimizer is None:
                checkpoint.deferred_slot_restorations.setdefault(optimizer_id, []).append(
                    (trackable, slot_id, slot_name)
                )
            else:
                _create_or_restore_slot(optimizer, CheckpointPosition(checkpoint, slot_id), slot_name, trackable)


def _create_or_restore_slot(optimizer: Any, position: CheckpointPosition, slot_name: str, variable: Any) -> None:
    # An optimizer position may be bound to a plain object (e.g. a Checkpoint holding only `iterations`).
    method = getattr(optimizer, "_create_or_restore_slot_variable", None)
    if method is not None:
        method(slot_variable_position=position, slot_name=slot_name, variable=variable)


def variable_from_position(position: CheckpointPosition, *, name: str | None = None, trainable: bool = True,
                           device: str | None = None, like: Variable | None = None) -> Variable:
    """Create a variable whose initial value is a saved simple variable (restore-on-create).

    With ``like`` (the variable an optimizer slot serves), the saved value must have its shape and
    dtype, checked before anything is read: a mismatched slot would otherwise restore and fail
    only at the next update. The new variable is marked as already holding this restore's value,
    so binding it afterwards (``position.restore(variable)`` or tracking it) does not read and
    assign the value again.
    """
    if like is not None:
        check_restorable(position.value_spec(), like.shape, like.dtype, name or like.name, position.value_source())
    variable = Variable(position.value(), name=name, trainable=trainable, device=device)
    variable._update_uid = position.restore_uid
    return variable


def preload_simple_restoration(trackable: Trackable, name: str) -> CheckpointPosition | None:
    """The newest queued position for ``trackable.name`` if every queued one is a simple variable."""
    positions = trackable._deferred_dependencies.get(name, ())
    if not positions or not all(position.is_simple_variable() for position in positions):
        return None
    return max(positions, key=lambda position: position.restore_uid)


def _objects_with_attributes(objects: Sequence[Any]) -> list[Any]:
    return [obj for obj in objects if isinstance(obj, Trackable) and obj._checkpoint_attribute_names()]


class CheckpointLoadStatus:
    """What ``Checkpoint.restore`` returns: assertions about how the checkpoint matched the program.

    Assertions are evaluated when called, so objects created after ``restore()`` count.
    """

    def __init__(self, coordinator: RestoreCoordinator, view: GraphView):
        self._checkpoint = coordinator
        self._view = view
        # The view holds the root weakly (no cycle through deferred positions); the status keeps it
        # alive so that `Checkpoint(...).restore(path).assert_consumed()` works on a temporary.
        self._root = view.root_object

    def _live_objects(self) -> list[Any]:
        return list_objects(self._view, skip_slots=self._checkpoint.skip_slot_variables)

    def assert_consumed(self) -> "CheckpointLoadStatus":
        """Every saved value was used and every live object with values was matched."""
        self.assert_existing_objects_matched()
        checkpoint = self._checkpoint
        names = pretty_node_names(checkpoint.nodes)
        ignored = checkpoint.slot_variable_node_ids if checkpoint.skip_slot_variables else set()
        for node_id, node in enumerate(checkpoint.nodes):
            if not node["attributes"] or node_id in ignored:
                continue
            if checkpoint.object_by_proto_id.get(node_id) is None:
                raise AssertionError(f"Unresolved object in checkpoint {names[node_id]}: {node}")
        if not checkpoint.skip_slot_variables and checkpoint.slot_restorations:
            raise AssertionError(f"Unresolved slot restorations: {checkpoint.slot_restorations}")
        if checkpoint.unused_attributes:
            lines = [
                f"{names[node_id]} ({checkpoint.object_by_proto_id.get(node_id)}): {attributes}"
                for node_id, attributes in checkpoint.unused_attributes.items()
            ]
            raise AssertionError(
                "Unused attributes in these objects (the attributes exist in the checkpoint but were not "
                "restored):\n" + "\n".join(lines)
            )
        return self

    def assert_existing_objects_matched(self) -> "CheckpointLoadStatus":
        """Every live object that owns values was matched; extra saved values are allowed."""
        checkpoint = self._checkpoint
        for node_id, obj in checkpoint.object_by_proto_id.items():
            if isinstance(obj, Trackable) and obj._update_uid < checkpoint.restore_uid:
                raise AssertionError(f"Object {checkpoint.nodes[node_id]} not assigned a value from checkpoint.")
        for obj in self._live_objects():
            if isinstance(obj, TrackableDataStructure) and not _has_children(obj):
                continue
            checkpoint.note_python_object(obj)
        bound = {id(obj) for obj in checkpoint.object_by_proto_id.values()}
        unused = [obj for obj in _objects_with_attributes(checkpoint.python_objects()) if id(obj) not in bound]
        if unused:
            shown = min(10, len(unused))
            raise AssertionError(
                f"Found {len(unused)} Python objects that were not bound to checkpointed values, likely due to "
                f"changes in the Python program. Showing {shown} of {len(unused)} unmatched objects: "
                f"{unused[:shown]}"
            )
        return self

    def assert_nontrivial_match(self) -> "CheckpointLoadStatus":
        """Something besides the root was matched."""
        checkpoint = self._checkpoint
        for obj in self._live_objects():
            checkpoint.note_python_object(obj)
        if len(checkpoint.object_by_proto_id) <= 1:
            bound = {id(obj) for obj in checkpoint.object_by_proto_id.values()}
            unused = [obj for obj in _objects_with_attributes(checkpoint.python_objects()) if id(obj) not in bound]
            if unused:
                raise AssertionError(
                    "Nothing except the root object matched a checkpointed value. Typically this means that the "
                    "checkpoint does not match the Python program. The following objects have no matching "
                    f"checkpointed value: {unused}"
                )
            raise AssertionError(f"Nothing to load. No dependencies have been added to {self._view.root_object} yet.")
        return self

    def expect_partial(self) -> "CheckpointLoadStatus":
        """Silence the warning about unused checkpoint values when this restore is garbage-collected."""
        self._checkpoint.expect_partial()
        return self

    def run_restore_ops(self, session: Any = None) -> None:
        """Restores run eagerly; kept for API compatibility."""

    def initialize_or_restore(self, session: Any = None) -> None:
        """Restores run eagerly; kept for API compatibility."""


def _has_children(obj: TrackableDataStructure) -> bool:
    try:
        return bool(obj._trackable_children())
    except ValueError:
        return True


class InitializationOnlyStatus:
    """What ``restore(None)`` returns: nothing was restored, so every assertion fails."""

    _MESSAGE = "No checkpoint specified (save_path=None); nothing is being restored."

    def __init__(self, view: GraphView):
        self._view = view
        self._root = view.root_object

    def assert_consumed(self):
        raise AssertionError(self._MESSAGE)

    def assert_existing_objects_matched(self):
        raise AssertionError(self._MESSAGE)

    def assert_nontrivial_match(self):
        raise AssertionError(self._MESSAGE)

    def run_restore_ops(self, session: Any = None):
        raise AssertionError(self._MESSAGE)

    def initialize_or_restore(self, session: Any = None) -> None:
        """Variables are initialised at creation; nothing to do."""

    def expect_partial(self) -> "InitializationOnlyStatus":
        return self

