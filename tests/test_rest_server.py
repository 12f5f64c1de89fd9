"""The REST sink and ``steplog sync`` against a real ``mlflow server`` (sqlite backend, artifacts served).

One server is shared by the whole module (the ``mlflow_server`` fixture in conftest);
the outage test kills it mid-run and starts it again on the same port and database.
Everything is read back with MLflow's own client, as users would.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest

import steplog
from steplog.cli import main as cli_main
from steplog.testing import MemorySink

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(300)]


def _client(url: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float, int]]:
    points = client.get_metric_history(run_id, key)
    return sorted((m.step, m.value, m.timestamp) for m in points)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_a_run_reads_back_exactly_through_mlflow(mlflow_server: Any, tmp_path: Path) -> None:
    """Thousands of points (NaN included), 150 params, tags and artifacts read back exactly with MlflowClient."""
    memory = MemorySink()
    source = tmp_path / "model"
    source.mkdir()
    (source / "weights.bin").write_bytes(bytes(range(256)) * 10)
    (source / "sub").mkdir()
    (source / "sub" / "config.json").write_text('{"a": 1}')
    with steplog.start_run(
        "rest-readback", run_name="exact", tracking_uri=mlflow_server.url, sinks=[memory], tags={"team": "ml"}
    ) as run:
        run.log_params({f"p{i:03d}": i * 0.5 for i in range(150)})
        for step in range(3000):
            run.log_metrics({"loss": 1.0 / (step + 1), "acc": math.nan if step % 997 == 0 else step * 1e-4}, step=step)
        run.log_artifact(source)
        run.log_text("hello", "notes/readme.txt")
    client = _client(mlflow_server.url)
    server_run = client.get_run(run.run_id)
    assert "FINISHED" == server_run.info.status
    assert "exact" == server_run.info.run_name
    assert {f"p{i:03d}": str(i * 0.5) for i in range(150)} == server_run.data.params
    assert "ml" == server_run.data.tags["team"]
    for key in ("loss", "acc"):
        expected = sorted((p.step, p.value, p.timestamp) for p in memory.metrics[key])
        actual = _history(client, run.run_id, key)
        assert len(expected) == len(actual)
        assert all(e[0] == a[0] and e[2] == a[2] and _same(e[1], a[1]) for e, a in zip(expected, actual, strict=True))
    files = {f.path for f in client.list_artifacts(run.run_id, "model")}
    assert {"model/weights.bin", "model/sub"} == files
    local = Path(client.download_artifacts(run.run_id, "model/weights.bin", str(tmp_path / "dl")))
    assert (source / "weights.bin").read_bytes() == local.read_bytes()
    text = Path(client.download_artifacts(run.run_id, "notes/readme.txt", str(tmp_path / "dl2"))).read_text()
    assert "hello" == text


def test_a_run_writes_to_a_server_and_a_local_store_under_one_id(mlflow_server: Any, tmp_path: Path) -> None:
    """tracking_uri=[local, server]: the server creates the run and the local store holds the same run id and points."""
    store = tmp_path / "mlruns"
    with steplog.start_run("rest-multi", tracking_uri=[str(store), mlflow_server.url]) as run:
        for step in range(1200):
            run.log_metric("x", step * 0.25, step=step)
    remote = _history(_client(mlflow_server.url), run.run_id, "x")
    local = _history(_client(store.as_uri()), run.run_id, "x")
    assert 1200 == len(remote)
    assert remote == local
    assert run.tracking_uri == mlflow_server.url


def test_an_unreachable_server_at_start_is_a_clear_error() -> None:
    """start_run against a port nobody listens on raises a StepLogError naming the server."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _mlflow_server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(steplog.StepLogError) as info:
        steplog.start_run("rest-down", tracking_uri=url, start_timeout=1.0)
    assert url in str(info.value)


def test_a_server_killed_mid_run_gets_every_point_exactly_once(mlflow_server: Any, tmp_path: Path) -> None:
    """Kill the server mid-run and start it again on the same database: a run that goes on has every point once,
    and a run closed during the outage leaves a journal that `steplog sync` uploads (twice: still once)."""
    journal = tmp_path / "journal"
    options: dict[str, Any] = {"journal_dir": str(journal), "max_buffer": 1000}
    going_on = steplog.start_run("rest-outage", tracking_uri=mlflow_server.url, **options)
    closed_early = steplog.start_run("rest-outage", tracking_uri=mlflow_server.url, **options)
    try:
        for step in range(300):
            going_on.log_metric("x", float(step), step=step)
            closed_early.log_metric("y", float(step), step=step)
        going_on.flush()
        closed_early.flush()
        mlflow_server.kill()
        for step in range(300, 2500):  # past max_buffer: spilled to the journal
            going_on.log_metric("x", float(step), step=step)
            closed_early.log_metric("y", float(step), step=step)
        going_on.flush()
        with pytest.raises(steplog.StepLogError) as info:
            closed_early.close(timeout=3.0)
    finally:
        mlflow_server.start()
    folder = journal / closed_early.run_id
    assert f"steplog sync {folder} --to {mlflow_server.url}" in str(info.value)
    for step in range(2500, 2700):
        going_on.log_metric("x", float(step), step=step)
    going_on.close()
    client = _client(mlflow_server.url)
    assert list(range(2700)) == [p[0] for p in _history(client, going_on.run_id, "x")]
    assert "FINISHED" == client.get_run(going_on.run_id).info.status

    assert 0 == cli_main(["sync", str(folder), "--to", mlflow_server.url])
    assert 0 == cli_main(["sync", str(folder), "--to", mlflow_server.url])
    assert list(range(2500)) == [p[0] for p in _history(client, closed_early.run_id, "y")]
    assert "FINISHED" == client.get_run(closed_early.run_id).info.status


def test_sync_uploads_a_local_store_idempotently(mlflow_server: Any, tmp_path: Path, capsys: Any) -> None:
    """`steplog sync ./mlruns --to URL` run twice creates each run once and stores each point once."""
    store = tmp_path / "mlruns"
    with steplog.start_run("rest-sync", run_name="offline", tracking_uri=str(store)) as run:
        run.log_params({"lr": 0.01})
        run.set_tag("node", "hpc-1")
        for step in range(2500):
            run.log_metric("loss", 1.0 / (step + 1), step=step)
        run.log_metric("loss", math.inf, step=2500)
        run.log_text("done", "out/result.txt")
    assert 0 == cli_main(["sync", str(store), "--to", mlflow_server.url])
    assert 0 == cli_main(["sync", str(store), "--to", mlflow_server.url])
    out = capsys.readouterr().out
    assert "created" in out
    assert "up to date" in out
    client = _client(mlflow_server.url)
    experiment = client.get_experiment_by_name("rest-sync")
    runs = client.search_runs([experiment.experiment_id])
    assert 1 == len(runs)
    remote = runs[0]
    history = _history(client, remote.info.run_id, "loss")
    assert list(range(2501)) == [p[0] for p in history]
    assert sys.float_info.max == history[-1][1]  # the SQL store clamps +inf; it was sent as "Infinity"
    assert {"lr": "0.01"} == remote.data.params
    assert ("hpc-1", "offline", "FINISHED") == (remote.data.tags["node"], remote.info.run_name, remote.info.status)
    assert run.info.end_time == remote.info.end_time
    assert ["out/result.txt"] == [f.path for f in client.list_artifacts(remote.info.run_id, "out")]


def test_sync_refuses_a_source_that_is_not_a_store(mlflow_server: Any, tmp_path: Path, capsys: Any) -> None:
    """A missing source is a one-line error with a non-zero exit, not a traceback."""
    assert 1 == cli_main(["sync", str(tmp_path / "nope"), "--to", mlflow_server.url])
    err = capsys.readouterr().err
    assert "does not exist" in err
    assert "Traceback" not in err
