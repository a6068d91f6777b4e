"""``Module``: an ``AutoTrackable`` that can list the variables it owns."""

from __future__ import annotations

import collections
import re

from asyncckpt.model.autotrackable import AutoTrackable
from asyncckpt.model.variable import Variable

__all__ = ["Module"]


def _snake_case(name: str) -> str:
    """``MyModule`` → ``my_module``, ``HTTPServer`` → ``http_server``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class Module(AutoTrackable):
    """A container of variables and sub-modules, tracked through attribute assignment.

    ``variables`` and ``trainable_variables`` list every variable reachable from the module (through
    attributes, lists, dicts and sub-modules) once, in breadth-first order.
    """

    def __init__(self, name: str | None = None):
        self._maybe_initialize_trackable()
        object.__setattr__(self, "_self_module_name", name or _snake_case(type(self).__name__))

    @property
    def name(self) -> str:
        return self.__dict__.get("_self_module_name") or _snake_case(type(self).__name__)

    def _reachable(self) -> list:
        """Objects below this module, breadth-first, once each.

        Uses the declared dependencies directly (not ``_trackable_children``), so a list that can no
        longer be checkpointed (an element was replaced) still lists its variables.
        """
        seen = {id(self)}
        order: list = []
        queue = collections.deque([self])
        while queue:
            current = queue.popleft()
            for ref in current._checkpoint_dependencies:
                if id(ref.ref) not in seen:
                    seen.add(id(ref.ref))
                    order.append(ref.ref)
                    queue.append(ref.ref)
        return order

    @property
    def variables(self) -> list[Variable]:
        return [obj for obj in self._reachable() if isinstance(obj, Variable)]

    @property
    def trainable_variables(self) -> list[Variable]:
        return [variable for variable in self.variables if variable.trainable]

    @property
    def submodules(self) -> list["Module"]:
        return [obj for obj in self._reachable() if isinstance(obj, Module)]
