"""The import contracts in .importlinter hold, match docs/architecture.md, and really catch violations."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "asyncckpt"


def lint_imports_command() -> list[str]:
    """``lint-imports`` from this interpreter's environment (CI's fresh virtualenv, or a developer's)."""
    script = Path(sys.executable).with_name("lint-imports")
    if not script.exists():
        found = shutil.which("lint-imports")
        assert found, "lint-imports is not installed: pip install -e '.[test]'"
        script = Path(found)
    return [str(script), "--no-cache"]


def run_lint_imports(cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(lint_imports_command(), cwd=cwd, env=env, capture_output=True, text=True)


def contract_layers() -> list[list[str]]:
    """The layers contract's rows, top first, as lists of module names (optional-parentheses removed)."""
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    rows = config["importlinter:contract:layers"]["layers"].strip().splitlines()
    return [[name.strip(" ()") for name in re.split(r"[:|]", row)] for row in rows]


def architecture_layers() -> dict[str, int]:
    """``module -> layer number`` from the module table in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    layers = {}
    for number, cell in re.findall(r"^\|\s*(\d+)\s*\|([^|]+)\|", text, re.MULTILINE):
        for module in re.findall(r"`([\w.]+)`", cell):
            layers[module] = int(number)
    assert layers, "no module table found in docs/architecture.md"
    return layers


def test_contracts_hold():
    proc = run_lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_layers_follow_docs_architecture():
    documented = architecture_layers()
    rows = contract_layers()
    position = {module: len(rows) - 1 - index for index, row in enumerate(rows) for module in row}
    missing = sorted(set(documented) - set(position))
    assert not missing, f"modules in docs/architecture.md but not in the layers contract: {missing}"
    # Same order: a module documented on a higher layer than another is never below it in the contract.
    for upper, upper_layer in documented.items():
        for lower, lower_layer in documented.items():
            if upper_layer > lower_layer:
                assert position[upper] > position[lower], f"{upper} must sit above {lower} in .importlinter"
            elif upper_layer == lower_layer:
                assert position[upper] == position[lower], f"{upper} and {lower} share a layer in the docs"


def test_every_module_is_placed_in_a_layer():
    placed = {module for row in contract_layers() for module in row}
    modules = {path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    modules |= {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    unplaced = sorted(modules - placed)
    assert not unplaced, f"modules missing from the layers contract in .importlinter: {unplaced}"


@pytest.mark.parametrize(
    "module, bad_import, broken_contract",
    [
        ("errors", "import asyncckpt.model.variable", "The package's layers"),
        ("format", "import cupy", "Only asyncckpt._arrays and asyncckpt._cuda.cupy import cupy"),
        ("model/variable", "import tensorstore", "Only asyncckpt.io.storage.kvstore imports tensorstore"),
        ("io/storage/file", "import asyncckpt.io.storage.kvstore", "The storages build on the storage interface"),
    ],
    ids=["layer-inversion", "cupy-outside-seam", "tensorstore-outside-seam", "storage-on-storage"],
)
def test_contracts_catch_a_violation(tmp_path, module, bad_import, broken_contract):
    shutil.copytree(PACKAGE, tmp_path / "asyncckpt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    with open(tmp_path / "asyncckpt" / f"{module}.py", "a", encoding="utf-8") as handle:
        handle.write(f"\n{bad_import}  # injected by the test\n")
    # The copy shadows the installed package: PYTHONPATH is searched before the editable-install finder.
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = run_lint_imports(tmp_path, env)
    assert proc.returncode != 0, proc.stdout
    assert re.search(rf"^{re.escape(broken_contract)}.* BROKEN\b", proc.stdout, re.MULTILINE), proc.stdout
    assert f"asyncckpt.{module.replace('/', '.')} ->" in proc.stdout
