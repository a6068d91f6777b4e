"""The README's GPU snippets run as written on a CUDA machine (the CPU tier only compiles them)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
SNIPPETS = re.findall(r"^<!-- readme-test: gpu -->\n```python\n(.*?)^```$", README, re.MULTILINE | re.DOTALL)


def test_the_readme_has_gpu_snippets():
    assert SNIPPETS


@pytest.mark.parametrize("body", SNIPPETS, ids=[f"gpu-snippet{i}" for i in range(len(SNIPPETS))])
def test_gpu_snippet_runs(cp, tmp_path, body):
    proc = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, f"README GPU snippet failed:\n{body}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
