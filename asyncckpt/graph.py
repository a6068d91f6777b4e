"""The object graph: a breadth-first walk from the root that names every saved value.

Pure functions over live trackables. The walk visits children in ``_trackable_children()`` order;
each object gets the node id and path of the first time it is reached, so cycles end and shared
objects appear once (with one incoming edge per parent). Optimizer slot variables are not
dependencies but hyper-edges (optimizer × variable); they are appended as extra nodes after the walk.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import weakref
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from asyncckpt import _arrays
from asyncckpt.model.autotrackable import AutoTrackable, untracked_names
from asyncckpt.model.data_structures import DictWrapper, ListWrapper, TrackableDataStructure, TupleWrapper
from asyncckpt.model.trackable import Trackable, TrackableReference, mark_walked, structure_version
from asyncckpt.model.variable import VARIABLE_VALUE_KEY, Variable

__all__ = [
    "OBJECT_GRAPH_KEY",
    "GraphView",
    "SerializedGraph",
    "GraphCache",
    "escape_local_name",
    "object_path_to_string",
    "checkpoint_key",
    "slot_variable_key",
    "serialize_graph",
    "list_objects",
    "pretty_node_names",
    "has_checkpoint_values",
]

logger = logging.getLogger("asyncckpt")

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_ATTRIBUTES = ".ATTRIBUTES"
_OPTIMIZER_SLOT = ".OPTIMIZER_SLOT"


def escape_local_name(name: str) -> str:
    """Escape ``.`` then ``/`` so that any local name is one path segment: ``a/b`` → ``a.Sb``."""
    if "." not in name and "/" not in name:  # most names: nothing to escape
        return name
    return name.replace(".", "..").replace("/", ".S")


def object_path_to_string(path: Sequence[str]) -> str:
    return "/".join(escape_local_name(name) for name in path)


def checkpoint_key(object_path: str, attribute: str) -> str:
    return f"{object_path}/{_ATTRIBUTES}/{escape_local_name(attribute)}"


def slot_variable_key(variable_path: str, optimizer_path: str, slot_name: str) -> str:
    return f"{variable_path}/{_OPTIMIZER_SLOT}/{optimizer_path}/{escape_local_name(slot_name)}"


@dataclasses.dataclass(frozen=True)
class GraphView:
    """A root plus the dependencies attached to it by a ``Checkpoint`` (kwargs, ``save_counter``).

    ``root`` may be a ``weakref.ref``: a checkpoint must not keep its root alive.
    """

    root: Any
    attached: Sequence[TrackableReference] = ()

    @property
    def root_object(self) -> Trackable:
        root = self.root() if isinstance(self.root, weakref.ref) else self.root
        if root is None:
            raise ValueError("the root object of this Checkpoint has been garbage-collected")
        return root

    def children_edges(self, obj: Trackable) -> list[tuple[str, Trackable]]:
        """``obj``'s named edges; the root's are followed by attached ones whose names are new."""
        edges = list(obj._trackable_children().items())
        if obj is self.root_object:
            names = {name for name, _ in edges}
            for ref in self.attached:
                target = ref.ref() if isinstance(ref.ref, weakref.ref) else ref.ref
                if target is not None and ref.name not in names:
                    edges.append((ref.name, target))
        return edges


@dataclasses.dataclass(frozen=True)
class SerializedGraph:
    """What a save needs from the object model: the graph document and the values to write."""

    object_graph: dict
    entries: tuple[tuple[str, Any], ...]  # (checkpoint key, value source), graph order
    objects: tuple[Trackable, ...]  # node id -> object


def _breadth_first(view: GraphView):
    """Objects in BFS order, their paths, and every edge (including repeated ones) per node."""
    root = view.root_object
    order: list[Trackable] = [root]
    paths: dict[int, tuple[str, ...]] = {id(root): ()}
    edges: list[list[tuple[str, Trackable]]] = []
    queue = collections.deque([root])
    while queue:
        current = queue.popleft()
        current_edges = view.children_edges(current)
        edges.append(current_edges)
        for name, child in current_edges:
            if id(child) not in paths:
                paths[id(child)] = paths[id(current)] + (name,)
                order.append(child)
                queue.append(child)
    return order, paths, edges


def _slot_providers(objects: Iterable[Trackable]) -> list[Trackable]:
    return [obj for obj in objects if callable(getattr(obj, "get_slot_names", None))]


def _get_slot(optimizer: Any, variable: Any, slot_name: str):
    try:
        return optimizer.get_slot(variable, slot_name)
    except (KeyError, AttributeError):
        return None


def _is_variable(obj: Any) -> bool:
    return isinstance(obj, Variable)


_DECLARED_CHILDREN = Trackable._trackable_children
_NO_VALUES = Trackable._serialize_to_tensors
_VARIABLE_VALUES = Variable._serialize_to_tensors


def _slots_are_tracked(provider: Any) -> bool:
    """Whether ``provider``'s slot methods come from a class promising to report slot changes."""
    for method in ("get_slot", "get_slot_names"):
        owner = next((cls for cls in type(provider).__mro__ if method in vars(cls)), None)
        if owner is None or not vars(owner).get("_tracks_slot_changes", False):
            return False
    return True


