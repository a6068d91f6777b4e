"""``examples/distributed_train.py`` under torchrun: two tensor-parallel ranks train and save their slices,
resume bit-exact, then one rank resumes their checkpoint."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed_train.py"


def _torchrun(ranks: int, directory: Path, steps: int) -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", f"--master-port={port}",
         "--master-addr=127.0.0.1", str(EXAMPLE), "--dir", str(directory), "--steps", str(steps)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _final(output: str) -> re.Match:
    match = re.search(r"^step (\d+) loss \S+ model (\w+) latest (\S+)$", output, re.MULTILINE)
    assert match, output
    return match


@pytest.mark.slow  # four torchrun launches (each rank imports torch): ~40 s on 2 cores
def test_two_ranks_resume_bit_exact_and_one_rank_resumes_their_checkpoint(tmp_path):
    straight = _final(_torchrun(2, tmp_path / "straight", 30))
    _torchrun(2, tmp_path / "resumed", 20)
    again = _torchrun(2, tmp_path / "resumed", 10)
    assert "resumed from" in again and "at step 20 on 2 rank(s)" in again
    assert _final(again).group(2) == straight.group(2)  # the same bytes as a run that never stopped
    assert len(list((tmp_path / "resumed").glob("ckpt-30.data-*"))) == 2  # both ranks wrote their slices
    with open(tmp_path / "resumed" / "ckpt-30.index", "rb") as index:
        assert json.loads(index.read())["tensors"]["model/.ATTRIBUTES/0..weight"]["shards"]  # stored as slices
    single = _torchrun(1, tmp_path / "resumed", 10)
    assert "at step 30 on 1 rank(s)" in single and _final(single).group(1) == "40"
