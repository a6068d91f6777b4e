"""The public surface of ``asyncckpt`` is exactly ``__all__``: nothing more, nothing less, by intent."""

from __future__ import annotations

import types

import asyncckpt

# Changing this list changes the public API: do it on purpose, with the README and the docs.
PUBLIC = {
    "AutoTrackable",
    "Box",
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointOptions",
    "CheckpointState",
    "CheckpointTimeoutError",
    "CoordinationError",
    "Coordinator",
    "CorruptCheckpointError",
    "InProcessCoordinator",
    "JaxDistributedCoordinator",
    "Module",
    "MultiWorker",
    "NoDependency",
    "NotFoundError",
    "PyTree",
    "PythonState",
    "RandomState",
    "ReadSettings",
    "ShardedVariable",
    "StateDict",
    "TorchDistributedCoordinator",
    "Trackable",
    "UnsupportedFormatError",
    "Variable",
    "WriteSettings",
    "add_variable",
    "checkpoint_exists",
    "get_checkpoint_state",
    "latest_checkpoint",
    "list_variables",
    "load_checkpoint",
    "load_variable",
    "object_metadata",
    "optimizers",
    "update_checkpoint_state",
}


def test_all_is_exactly_the_intended_public_names_without_duplicates():
    assert len(asyncckpt.__all__) == len(set(asyncckpt.__all__))
    assert set(asyncckpt.__all__) == PUBLIC


def test_every_name_in_all_exists_and_star_import_gives_exactly_all():
    namespace: dict = {}
    exec("from asyncckpt import *", namespace)
    assert set(namespace) - {"__builtins__"} == PUBLIC
    for name in asyncckpt.__all__:
        assert getattr(asyncckpt, name) is namespace[name]


def test_no_public_attribute_outside_all_except_the_package_modules():
    extra = {name for name in dir(asyncckpt) if not name.startswith("_")} - PUBLIC
    for name in extra:
        value = getattr(asyncckpt, name)
        assert isinstance(value, types.ModuleType) and value.__name__ == f"asyncckpt.{name}", (
            f"asyncckpt.{name} is public but not in __all__"
        )


def test_public_classes_and_functions_say_where_they_live():
    for name in PUBLIC - {"optimizers"}:
        value = getattr(asyncckpt, name)
        assert value.__module__.startswith("asyncckpt."), name
        assert (value.__doc__ or "").strip(), f"asyncckpt.{name} has no docstring"
