"""The benchmarks run end to end on tiny sizes, report every section and clean up after themselves.

bench.py, bench_torch.py, bench_loop.py, bench_dist.py and bench_sharded.py as they are; gpu_train_overhead.py with ``--device cpu``, its check of the script.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
BENCH = BENCHMARKS / "bench.py"


def run_bench(*args: str, script: Path = BENCH) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)


@pytest.mark.slow  # a child interpreter importing every peer it finds (torch, TensorStore): 14 s on 2 cores
def test_tiny_run_reports_every_section(tmp_path):
    workdir = tmp_path / "work"
    report = tmp_path / "report.md"
    proc = run_bench(
        "--size-mb", "2", "--small-arrays", "20", "--repeat", "1",
        "--train-state-mb", "1", "--train-steps", "2", "--train-matmul", "32",
        "--scaling", "--scaling-sizes-mb", "1", "--scaling-counts", "1,5",
        "--dir", str(workdir), "--output", str(report),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = report.read_text()
    assert text.strip() == proc.stdout.strip()
    for heading in (
        "## Machine",
        "### (a) large arrays: 4 arrays, 2.0 MiB",
        "### (b) small arrays of 4 KiB: 20 arrays, 0.1 MiB",
        "### Training overhead",
        "### asyncckpt scaling with total size",
        "### asyncckpt scaling with the number of arrays",
    ):
        assert heading in text, heading
    for method in (
        "disk: sequential write+fsync / read",
        "numpy.savez+fsync / np.load",
        "tensorstore kvstore (file)",
        "asyncckpt save (blocking) / restore",
        "asyncckpt save (async): until durable",
    ):
        rows = re.findall(rf"^\| {re.escape(method)} \| [\d.]+ m?s \| [\d.]+ GB/s \|", text, re.MULTILINE)
        assert len(rows) == 2, f"{method}: expected one measured row per case, got {rows}"
    assert re.search(r"^\| async save every step \| 2 \| [\d.]+ m?s \| [+-][\d.]+% \|", text, re.MULTILINE)
    assert re.search(r"^\| async save every \d+ steps, paired rounds \(disk keeps up\) \| \d+ \| [\d.]+ m?s \| "
                     r"[+-][\d.]+% \|", text, re.MULTILINE)
    assert re.search(r"^\| 5 \| 20 KiB \| ", text, re.MULTILINE)
    # Nothing measured is left behind in a directory the caller chose.
    assert [p for p in workdir.rglob("*") if p.is_file()] == []


def test_rejects_bad_sizes():
    proc = run_bench("--size-mb", "0")
    assert proc.returncode == 2
    assert "expected a positive integer, got '0'" in proc.stderr
    proc = run_bench("--skip", "disk,bogus")
    assert proc.returncode == 2
    assert "unknown --skip name(s) ['bogus']" in proc.stderr


@pytest.mark.slow  # a child interpreter importing torch and DCP: 12 s on 2 cores
def test_torch_benchmark_tiny_run_reports_every_method(tmp_path):
    pytest.importorskip("torch")
    workdir = tmp_path / "work"
    report = tmp_path / "report.md"
    proc = run_bench("--size-mib", "1", "--layers", "4", "--repeat", "1", "--dir", str(workdir),
                     "--output", str(report), script=BENCHMARKS / "bench_torch.py")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = report.read_text()
    assert text.strip() == proc.stdout.strip()
    assert "## Machine" in text
    assert "### PyTorch model + AdamW on the CPU: 4 × Linear(" in text
    for method in (
        "asyncckpt Checkpoint(model, optimizer), async",
        "torch.save+fsync / torch.load+load_state_dict",
        "torch.distributed.checkpoint async_save / load",
        "asyncckpt plain Variables (same bytes), async",
    ):
        row = rf"^\| {re.escape(method)} \| (–|[\d.]+ m?s) \| [\d.]+ m?s \| [\d.]+ GB/s \| [\d.]+ m?s \|"
        assert re.search(row, text, re.MULTILINE), method
    for target in ("durable time / plain Variables' durable time: ", "save() stall: ", "torch.load + load_state_dict"):
        assert re.search(rf"^- {re.escape(target)}.*: (met|missed)", text, re.MULTILINE), target
    assert [p for p in workdir.rglob("*") if p.is_file()] == []


@pytest.mark.slow  # two child interpreters importing torch
def test_training_overhead_benchmark_runs_its_loop_on_the_cpu(tmp_path):
    torch = pytest.importorskip("torch")
    script = BENCHMARKS / "gpu_train_overhead.py"
    if not torch.cuda.is_available():
        proc = run_bench("--steps", "1", script=script)
        assert proc.returncode == 2 and "needs an NVIDIA GPU" in proc.stderr
    workdir = tmp_path / "work"
    proc = run_bench("--device", "cpu", "--layers", "1", "--d-model", "16", "--heads", "2", "--vocab", "32",
                     "--seq", "8", "--batch", "2", "--steps", "2", "--every", "1", "--warmup", "0",
                     "--dir", str(workdir), script=script)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for mode in ("no checkpointing", "asyncckpt every 1 steps", "dcp every 1 steps", "no checkpointing (again)"):
        assert re.search(rf"^\| {re.escape(mode)} \| \d+ \| \d+ \| [\d.]+ m?s \| ", proc.stdout, re.MULTILINE), mode
    assert [p for p in workdir.rglob("*") if p.is_file()] == []


@pytest.mark.slow  # a child interpreter and a few saves and restores
def test_event_loop_benchmark_tiny_run_reports_every_operation(tmp_path):
    report = tmp_path / "loop.md"
    proc = run_bench("--size-mib", "4", "--arrays", "2", "--repeat", "1", "--dir", str(tmp_path / "work"),
                     "--output", str(report), script=BENCHMARKS / "bench_loop.py")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = report.read_text()
    for operation in ("idle", "plain threads: write + fsync", "plain threads: read (cold)", "asyncckpt asave",
                      "asyncckpt arestore (cold)", "asyncckpt arestore (warm)"):
        assert re.search(rf"\| {re.escape(operation)}[^|]* \| [0-9.]+ ms \| [0-9.]+ ms \| [0-9]+ ms \|", text), operation


@pytest.mark.slow  # two rank processes importing torch
def test_distributed_benchmark_tiny_run_compares_both_methods(tmp_path):
    pytest.importorskip("torch.distributed.checkpoint")
    report = tmp_path / "dist.md"
    proc = run_bench("--ranks", "2", "--size-mib", "2", "--layers", "2", "--repeat", "1", "--output", str(report),
                     script=BENCHMARKS / "bench_dist.py")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = report.read_text()
    for method in ("asyncckpt, TorchDistributedCoordinator, async", "DCP async_save / load"):
        assert re.search(rf"\| {re.escape(method)} \| [0-9.]+ m?s \| [0-9.]+ m?s \| [0-9.]+ m?s \|", text), text
    assert "DCP restore / asyncckpt restore:" in text


@pytest.mark.slow  # seven rank processes (2, 4 and 1) importing torch: ~40 s on 2 cores
def test_sharded_benchmark_tiny_run_reports_every_stage_for_both_libraries(tmp_path):
    pytest.importorskip("torch.distributed.checkpoint")
    report = tmp_path / "sharded.md"
    proc = run_bench("--size-mib", "2", "--layers", "2", "--repeat", "1", "--output", str(report),
                     script=BENCHMARKS / "bench_sharded.py")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = report.read_text()
    for stage in ("2 ranks stall", "2 ranks durable", "4 ranks stall", "4 ranks durable", "2->4 restore",
                  "4->1 restore"):
        assert re.search(rf"\| {re.escape(stage)} \| [0-9.]+ m?s \| [0-9.]+ m?s \| [0-9.]+× \|", text), stage
