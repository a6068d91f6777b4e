"""Pure: which managed checkpoints leave the active set, and which of those are deleted or preserved.

`asyncckpt.CheckpointManager` keeps an *active set* of checkpoints, oldest first, each with the
time it was saved. After each save, while more than ``max_to_keep`` are active, the oldest leave
it; one leaving is *preserved* (kept on disk, no longer listed by any manager) when at least
``keep_checkpoint_every_n_hours`` passed between the last preserved checkpoint (the
*preservation clock*) and it, and deleted otherwise. ``max_to_keep=None`` keeps every checkpoint
active and preserves none (TensorFlow's ``CheckpointManager._sweep``).

Nothing here reads a file or a clock: the caller passes the active set, the times and the paths
that must not leave (the checkpoint just saved, those a run must not expire), and applies the
`Expiry` it gets back.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Collection, Mapping

__all__ = ["Expiry", "RetentionPolicy"]


@dataclasses.dataclass(frozen=True)
class Expiry:
    """What one save changes in the active set.

    Attributes
    ----------
    expiring : tuple of str
        The paths leaving the active set, oldest first.
    doomed : tuple of str
        Those of ``expiring`` to delete; the others are preserved.
    last_preserved : float
        The preservation clock afterwards: the timestamp of the newest preserved checkpoint, or
        the clock as it was when none is preserved.
    """

    expiring: tuple[str, ...]
    doomed: tuple[str, ...]
    last_preserved: float


@dataclasses.dataclass(frozen=True)
class RetentionPolicy:
    """``max_to_keep`` and ``keep_checkpoint_every_n_hours``, and the expiry they decide.

    Parameters
    ----------
    max_to_keep : int or None
        How many checkpoints stay active; ``None`` keeps all of them.
    keep_checkpoint_every_n_hours : float, optional
        Preserve a checkpoint leaving the active set when at least this many hours passed since
        the last preserved one; ``None`` (or 0) preserves none.

    Raises
    ------
    ValueError
        If ``max_to_keep`` is not a positive integer or ``None``, or
        ``keep_checkpoint_every_n_hours`` is not a non-negative number or ``None``.
    """

    max_to_keep: int | None
    keep_checkpoint_every_n_hours: float | None = None

    def __post_init__(self) -> None:
        max_to_keep, hours = self.max_to_keep, self.keep_checkpoint_every_n_hours
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or not isinstance(max_to_keep, numbers.Integral) or max_to_keep <= 0
        ):
            raise ValueError(f"Expected a positive integer or `None` for `max_to_keep`, got {max_to_keep!r}.")
        if hours is not None and (not isinstance(hours, numbers.Real) or not hours >= 0):
            raise ValueError(
                f"`keep_checkpoint_every_n_hours` must be a non-negative number or `None`, got {hours!r}."
            )
        if max_to_keep is not None:
            object.__setattr__(self, "max_to_keep", int(max_to_keep))  # a NumPy integer becomes an int

    def over_limit(self, active_count: int) -> bool:
        """Whether an active set of ``active_count`` checkpoints has some to expire."""
        return bool(self.max_to_keep) and active_count > self.max_to_keep

    def expire(
        self, active: Mapping[str, float], last_preserved: float, *, protected: Collection[str] = ()
    ) -> Expiry:
        """The oldest of ``active`` beyond ``max_to_keep`` that leave it, and what becomes of them.

        Parameters
        ----------
        active : mapping of str to float
            The active set, oldest first: path to the time it was saved.
        last_preserved : float
            The preservation clock.
        protected : collection of str
            Paths that never leave, whatever their age (the checkpoint just saved, say); the
            oldest of the others leave in their place.

        Returns
        -------
        Expiry
            Nothing expiring when the active set is within ``max_to_keep``.
        """
        if not self.over_limit(len(active)):
            return Expiry((), (), last_preserved)
        excess = len(active) - self.max_to_keep
        expirable = [(path, timestamp) for path, timestamp in active.items() if path not in protected]
        expiring, doomed = [], []
        for path, timestamp in expirable[:excess]:
            expiring.append(path)
            if self.keep_checkpoint_every_n_hours and (
                timestamp - self.keep_checkpoint_every_n_hours * 3600.0 >= last_preserved
            ):
                # Kept on disk but no longer listed, so the state file cannot grow forever.
                last_preserved = timestamp
            else:
                doomed.append(path)
        return Expiry(tuple(expiring), tuple(doomed), last_preserved)
