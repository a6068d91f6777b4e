"""The object graph: a breadth-first walk from the root that names every saved value.

Pure functions over live trackables. The walk visits children in ``_trackable_children()`` order;
each object gets the node id and path of the first time it is reached, so cycles end and shared
objects appear once (with one incoming edge per parent). Optimizer slot variables are not
dependencies but hyper-edges (optimizer × variable); they are appended as extra nodes after the walk.
"""

from __future__ import annotations

import collections
import dataclasses
import weakref
from typing import Any, Iterable, Sequence

from asyncckpt.data_structures import TrackableDataStructure
from asyncckpt.trackable import Trackable, TrackableReference

__all__ = [
    "OBJECT_GRAPH_KEY",
    "GraphView",
    "SerializedGraph",
    "escape_local_name",
    "object_path_to_string",
    "checkpoint_key",
    "slot_variable_key",
    "serialize_graph",
    "list_objects",
    "pretty_node_names",
    "has_checkpoint_values",
]

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_ATTRIBUTES = ".ATTRIBUTES"
_OPTIMIZER_SLOT = ".OPTIMIZER_SLOT"


def escape_local_name(name: str) -> str:
    """Escape ``.`` then ``/`` so that any local name is one path segment: ``a/b`` → ``a.Sb``."""
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
    from asyncckpt.variable import Variable  # noqa: PLC0415 - sibling layer, import on use

    return isinstance(obj, Variable)


def serialize_graph(view: GraphView, *, skip_slots: bool = False) -> SerializedGraph:
    """Walk the live objects and return the object-graph document and the values to save."""
    order, paths, edges = _breadth_first(view)
    node_ids = {id(obj): index for index, obj in enumerate(order)}
    nodes: list[dict] = []
    entries: list[tuple[str, Any]] = []
    seen_keys: set[str] = set()

    def add_attributes(obj: Trackable, object_path: str, full_name_prefix: str) -> list[dict]:
        attributes = []
        for name, value in obj._serialize_to_tensors().items():
            key = checkpoint_key(object_path, name)
            if key == OBJECT_GRAPH_KEY:
                raise ValueError(f"the checkpoint key {OBJECT_GRAPH_KEY} is reserved")
            if key in seen_keys:
                raise ValueError(
                    "Recieved multiple tensors with the same checkpoint key and slice spec. This is "
                    f"invalid because one will overwrite the other in the checkpoint. Key: {key}"
                )
            seen_keys.add(key)
            attributes.append({"name": name, "full_name": full_name_prefix or name, "checkpoint_key": key})
            entries.append((key, value))
        return attributes

    for obj, obj_edges in zip(order, edges):
        object_path = object_path_to_string(paths[id(obj)])
        nodes.append(
            {
                "children": [{"node_id": node_ids[id(child)], "local_name": name} for name, child in obj_edges],
                "attributes": add_attributes(obj, object_path, getattr(obj, "_name", "") if _is_variable(obj) else ""),
                "slot_variables": [],
            }
        )

    if not skip_slots:
        variables = [obj for obj in order if _is_variable(obj)]
        for optimizer in _slot_providers(order):
            optimizer_path = object_path_to_string(paths[id(optimizer)])
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
                    variable_path = object_path_to_string(paths[id(variable)])
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
    return SerializedGraph(object_graph={"nodes": nodes}, entries=tuple(entries), objects=tuple(order))


def has_checkpoint_values(nodes: Sequence[dict]) -> list[bool]:
    """True for nodes that own attributes or slots, or reach one through children (cycles allowed)."""
    values = [bool(node.get("attributes") or node.get("slot_variables")) for node in nodes]
    changed = True
    while changed:
        changed = False
        for index, node in enumerate(nodes):
            if not values[index] and any(values[child["node_id"]] for child in node.get("children", ())):
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