@dataclasses.dataclass
class _Reuse:
    """What a cached graph must re-check, and re-read, at every save (see :class:`GraphCache`)."""

    cacheable: bool = True
    computed_children: list = dataclasses.field(default_factory=list)  # (object, tuple of (name, child))
    computed_values: list = dataclasses.field(default_factory=list)  # (object, names, entry indices)


def _children_at(view: GraphView, obj: Trackable, object_path: str) -> list[tuple[str, Trackable]]:
    """``obj``'s edges; an object that refuses to be saved (a list changed behind its wrapper) is named by path."""
    try:
        return view.children_edges(obj)
    except ValueError as error:
        if type(error) is not ValueError:
            raise  # a more specific error keeps its type and its message
        where = f"checkpoint path {object_path!r}" if object_path else "the root of the checkpoint"
        raise ValueError(f"{error} The object is at {where}.") from error


def serialize_graph(view: GraphView, *, skip_slots: bool = False) -> SerializedGraph:
    """Walk the live objects and return the object-graph document and the values to save."""
    return _serialize(view, skip_slots=skip_slots)[0]


def _serialize(view: GraphView, *, skip_slots: bool = False, known_values: dict | None = None):
    """:func:`serialize_graph`, plus what :class:`GraphCache` needs to reuse the result."""
    reuse = _Reuse()
    root = view.root_object
    order: list[Trackable] = [root]
    node_ids: dict[int, int] = {id(root): 0}
    path_of: list[str] = [""]
    nodes: list[dict] = []
    entries: list[tuple[str, Any]] = []
    seen_keys: set[str] = set()
    known_values = known_values or {}

    def add_attributes(obj: Trackable, object_path: str, full_name: str) -> list[dict]:
        method = type(obj)._serialize_to_tensors
        if method is _NO_VALUES:
            return []
        if method is _VARIABLE_VALUES:
            tensors = {VARIABLE_VALUE_KEY: obj}
        else:
            tensors = known_values.get(id(obj))
            if tensors is None:
                tensors = obj._serialize_to_tensors()
            reuse.computed_values.append((obj, tuple(tensors), tuple(range(len(entries), len(entries) + len(tensors)))))
        attributes = []
        prefix = f"{object_path}/{_ATTRIBUTES}/"
        for name, value in tensors.items():
            key = prefix + escape_local_name(name)
            if key == OBJECT_GRAPH_KEY:
                raise ValueError(f"the checkpoint key {OBJECT_GRAPH_KEY} is reserved")
            if key in seen_keys:
                raise ValueError(
                    "Recieved multiple tensors with the same checkpoint key and slice spec. This is "
                    f"invalid because one will overwrite the other in the checkpoint. Key: {key}"
                )
            seen_keys.add(key)
            attributes.append({"name": name, "full_name": full_name or name, "checkpoint_key": key})
            entries.append((key, value))
        return attributes

    index = 0
    while index < len(order):  # breadth first: `order` is the queue
        obj = order[index]
        object_path = path_of[index]
        if not mark_walked(obj):  # marked before its children are read: a change from now on is counted
            reuse.cacheable = False
        obj_edges = _children_at(view, obj, object_path)
        if type(obj)._trackable_children is not _DECLARED_CHILDREN:
            reuse.computed_children.append((obj, tuple(obj_edges) if obj is not root else None))
        children = []
        for name, child in obj_edges:
            child_id = node_ids.get(id(child))
            if child_id is None:
                child_id = node_ids[id(child)] = len(order)
                order.append(child)
                escaped = escape_local_name(name)
                path_of.append(f"{object_path}/{escaped}" if object_path else escaped)
            children.append({"node_id": child_id, "local_name": name})
        nodes.append(
            {
                "children": children,
                "attributes": add_attributes(obj, object_path, getattr(obj, "_name", "") if _is_variable(obj) else ""),
                "slot_variables": [],
            }
        )
        index += 1

    if not skip_slots:
        variables = [obj for obj in order if _is_variable(obj)]
        for optimizer in _slot_providers(order):
            if not _slots_are_tracked(optimizer):
                reuse.cacheable = False  # its slots may change without telling anyone
            optimizer_path = path_of[node_ids[id(optimizer)]]
            for slot_name in optimizer.get_slot_names():
                for variable in variables:
                    slot = _get_slot(optimizer, variable, slot_name)
                    if slot is None:
                        continue
                    if id(slot) in node_ids:
                        raise NotImplementedError(
                            f"A slot variable was re-used as a dependency of a Trackable object: {slot}. "
                            "This is not currently allowed."
                        )
                    if slot._trackable_children():
                        raise NotImplementedError(
                            f"Currently only variables with no dependencies can be saved as slot variables. "
                            f"File a feature request if this limitation bothers you. (Got {slot})"
                        )
                    slot_id = len(order)
                    node_ids[id(slot)] = slot_id
                    order.append(slot)
                    variable_path = path_of[node_ids[id(variable)]]
                    slot_path = slot_variable_key(variable_path, optimizer_path, slot_name)
                    nodes.append(
                        {
                            "children": [],
                            "attributes": add_attributes(slot, slot_path, getattr(slot, "_name", "")),
                            "slot_variables": [],
                        }
                    )
                    nodes[node_ids[id(optimizer)]]["slot_variables"].append(
                        {
                            "original_variable_node_id": node_ids[id(variable)],
                            "slot_name": slot_name,
                            "slot_variable_node_id": slot_id,
                        }
                    )

    values = has_checkpoint_values(nodes)
    for node, value in zip(nodes, values):
        node["has_checkpoint_values"] = value
    graph = SerializedGraph(object_graph={"nodes": nodes}, entries=tuple(entries), objects=tuple(order))
    return graph, reuse


