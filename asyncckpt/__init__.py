"""asyncckpt: asynchronous, GPU-aware checkpointing with the tf.train.Checkpoint programming model.

The public surface is exactly ``__all__``.
"""

from asyncckpt import optimizers
from asyncckpt.checkpoint import Checkpoint, CheckpointOptions, add_variable
from asyncckpt.checkpoint_management import (
    CheckpointManager,
    CheckpointState,
    checkpoint_exists,
    get_checkpoint_state,
    latest_checkpoint,
    update_checkpoint_state,
)
from asyncckpt.errors import (
    CheckpointError,
    CheckpointTimeoutError,
    CoordinationError,
    CorruptCheckpointError,
    NotFoundError,
    UnsupportedFormatError,
)
from asyncckpt.io.coordinator import Coordinator, InProcessCoordinator
from asyncckpt.io.jax_coordinator import JaxDistributedCoordinator
from asyncckpt.io.torch_coordinator import TorchDistributedCoordinator
from asyncckpt.io.settings import MultiWorker, ReadSettings, WriteSettings
from asyncckpt.model.adapters import PyTree, StateDict
from asyncckpt.model.adapters.rng import RandomState
from asyncckpt.model.autotrackable import AutoTrackable
from asyncckpt.model.module import Module
from asyncckpt.model.python_state import PythonState
from asyncckpt.model.sharded import ShardedVariable
from asyncckpt.model.trackable import NoDependency, Trackable
from asyncckpt.model.variable import Variable
from asyncckpt.readers import list_variables, load_checkpoint, load_variable, object_metadata
from asyncckpt.shards import Box

__all__ = [
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
]
__version__ = "0.1.0"
