"""The manager's retention policy (``asyncckpt.retention``): pure, so plain asserts over paths and times."""

from __future__ import annotations

import math

import numpy as np
import pytest

from asyncckpt.retention import Expiry, RetentionPolicy

HOUR = 3600.0


def active(*timestamps: float) -> dict[str, float]:
    """An active set ``ckpt-1, ckpt-2, ...`` (oldest first) saved at ``timestamps``."""
    return {f"ckpt-{number}": timestamp for number, timestamp in enumerate(timestamps, start=1)}


@pytest.mark.parametrize(
    ("max_to_keep", "hours", "message"),
    [
        (0, None, "got 0."),
        (-1, None, "got -1."),
        (1.5, None, "got 1.5."),
        (True, None, "got True."),
        ("3", None, "got '3'."),
        (2, -1, "got -1."),
        (2, math.nan, "got nan."),
        (2, "1", "got '1'."),
    ],
)
def test_invalid_arguments_are_refused_with_the_managers_messages(max_to_keep, hours, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        RetentionPolicy(max_to_keep, hours)


def test_numpy_integers_are_accepted_as_ints():
    policy = RetentionPolicy(np.int64(2), 0)
    assert policy.max_to_keep == 2 and type(policy.max_to_keep) is int


def test_within_max_to_keep_nothing_expires_and_the_clock_stands():
    policy = RetentionPolicy(3, keep_checkpoint_every_n_hours=1)
    for count in range(4):
        assert not policy.over_limit(count)
        assert policy.expire(active(*[10.0 * HOUR] * count), 5.0) == Expiry((), (), 5.0)


def test_max_to_keep_none_keeps_everything_and_preserves_nothing():
    policy = RetentionPolicy(None, keep_checkpoint_every_n_hours=1)
    assert not policy.over_limit(10_000)
    assert policy.expire(active(*(i * HOUR for i in range(100))), 0.0) == Expiry((), (), 0.0)


def test_the_oldest_beyond_max_to_keep_are_deleted():
    policy = RetentionPolicy(2)
    assert policy.over_limit(3)
    assert policy.expire(active(1.0, 2.0, 3.0), 0.0) == Expiry(("ckpt-1",), ("ckpt-1",), 0.0)
    # A smaller max_to_keep than the set holds expires several at once, oldest first.
    assert policy.expire(active(1.0, 2.0, 3.0, 4.0, 5.0), 0.0) == Expiry(
        ("ckpt-1", "ckpt-2", "ckpt-3"), ("ckpt-1", "ckpt-2", "ckpt-3"), 0.0
    )


def test_the_active_sets_order_decides_not_the_timestamps():
    # The set is oldest first by the caller's account (an overwritten checkpoint moves to the end).
    assert RetentionPolicy(1).expire({"b": 5.0, "a": 1.0}, 0.0).expiring == ("b",)


def test_a_checkpoint_n_hours_after_the_last_preserved_one_is_preserved_not_deleted():
    policy = RetentionPolicy(1, keep_checkpoint_every_n_hours=2)
    # Saved exactly 2 hours after the clock: preserved (>=), and the clock moves to it.
    assert policy.expire(active(2 * HOUR, 3 * HOUR), 0.0) == Expiry(("ckpt-1",), (), 2 * HOUR)
    # A second short of it: deleted, clock unchanged.
    assert policy.expire(active(2 * HOUR - 1, 3 * HOUR), 0.0) == Expiry(("ckpt-1",), ("ckpt-1",), 0.0)


def test_each_preserved_checkpoint_restarts_the_clock_within_one_expiry():
    policy = RetentionPolicy(1, keep_checkpoint_every_n_hours=1)
    # One every 40 minutes: the first after an hour is preserved, the next one 40 minutes later is
    # not (the clock moved), the one after that (80 minutes after the preserved one) is.
    minutes = [60, 100, 140, 180]
    expiry = policy.expire(active(*(m * 60.0 for m in minutes)), 0.0)
    assert expiry.expiring == ("ckpt-1", "ckpt-2", "ckpt-3")
    assert expiry.doomed == ("ckpt-2",)
    assert expiry.last_preserved == 140 * 60.0


@pytest.mark.parametrize("hours", [None, 0, 0.0])
def test_no_or_zero_hours_preserves_nothing(hours):
    expiry = RetentionPolicy(1, keep_checkpoint_every_n_hours=hours).expire(active(10 * HOUR, 20 * HOUR), 0.0)
    assert expiry == Expiry(("ckpt-1",), ("ckpt-1",), 0.0)


def test_protected_checkpoints_never_leave_and_the_next_oldest_leave_in_their_place():
    policy = RetentionPolicy(3)
    # ckpt-1 and ckpt-2 protected (found at start, say): ckpt-3 and ckpt-4 leave instead, ckpt-5 stays.
    expiry = policy.expire(active(1.0, 2.0, 3.0, 4.0, 5.0), 0.0, protected={"ckpt-1", "ckpt-2"})
    assert expiry.expiring == expiry.doomed == ("ckpt-3", "ckpt-4")


def test_the_checkpoint_just_saved_never_expires_even_if_it_is_the_oldest():
    # An overwritten checkpoint keeps an old timestamp; protecting it keeps it over the others.
    expiry = RetentionPolicy(1).expire({"ckpt-9": 1.0, "ckpt-2": 2.0}, 0.0, protected={"ckpt-9"})
    assert expiry.expiring == ("ckpt-2",)


def test_with_too_few_unprotected_checkpoints_only_those_leave():
    expiry = RetentionPolicy(1).expire(active(1.0, 2.0, 3.0), 0.0, protected={"ckpt-1", "ckpt-3"})
    assert expiry.expiring == ("ckpt-2",)
    everything = RetentionPolicy(1).expire(active(1.0, 2.0), 0.0, protected={"ckpt-1", "ckpt-2"})
    assert everything == Expiry((), (), 0.0)


def test_expire_changes_nothing_it_is_given():
    checkpoints = active(1.0, 2.0, 3.0)
    protected = {"ckpt-3"}
    RetentionPolicy(1, keep_checkpoint_every_n_hours=0).expire(checkpoints, 0.0, protected=protected)
    assert checkpoints == active(1.0, 2.0, 3.0) and protected == {"ckpt-3"}