# ---------------------------------------------------------------------------------------------
# State that is not saved


_WARNED = "_self_unsaved_warned"


_NEVER_ARRAYS = (Trackable, str, int, float, type(None))


def _is_array(value: Any) -> bool:
    if isinstance(value, _NEVER_ARRAYS):  # most attributes: answered without probing for device arrays
        return False
    return isinstance(value, np.ndarray) or _arrays.is_device_array(value)


def _holds_arrays(value: Any) -> bool:
    """A plain list, tuple or dict with an array among its elements (one level deep)."""
    if isinstance(value, Trackable):
        return False  # a container wrapper: a node of its own, looked at as such
    if isinstance(value, (list, tuple)):
        return any(_is_array(element) for element in value)
    if isinstance(value, dict):
        return any(_is_array(element) for element in value.values())
    return False


def _container_elements(obj: TrackableDataStructure) -> Iterator[tuple[Any, Any]]:
    if isinstance(obj, DictWrapper):
        return iter(obj._storage.items())
    if isinstance(obj, ListWrapper):
        return enumerate(obj._storage)
    if isinstance(obj, TupleWrapper):
        return enumerate(tuple.__iter__(obj))
    return iter(())


def _unsaved_values(obj: Any) -> Iterator[tuple[str, str]]:
    """``(suffix, what)`` for each array ``obj`` holds that no checkpoint saves.

    Only attribute-tracking objects and containers are looked at, and only those saving no
    values of their own (a custom ``_serialize_to_tensors`` may save its arrays itself).
    """
    if type(obj)._serialize_to_tensors is not _NO_VALUES:
        return
    if isinstance(obj, TrackableDataStructure):
        for key, value in _container_elements(obj):
            if _is_array(value):
                yield f"[{key!r}]", "a NumPy array"
    elif isinstance(obj, AutoTrackable):
        silenced = untracked_names(obj)
        for name, value in list(vars(obj).items()):
            if name.startswith("_self_") or name in silenced:
                continue
            if _is_array(value):
                yield f".{name}", "a NumPy array"
            elif _holds_arrays(value):
                yield f".{name}", f"a {type(value).__name__} of NumPy arrays"


def warn_unsaved_state(graph: SerializedGraph) -> None:
    """Log, once per attribute of each object, arrays in the saved graph that are not saved.

    TensorFlow's rule stands -- only trackables are saved -- but an array assigned to an
    attribute is dropped without a word, so a save names it and what to wrap it in. Runs when a
    graph is built, never for a cached one, so repeat saves pay nothing.
    """
    names = None
    for node_id, obj in enumerate(graph.objects):
        found = list(_unsaved_values(obj))
        if not found:
            continue
        warned = obj.__dict__.setdefault(_WARNED, set())
        for suffix, what in found:
            if suffix in warned:
                continue
            warned.add(suffix)
            names = names or pretty_node_names(graph.object_graph["nodes"])
            logger.warning(
                "%s%s holds %s, which checkpoints do not save (only trackable objects are saved). Wrap it in "
                "asyncckpt.Variable to save it, or assign it as asyncckpt.NoDependency(value) (or keep it in "
                "a PythonState) to silence this warning.",
                names[node_id], suffix, what,
            )


