"""asyncckpt: asynchronous, GPU-aware checkpointing with the tf.train.Checkpoint programming model."""

from asyncckpt.errors import CheckpointError, CorruptCheckpointError, NotFoundError, UnsupportedFormatError

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "NotFoundError",
    "UnsupportedFormatError",
]
__version__ = "0.1.0"
