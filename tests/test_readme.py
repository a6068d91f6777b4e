"""The README's set-up commands and code snippets are real: CI runs one, the others run here."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^(?:<!-- (?P<marker>[^>]*) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)


def setup_section() -> str:
    match = re.search(r"^## Set up on a fresh machine\n(?P<body>.*?)(?=^## )", README, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Set up on a fresh machine' section"
    return match["body"]


def setup_commands() -> dict[str, str]:
    """The set-up section's code blocks by marker; each must be one line."""
    commands = {}
    for block in FENCE.finditer(setup_section()):
        lines = block["body"].strip().splitlines()
        assert len(lines) == 1, f"set-up command after <!-- {block['marker']} --> must be one line: {lines}"
        commands[block["marker"]] = lines[0]
    return commands


def split_and(command: str) -> list[list[str]]:
    """``a b && c d`` -> ``[["a", "b"], ["c", "d"]]``; nothing else (no pipes, no ``;``) is allowed."""
    parts = [shlex.split(part) for part in command.split("&&")]
    assert all(parts), f"empty command part in {command!r}"
    for words in parts:
        assert not {";", "|", "||"} & set(words), f"unexpected shell operator in {command!r}"
    return parts


def python_snippets() -> list[tuple[str, str]]:
    """Every ```python block with the marker comment above it (or '')."""
    return [(block["marker"] or "", block["body"]) for block in FENCE.finditer(README) if block["lang"] == "python"]


def test_setup_section_has_exactly_the_two_commands():
    assert list(setup_commands()) == ["setup:example", "setup:tests"]
    assert len(re.findall(r"^```", setup_section(), re.MULTILINE)) == 4  # two blocks, nothing else


def test_ci_runs_the_readme_test_command():
    printed = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--print-test-command"], capture_output=True, text=True, check=True
    ).stdout
    assert printed == setup_commands()["setup:tests"] + "\n"


def test_test_command_installs_the_test_extra_and_runs_pytest():
    install, run = split_and(setup_commands()["setup:tests"])
    assert install == ["python", "-m", "pip", "install", "-e", ".[test]"]
    assert run[:3] == ["python", "-m", "pytest"]
    test_extra = [req for req in importlib.metadata.requires("asyncckpt") or [] if 'extra == "test"' in req]
    assert {"pytest", "import-linter"} <= {re.split(r"[<>=!~\[ ;]", req)[0] for req in test_extra}


def test_example_command_runs_and_resumes(tmp_path, capsys):
    install, run = split_and(setup_commands()["setup:example"])
    assert install == ["python", "-m", "pip", "install", "-e", "."]
    assert run[0] == "python" and (ROOT / run[1]).is_file()
    assert "--dir" in run, "the example command must name its checkpoint directory"
    # The package is already installed in this interpreter; run the second half only, in a fresh directory.
    argv = [sys.executable, *run[1:]]
    argv[argv.index("--dir") + 1] = str(tmp_path / "demo")

    first = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "starting from scratch" in first.stdout

    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = re.search(r"^resumed from \S+ at step (\d+)$", again.stdout, re.MULTILINE)
    assert resumed and int(resumed[1]) > 0, again.stdout
    assert again.stderr == "", again.stderr  # a clean resume: no partial-restore warning, no traceback

    # The README's command-line examples work on the directory the example command wrote.
    demo_dir = run[run.index("--dir") + 1]
    bash = "\n".join(block["body"] for block in FENCE.finditer(README) if block["lang"] == "bash")
    cli_lines = re.findall(r"^asyncckpt (.*?)(?:\s+#.*)?$", bash, re.MULTILINE)
    assert {line.split()[0] for line in cli_lines} == {"ls", "verify", "show", "diff", "latest", "du", "convert"}
    from asyncckpt.cli import main  # what the `asyncckpt` command runs; here without an interpreter per line

    # The README names the checkpoints one run leaves (ckpt-180, ckpt-200); this test ran it twice.
    kept = sorted((path.name[:-len(".index")] for path in (tmp_path / "demo").glob("ckpt-*.index")),
                  key=lambda name: int(name.split("-")[1]))
    renamed = {"ckpt-180": kept[-2], "ckpt-200": kept[-1]}
    for line in cli_lines:
        args = []
        for word in shlex.split(line):
            word = word.replace(demo_dir, str(tmp_path / "demo"))  # and paths beside it, for the converted files
            for old, new in renamed.items():
                word = word.replace(f"/{old}", f"/{new}")
            args.append(word)
        capsys.readouterr()
        code = main(args)
        out, err = capsys.readouterr()
        assert code in ((0, 3) if args[0] == "diff" else (0,)), f"asyncckpt {line}: {out}{err}"
        assert out.strip(), f"asyncckpt {line} printed nothing"


