"""Running the scripts in ``examples/`` in fresh interpreters, as a user would, for their tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

__all__ = ["EXAMPLES", "RESUMED", "run_example"]

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RESUMED = re.compile(r"^resumed from (?P<path>\S+) at step (?P<step>\d+)$", re.MULTILINE)


def run_example(script: Path, directory: Path, *args: str, expect_rc: int = 0) -> subprocess.CompletedProcess:
    """Run ``script --dir directory *args`` with this checkout's asyncckpt; fail with its output
    unless it exits with ``expect_rc``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(script), "--dir", str(directory), *args], capture_output=True, text=True, env=env
    )
    assert proc.returncode == expect_rc, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc
