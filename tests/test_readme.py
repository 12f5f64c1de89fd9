"""The README's Python examples run as written.

Every fenced ```python block of README.md runs, in order, in one fresh interpreter whose working
directory is an empty temporary folder (so ``./mlruns`` is new), sharing one namespace as a reader
following the page would. A block that cannot run here (it needs a server, a GPU, or is a fragment)
is skipped when the line just before its opening fence is exactly ``<!-- no-test -->``; use that
sparingly, and never for the quickstart.

A block whose preceding line is ``<!-- test: integrations -->`` (the framework integrations' examples)
runs instead in its own fresh interpreter and folder, one block each, in its own test: each needs a
framework, and importing four of them in one interpreter would crowd the shared time limit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP_MARK = "<!-- no-test -->"
INTEGRATIONS_MARK = "<!-- test: integrations -->"

# Runs the blocks given as JSON [[line, code], ...] in one namespace; a failure names the README line.
DRIVER = """
import json, sys, traceback
blocks = json.load(open(sys.argv[1], encoding="utf-8"))
namespace = {"__name__": "__main__"}
for line, code in blocks:
    try:
        exec(compile(code, f"README.md (block at line {line})", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"README.md block at line {line} failed", file=sys.stderr)
        sys.exit(1)
"""


def python_blocks(text: str, only: str | None = None) -> tuple[list[tuple[int, str]], list[int]]:
    """``([(line, code), ...], [skipped lines])`` for the ```python blocks of a markdown text.

    With ``only``, just the blocks whose preceding line is ``only`` (e.g. INTEGRATIONS_MARK); without it,
    blocks marked with INTEGRATIONS_MARK are left out (they run in their own test).
    """
    lines = text.splitlines()
    blocks: list[tuple[int, str]] = []
    skipped: list[int] = []
    i = 0
    while i < len(lines):
        if re.fullmatch(r"```python\s*", lines[i]):
            start = i + 1
            end = start
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            code = "\n".join(lines[start:end]) + "\n"
            mark = lines[i - 1].strip() if i > 0 else ""
            if only is not None or mark == INTEGRATIONS_MARK:
                if mark == only:
                    blocks.append((start, code))
            elif mark == SKIP_MARK:
                skipped.append(start)
            else:
                blocks.append((start, code))
            i = end
        i += 1
    return blocks, skipped


def test_block_parser_finds_blocks_and_honours_the_skip_mark() -> None:
    """The parser finds python blocks with their line numbers and skips those marked no-test."""
    text = (
        "a\n```python\nx = 1\n```\n<!-- no-test -->\n```python\nserver()\n```\n```sh\nls\n```\n```python\ny = x\n```\n"
    )
    assert ([(2, "x = 1\n"), (12, "y = x\n")], [6]) == python_blocks(text)


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path: Path) -> None:
    """Every README python block runs without error in a fresh directory, and the runs it wrote read back FINISHED."""
    blocks, _skipped = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no python blocks"
    blocks_file = tmp_path / "blocks.json"
    blocks_file.write_text(json.dumps(blocks), encoding="utf-8")
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("STEPLOG_TRACKING_URI", "MLFLOW_TRACKING_URI")}
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(blocks_file)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert 0 == result.returncode, result.stdout + result.stderr
    store = workdir / "mlruns"
    if store.exists():  # the examples wrote runs: MLflow reads every one of them back, finished
        client = MlflowClient(tracking_uri=store.as_uri())
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        assert runs
        assert {"FINISHED"} == {r.info.status for r in runs}


def test_block_parser_sets_integration_blocks_apart() -> None:
    """Blocks marked for the integrations test are left out of the main run and found with only=."""
    text = f"```python\nx = 1\n```\n{INTEGRATIONS_MARK}\n```python\nimport lightning\n```\n"
    assert ([(1, "x = 1\n")], []) == python_blocks(text)
    assert ([(5, "import lightning\n")], []) == python_blocks(text, only=INTEGRATIONS_MARK)


INTEGRATION_BLOCKS = python_blocks(README.read_text(encoding="utf-8"), only=INTEGRATIONS_MARK)[0]


@pytest.mark.slow
@pytest.mark.parametrize(("line", "code"), INTEGRATION_BLOCKS, ids=[f"line-{line}" for line, _ in INTEGRATION_BLOCKS])
def test_readme_integration_examples_run(tmp_path: Path, line: int, code: str) -> None:
    """Each framework integration's README example runs alone in a fresh folder and leaves its runs FINISHED."""
    blocks_file = tmp_path / "blocks.json"
    blocks_file.write_text(json.dumps([[line, code]]), encoding="utf-8")
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("STEPLOG_TRACKING_URI", "MLFLOW_TRACKING_URI")}
    env["PYTHONWARNINGS"] = "ignore"  # the frameworks' advice about their own settings is not what this checks
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(blocks_file)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert 0 == result.returncode, result.stdout + result.stderr[-4000:]
    client = MlflowClient(tracking_uri=(workdir / "mlruns").as_uri())
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert 1 == len(runs)
    assert "FINISHED" == runs[0].info.status
    assert runs[0].data.metrics