def test_relative_links_resolve():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if "://" not in link and not link.startswith("mailto:")]
    assert local, "expected links to docs/ from the README"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


TF_MARKER = "readme-test: tensorflow"
GPU_MARKER = "readme-test: gpu"  # needs CuPy and a GPU: run by gpu_tests/test_gpu_readme.py
FRAMEWORK_MARKERS = {"readme-test: torch": "torch", "readme-test: jax": "jax"}  # run where it is installed
RUNNABLE = [body for marker, body in python_snippets() if marker == ""]
WITH_FRAMEWORK = [(FRAMEWORK_MARKERS[marker], body) for marker, body in python_snippets() if marker in FRAMEWORK_MARKERS]


def test_readme_has_runnable_snippets():
    assert len(RUNNABLE) >= 3
    assert sorted(framework for framework, _ in WITH_FRAMEWORK) == ["jax", "torch"], "one quickstart each"
    known = {"", TF_MARKER, GPU_MARKER, *FRAMEWORK_MARKERS}
    assert {marker for marker, _ in python_snippets()} <= known, "unknown snippet marker"


def test_gpu_snippets_are_valid_python():
    gpu = [body for marker, body in python_snippets() if marker == GPU_MARKER]
    assert gpu, "the README shows the GPU usage"
    for body in gpu:
        compile(body, "README.md", "exec")


def test_tf_snippet_and_its_asyncckpt_twin_make_the_same_calls():
    """Each Checkpoint/manager/restore/save/sync line of the TF snippet, with ``tf.`` names mapped to
    ``ac.``, appears verbatim in the asyncckpt snippet right after it."""
    snippets = python_snippets()
    index = next(i for i, (marker, _) in enumerate(snippets) if marker == TF_MARKER)
    tf_code, ac_code = snippets[index][1], snippets[index + 1][1]
    renames = {"tf.train.": "ac.", "tf.keras.optimizers.": "ac.optimizers."}
    compared = 0
    for line in tf_code.splitlines():
        line = line.split("#")[0].strip()
        if not re.match(r"(checkpoint|manager|status|optimizer) = |(checkpoint|manager)\.\w+\(", line):
            continue
        for old, new in renames.items():
            line = line.replace(old, new)
        assert line in ac_code, f"no asyncckpt counterpart for TF line: {line}"
        compared += 1
    assert compared >= 5


def run_snippet(directory: Path, body: str) -> None:
    if "tests/fixtures/" in body:  # a snippet reading the repository's fixtures runs as from its root
        shutil.copytree(ROOT / "tests" / "fixtures", directory / "tests" / "fixtures")
    # The snippet imports this checkout's asyncckpt, wherever the installed one points.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-W", "error", "-c", body], cwd=directory, capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, f"README snippet failed:\n{body}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


@pytest.mark.parametrize("body", RUNNABLE, ids=[f"snippet{i}" for i in range(len(RUNNABLE))])
def test_python_snippet_runs(tmp_path, body):
    run_snippet(tmp_path, body)


@pytest.mark.parametrize(("framework", "body"), WITH_FRAMEWORK, ids=[name for name, _ in WITH_FRAMEWORK])
def test_framework_snippet_runs(tmp_path, framework, body):
    pytest.importorskip(framework)
    run_snippet(tmp_path, body)
