"""``steplog demo`` (what ``make demo`` runs), as a user runs it: a subprocess in an empty directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # a subprocess that trains for half a second


def steplog_command() -> list[str]:
    """The installed ``steplog`` console script next to this interpreter (``python -m steplog`` without one)."""
    script = Path(sys.executable).with_name("steplog")
    return [str(script)] if script.exists() else [sys.executable, "-m", "steplog"]


def test_demo_runs_reports_and_writes_a_finished_run(tmp_path: Path) -> None:
    """The demo exits 0, reports steps, points, per-call cost as a ratio to a no-op call timed beside it
    (with the load average), where the run is and the mlflow ui command,
    and the run it wrote reads back in MLflow as FINISHED with the points it reported."""
    env = {k: v for k, v in os.environ.items() if k not in ("STEPLOG_TRACKING_URI", "MLFLOW_TRACKING_URI")}
    env.pop("MLFLOW_ALLOW_FILE_STORE", None)  # the demo itself must not need it
    result = subprocess.run(
        [*steplog_command(), "demo", "--seconds", "0.5"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = result.stdout
    assert 0 == result.returncode, out + result.stderr
    summary = re.search(r"(\d+) steps, (\d+) points written \((\d+) log calls\), (\d+) dropped", out)
    assert summary, out
    steps, points, calls, dropped = map(int, summary.groups())
    assert steps > 0
    assert (calls, 0) == (points, dropped)
    cost = re.search(
        r"per log_metric call: (\d+\.\d+) µs on average, (\d+\.\d)x a no-op call of the same shape "
        r"timed beside it \((\d+\.\d+) µs; load average \d+\.\d+ on \d+ CPUs\)",
        out,
    )
    assert cost, out
    per_call, ratio, noop = map(float, cost.groups())
    assert noop > 0
    assert abs(per_call / noop - ratio) <= 0.051 + 0.01 * ratio  # the ratio is of the two figures shown
    store_uri = (tmp_path / "mlruns").as_uri()
    assert f"store:      {store_uri}" in out
    assert f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {store_uri}" in out
    run_id = re.search(r"\(([0-9a-f]{32})\), status FINISHED", out)
    assert run_id, out

    client = MlflowClient(tracking_uri=store_uri)
    run = client.get_run(run_id.group(1))
    assert "FINISHED" == run.info.status
    assert "steplog-demo" == client.get_experiment(run.info.experiment_id).name
    logged = sum(len(client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics)
    assert points == logged
    assert steps == len(client.get_metric_history(run.info.run_id, "train/loss"))
    assert {"lr", "batch_size", "optimizer", "layers", "seed"} == set(run.data.params)
    assert ["summary.json"] == [a.path for a in client.list_artifacts(run.info.run_id)]


def test_demo_help_and_bad_arguments(tmp_path: Path) -> None:
    """``steplog demo --help`` describes the demo; a bad argument is a one-line usage error, not a traceback."""
    helped = subprocess.run(
        [*steplog_command(), "demo", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert 0 == helped.returncode
    assert "--seconds" in helped.stdout
    bad = subprocess.run(
        [*steplog_command(), "demo", "--seconds", "soon"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 2 == bad.returncode
    assert "Traceback" not in bad.stderr
    assert "invalid float value: 'soon'" in bad.stderr
    assert [] == list(tmp_path.iterdir())