def _attached_targets(view: GraphView) -> tuple:
    return tuple(ref.ref() if isinstance(ref.ref, weakref.ref) else ref.ref for ref in view.attached)


def _attached_identities(view: GraphView) -> tuple:
    """What identifies the attached objects, without keeping weakly attached ones alive.

    A strong reference is identified by its target's id (the view holds the target); a weak one
    by the weak reference itself and whether its target was alive.
    """
    return tuple(
        (ref.ref, ref.ref() is not None) if isinstance(ref.ref, weakref.ref) else (None, id(ref.ref))
        for ref in view.attached
    )


class GraphCache:
    """The last serialized graph of a checkpoint, reused while nothing it was built from changed.

    Saving the same objects again and again is the common case, and walking 10,000 variables costs
    far more than the save's stall budget. A cached graph is reused when

    * :func:`~asyncckpt.model.trackable.structure_version` is the one it was built at (every
      ``_track_trackable``, ``_delete_tracking``, container mutation and optimizer slot creation
      of an object some graph walk has reached moves it on; objects no walk has reached yet, such
      as a ``Checkpoint`` built for a restore between two saves, are in no cached graph and move
      nothing until they are attached to one that is);
    * the root is the same object, and weakly attached objects are the same (or gone the same);
    * every object whose children are computed rather than declared (list and dict wrappers, user
      overrides of ``_trackable_children``) reports the same children -- they are asked again, so a
      list changed behind its wrapper's back still fails the save as it should;
    * every object with computed values (``PythonState``, custom ``_serialize_to_tensors``)
      reports the same attribute names.

    Computed values are taken fresh at every save; variables are read live by the snapshot
    anyway. A graph with a slot provider that does not report slot changes (anything with
    ``get_slot_names`` but not an asyncckpt ``Optimizer``) is never cached. The cache does not keep
    the root alive: it holds it weakly, and forgets everything when the root is collected.
    """

    def __init__(self) -> None:
        self._graph: SerializedGraph | None = None
        self._version = -1
        self._root: weakref.ref | None = None
        self._attached: tuple = ()
        self._reuse: _Reuse | None = None
        self._attachment: Any = None
        self._released: SerializedGraph | None = None  # the cached graph once its computed values are dropped
        self._finalizer: weakref.finalize | None = None

    def attach(self, graph: SerializedGraph, value: Any) -> None:
        """Keep ``value`` (derived from ``graph``) for as long as ``graph`` stays cached."""
        if self._graph is graph:
            self._attachment = value

    def attachment(self, graph: SerializedGraph) -> Any:
        """What was attached to ``graph`` if it is still the cached graph, else ``None``."""
        return self._attachment if self._graph is graph else None

    def computed_indices(self) -> frozenset[int]:
        """The entries of the cached graph that are computed values (taken fresh at every save)."""
        if self._reuse is None:
            return frozenset()
        return frozenset(index for _, _, indices in self._reuse.computed_values for index in indices)

    def release_computed(self) -> None:
        """Stop holding the computed values the cached graph was built with.

        They are taken fresh at every save (:meth:`serialize` returns them), so between saves the
        cache keeps only the layout: not the last save's ``PythonState`` bytes, the arrays of a
        ``state_dict`` or the host views of a JAX tree (which would keep XLA from donating them).
        """
        graph, reuse = self._graph, self._reuse
        if graph is None or reuse is None or not reuse.computed_values or graph is self._released:
            return
        computed = self.computed_indices()
        entries = tuple((key, None if index in computed else source) for index, (key, source) in enumerate(graph.entries))
        self._graph = self._released = dataclasses.replace(graph, entries=entries)

    def clear(self) -> None:
        """Forget the cached graph (and every object it holds)."""
        self._graph = self._reuse = self._root = self._attachment = self._released = None
        self._attached = ()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def serialize(self, view: GraphView) -> tuple[SerializedGraph, dict[int, Any] | None]:
        """The graph of ``view`` now, and the fresh computed values.

        Returns ``(graph, values)``: ``values`` is ``None`` when the graph was (re)built -- its
        entries are all current -- or ``{entry index: value}`` for the computed attributes of a
        reused graph, whose other entries are the same variables as before. ``graph.objects`` is
        empty (use :func:`list_objects` for the live objects).
        """
        version = structure_version()
        root = view.root_object
        values = self._fresh_values(view, root, version)
        if values is not None:
            return self._graph, values
        known = self._known
        self._known = None
        graph, reuse = _serialize(view, known_values=known)
        warn_unsaved_state(graph)
        graph = dataclasses.replace(graph, objects=())  # the node list would hold the root strongly
        self.clear()
        if reuse.cacheable and not self._holds(root, graph, reuse):
            self._graph, self._reuse, self._version = graph, reuse, version
            self._root = weakref.ref(root)
            self._attached = _attached_identities(view)
            self._finalizer = weakref.finalize(root, self.clear)
            self._finalizer.atexit = False
        return graph, None

    _known: dict | None = None

    @staticmethod
    def _holds(root: Any, graph: SerializedGraph, reuse: _Reuse) -> bool:
        """Whether caching would keep ``root`` itself alive (it is a value or is asked again)."""
        return (
            any(source is root for _, source in graph.entries)
            or any(obj is root for obj, _, _ in reuse.computed_values)
            or any(obj is root for obj, _ in reuse.computed_children)
        )

    def _fresh_values(self, view: GraphView, root: Any, version: int) -> dict[int, Any] | None:
        graph, reuse = self._graph, self._reuse
        if graph is None or reuse is None or version != self._version or self._root() is not root:
            return None
        if _attached_identities(view) != self._attached:
            return None
        for obj, cached in reuse.computed_children:
            try:
                current = view.children_edges(obj)
            except ValueError:
                return None  # the fresh walk raises it again, naming where the object is
            if cached is not None and (
                len(current) != len(cached)
                or any(name != old_name or child is not old_child
                       for (name, child), (old_name, old_child) in zip(current, cached))
            ):
                return None
        if structure_version() != version:  # asking for children flagged a changed container
            return None
        values: dict[int, Any] = {}
        known: dict[int, dict] = {}
        for obj, names, indices in reuse.computed_values:
            tensors = obj._serialize_to_tensors()
            known[id(obj)] = tensors
            if tuple(tensors) != names:
                self._known = known  # the rebuild reuses them: serialize() runs once per save
                return None
            for index, name in zip(indices, names):
                values[index] = tensors[name]
        return values


