"""Fault injection: a training loop killed at random moments and at every stage boundary.

``_training_child.py`` is the loop (run as a separate process so that ``SIGKILL`` is real);
``test_kill_points.py`` drives it and checks what the crash left behind.
"""

__all__: list[str] = []
