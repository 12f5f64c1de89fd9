"""A tiny run of every benchmark (``steplog bench --smoke``): the machinery works; no timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from steplog import cli
from steplog._bench import SUITE, find_benchmarks

pytestmark = [
    pytest.mark.slow,
    # the peers (MLflow, tensorboardX, W&B, trackio) warn about their own dependencies; not ours to fix
    pytest.mark.filterwarnings("ignore"),
]


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the whole suite once at smoke size through the CLI; the results folder."""
    out = tmp_path_factory.mktemp("bench")
    assert 0 == cli.main(["bench", "--smoke", "--out", str(out)])
    return out


@pytest.mark.parametrize("name", SUITE)
def test_each_benchmark_writes_json_and_chart(smoke_results: Path, name: str) -> None:
    """Every benchmark of the suite writes its JSON (with steplog measured) and its PNG chart."""
    result = json.loads((smoke_results / f"{name}.json").read_text())
    assert name == result["benchmark"]
    assert "smoke" == result["mode"]
    assert result["targets"], "each benchmark checks at least one of the issue's targets"
    assert all({"figure", "measured", "target", "ok"} <= set(t) for t in result["targets"])
    assert (smoke_results / f"{name}.png").stat().st_size > 0


def test_summary_lists_every_target(smoke_results: Path) -> None:
    """The summary gathers the targets of all benchmarks and renders each benchmark's table."""
    summary = json.loads((smoke_results / "summary.json").read_text())
    assert list(SUITE) == summary["benchmarks"]
    figures = {t["figure"] for t in summary["targets"]}
    assert {
        "import steplog",
        "hot path, one key per call",
        "end-to-end throughput (log_metric per key), incl. close",
    } <= figures
    text = (smoke_results / "summary.md").read_text()
    assert all(f"| {t['figure']}" in text for t in summary["targets"])


def test_throughput_smoke_writes_every_point(smoke_results: Path) -> None:
    """The throughput benchmark checks that steplog wrote every point it timed."""
    result = json.loads((smoke_results / "throughput.json").read_text())
    assert {"steplog": True, "steplog (log_metrics dict)": True} == result["all_written"]


def test_hot_path_script_runs_standalone(tmp_path: Path) -> None:
    """``python benchmarks/hot_path.py --smoke`` (issue 2's script) prints no-op, steplog and naive side by side."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(find_benchmarks() / "hot_path.py"), "--smoke", "--out", str(tmp_path), "--no-chart"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert 0 == proc.returncode, proc.stderr
    rows = {line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert {"no-op", "steplog", "naive sync"} <= rows
    assert (tmp_path / "hot_path.json").is_file()


def test_unknown_benchmark_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``steplog bench --only nope`` fails with a one-line error naming the choices, not a traceback."""
    assert 1 == cli.main(["bench", "--only", "nope"])
    err = capsys.readouterr().err
    assert "unknown benchmark nope: choose from import_time, hot_path" in err
    assert "Traceback" not in err