def has_checkpoint_values(nodes: Sequence[dict]) -> list[bool]:
    """True for nodes that own attributes or slots, or reach one through children (cycles allowed)."""
    values = [bool(node.get("attributes") or node.get("slot_variables")) for node in nodes]
    changed = True
    while changed:
        changed = False
        # Children mostly have larger ids than their parents (breadth-first): going backwards
        # settles a tree in one pass, and the loop still handles cycles and back edges.
        for index in range(len(nodes) - 1, -1, -1):
            if not values[index] and any(values[child["node_id"]] for child in nodes[index].get("children", ())):
                values[index] = True
                changed = True
    return values


def list_objects(view: GraphView, *, skip_slots: bool = False) -> list[Trackable]:
    """Every object reachable from the root, slot variables included unless ``skip_slots``."""
    order, _, _ = _breadth_first(view)
    if skip_slots:
        return order
    seen = {id(obj) for obj in order}
    variables = [obj for obj in order if _is_variable(obj)]
    for optimizer in _slot_providers(list(order)):
        for slot_name in optimizer.get_slot_names():
            for variable in variables:
                slot = _get_slot(optimizer, variable, slot_name)
                if slot is not None and id(slot) not in seen:
                    seen.add(id(slot))
                    order.append(slot)
    return order


def is_empty_data_structure(obj: Trackable) -> bool:
    return isinstance(obj, TrackableDataStructure) and not obj._trackable_children()


def pretty_node_names(nodes: Sequence[dict]) -> dict[int, str]:
    """``(root).a.b`` style names for every node, slots as ``(root).opt's state 'm' for (root).v``."""
    names = {0: "(root)"}
    queue = collections.deque([0])
    while queue:
        node_id = queue.popleft()
        for child in nodes[node_id].get("children", ()):
            if child["node_id"] not in names:
                names[child["node_id"]] = f"{names[node_id]}.{child['local_name']}"
                queue.append(child["node_id"])
    for node_id, node in enumerate(nodes):
        for slot in node.get("slot_variables", ()):
            optimizer_name = names.get(node_id, f"node {node_id}")
            variable_name = names.get(slot["original_variable_node_id"], f"node {slot['original_variable_node_id']}")
            names.setdefault(
                slot["slot_variable_node_id"],
                f"{optimizer_name}'s state '{slot['slot_name']}' for {variable_name}",
            )
    for node_id in range(len(nodes)):
        names.setdefault(node_id, f"(unreachable node {node_id})")
    return names
