"""MLflow's SQLite database as a destination: what steplog writes is what MLflow's own SQL store writes and reads.

Every check reads back with MLflow 3.17 itself (``MlflowClient("sqlite:///...")``, a real
``mlflow server``), or compares raw rows with the rows MLflow writes for the same points.
"""

from __future__ import annotations

import math
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

import steplog
from steplog import InvalidValueError, WriteError
from steplog._sqlite_reader import SqliteStore
from steplog.sinks.sqlite import MAX_FLOAT, SqliteSink, database_path

# Points whose stored form MLflow's SQL store changes, or that collide on its primary key.
SPECIAL = [
    ("v", 1_700_000_000_000, float("nan"), 0),
    ("v", 1_700_000_000_000, float("nan"), 0),  # identical NaN: one row
    ("v", 1_700_000_000_001, float("inf"), 1),
    ("v", 1_700_000_000_002, float("-inf"), 2),
    ("v", 1_700_000_000_003, -0.0, 3),
    ("v", 1_700_000_000_003, 0.0, 3),  # equal to -0.0 in SQL: one row
    ("v", 1_700_000_000_004, 5e-324, 4),  # subnormal
    ("v", 1_700_000_000_004, 5e-324, 4),  # identical: one row
    ("v", 1_700_000_000_005, 2.2250738585072014e-308, 5),
    # latest: max step, then max timestamp, then max value; the first wins a tie; NaN compares as 0
    ("late", 10, 1.0, 7),
    ("late", 11, -1.0, 7),
    ("late", 11, 0.5, 7),
    ("late", 11, float("nan"), 7),
    ("late", 9, 99.0, 7),
    ("late", 11, 0.5, 6),
    ("nanlast", 5, -2.0, 1),
    ("nanlast", 5, float("nan"), 1),
    ("inflast", 5, float("inf"), 1),
    ("inflast", 5, MAX_FLOAT, 1),
]


def rows(db: Path, run_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """The run's raw metrics and latest_metrics rows, without the run id, in a fixed order."""
    con = sqlite3.connect(db)
    try:
        metrics = con.execute(
            'SELECT "key", value, typeof(value), timestamp, step, is_nan FROM metrics WHERE run_uuid = ? '
            'ORDER BY "key", timestamp, step, value, is_nan',
            (run_id,),
        ).fetchall()
        latest = con.execute(
            'SELECT "key", value, typeof(value), timestamp, step, is_nan FROM latest_metrics WHERE run_uuid = ? '
            'ORDER BY "key"',
            (run_id,),
        ).fetchall()
    finally:
        con.close()
    return {"metrics": metrics, "latest": latest}


@pytest.fixture(params=["one statement", "executemany"])
def insert_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways points go in: one JSON statement per key, and executemany where SQLite lacks JSON."""
    if request.param == "executemany":
        monkeypatch.setattr("steplog.sinks.sqlite._bulk_ready", lambda con: False)
    return str(request.param)


def test_values_and_latest_are_stored_as_mlflow_stores_them(tmp_path: Path, insert_path: str) -> None:
    """NaN, ±inf, -0.0, subnormals, identical points and the latest-metric rule: the same rows as MLflow's."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    ours = tmp_path / "steplog.db"
    with steplog.start_run("values", tracking_uri=f"sqlite:///{ours}") as run:
        for key, ts, value, step in SPECIAL:
            run.log_metric(key, value, step=step, timestamp=ts)
    theirs = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{theirs}")
    mlflow_run = client.create_run(client.create_experiment("values"))
    for key, ts, value, step in SPECIAL:  # one call per point, as a loop of mlflow.log_metric would
        client.log_batch(mlflow_run.info.run_id, metrics=[Metric(key, value, ts, step)])
    expected = rows(theirs, mlflow_run.info.run_id)
    assert expected == rows(ours, run.run_id)
    # and the same rows when MLflow gets them in one batch, as steplog writes them
    batch_run = client.create_run(client.create_experiment("values-batch"))
    client.log_batch(batch_run.info.run_id, metrics=[Metric(k, v, ts, s) for k, ts, v, s in SPECIAL])
    assert rows(theirs, batch_run.info.run_id) == rows(ours, run.run_id)
    history = MlflowClient(f"sqlite:///{ours}").get_metric_history(run.run_id, "v")
    values = [m.value for m in history]
    assert math.isnan(values[0])
    assert [MAX_FLOAT, -MAX_FLOAT, 0.0] == values[1:4]
    assert math.copysign(1.0, values[3]) == 1.0  # -0.0 reads back as 0.0, as from MLflow's store


def scenario(run: steplog.Run, artifact: Path) -> None:
    """What every read-back test logs: 150 params, tags, special values, 3 keys x 200 steps, artifacts."""
    run.log_params({f"p{i:03d}": i * 1.5 for i in range(150)})
    run.set_tags({"model": "mlp", "team": "steplog"})
    for step in range(200):
        run.log_metrics({"loss": 1 / (step + 1), "acc/top1": step / 200, "lr": 1e-3}, step=step)
    for i, value in enumerate([float("nan"), float("inf"), float("-inf"), -0.0, 5e-324]):
        run.log_metric("special", value, step=i)
    run.log_artifact(str(artifact))
    run.log_text("hello", "notes/hello.txt")
    run.log_dict({"a": 1}, "cfg.json")


def check_mlflow_reads(db: Path, run_id: str, status: str = "FINISHED") -> None:
    """MLflow's client reads back everything :func:`scenario` logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    got = client.get_run(run_id)
    assert status == got.info.status
    assert got.info.end_time is not None
    assert {f"p{i:03d}": str(i * 1.5) for i in range(150)} == got.data.params
    assert {"model": "mlp", "team": "steplog"}.items() <= got.data.tags.items()
    assert got.data.tags["mlflow.runName"] == got.info.run_name
    assert list(range(200)) == [m.step for m in client.get_metric_history(run_id, "loss")]
    assert [1 / (s + 1) for s in range(200)] == [m.value for m in client.get_metric_history(run_id, "loss")]
    special = [m.value for m in client.get_metric_history(run_id, "special")]
    assert math.isnan(special[0])
    assert [MAX_FLOAT, -MAX_FLOAT, 0.0, 5e-324] == special[1:]
    assert {"loss": 1 / 200, "acc/top1": 199 / 200, "lr": 1e-3, "special": 5e-324} == got.data.metrics
    names = sorted(f.path for f in client.list_artifacts(run_id)) + [
        f.path for f in client.list_artifacts(run_id, "notes")
    ]
    assert ["cfg.json", "model.bin", "notes", "notes/hello.txt"] == names
    assert b"weights" == Path(client.download_artifacts(run_id, "model.bin", str(db.parent / "dl"))).read_bytes()


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    path = tmp_path / "model.bin"
    path.write_bytes(b"weights")
    return path


@pytest.fixture(params=["steplog", "mlflow"])
def database(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A database steplog creates, or one MLflow created that already holds a run in the experiment."""
    monkeypatch.chdir(tmp_path)  # artifacts go where MLflow puts them: ./mlruns
    db = tmp_path / "mlflow.db"
    if request.param == "mlflow":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{db}")
        earlier = client.create_run(client.create_experiment("sqlite"))
        client.log_metric(earlier.info.run_id, "loss", 0.5, step=0)
        client.set_terminated(earlier.info.run_id)
    return db


def test_sync_run_reads_back_in_mlflow(database: Path, artifact: Path) -> None:
    """A sync run's params, tags, metrics, status and artifacts read back with MlflowClient."""
    with steplog.start_run("sqlite", tracking_uri=f"sqlite:///{database}") as run:
        scenario(run, artifact)
    check_mlflow_reads(database, run.run_id)


@pytest.mark.anyio
async def test_async_run_reads_back_in_mlflow(database: Path, artifact: Path) -> None:
    """An ``async with`` run (asyncio and trio) reads back with MlflowClient, same as the sync one."""
    async with steplog.start_run("sqlite", tracking_uri=f"sqlite:///{database}") as run:
        scenario(run, artifact)
        await run.aflush()
    check_mlflow_reads(database, run.run_id)


def test_failed_run_status(tmp_path: Path) -> None:
    """An exception in the block ends the run FAILED in the database."""
    db = tmp_path / "m.db"
    run = steplog.start_run("s", tracking_uri=f"sqlite:///{db}")

    def fail() -> None:
        with run:
            run.log_metric("x", 1.0)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fail()
    assert "FAILED" == SqliteStore(f"sqlite:///{db}").get_run(run.run_id).status.name


def test_relative_uri_and_artifact_root_match_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``sqlite:///rel.db`` is relative to the working directory; experiments get MLflow's artifact location."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    with steplog.start_run("mine", tracking_uri="sqlite:///rel.db") as run:
        run.log_metric("x", 1.0)
    assert (tmp_path / "rel.db").is_file()
    client = MlflowClient("sqlite:///rel.db")
    theirs = client.get_experiment(client.create_experiment("theirs")).artifact_location
    mine = client.get_experiment_by_name("mine")
    assert mine is not None
    ours = mine.artifact_location
    assert theirs.rsplit("/", 1)[0] == ours.rsplit("/", 1)[0] == str(tmp_path / "mlruns")
    assert client.get_experiment("0").artifact_location == str(tmp_path / "mlruns" / "0")
    assert f"{ours}/{run.run_id}/artifacts" == client.get_run(run.run_id).info.artifact_uri


def test_absolute_uri_and_experiment_reuse(tmp_path: Path) -> None:
    """``sqlite:////abs.db`` works; a second run reuses the experiment by name."""
    uri = f"sqlite:///{tmp_path / 'sub' / 'abs.db'}"
    assert uri.startswith("sqlite:////")
    ids = set()
    for _ in range(2):
        with steplog.start_run("again", tracking_uri=uri) as run:
            run.log_metric("x", 1.0)
        ids.add(run.experiment_id)
    assert 1 == len(ids)
    assert 2 == len(SqliteStore(uri).runs("again"))


@pytest.mark.parametrize(
    "uri", ["sqlite://", "sqlite:///:memory:", "sqlite:///x.db?mode=ro", "sqlite:relative.db", "sqlite:///"]
)
def test_bad_uris_are_refused_at_start(uri: str) -> None:
    """A URI naming no database file is a typed error at start, not a traceback later."""
    with pytest.raises(InvalidValueError, match="sqlite"):
        database_path(uri)
    with pytest.raises(InvalidValueError):
        steplog.start_run("x", tracking_uri=uri)


def test_locked_database_is_retried_not_lost(tmp_path: Path) -> None:
    """A database another process holds locked fails the flush with WriteError; after release everything is there."""
    db = tmp_path / "m.db"
    sink = SqliteSink(f"sqlite:///{db}", busy_timeout=0.05)
    run = steplog.start_run("locked", sinks=[sink], flush_interval=0.01)
    try:
        run.log_metric("x", 0.0, step=0)
        run.flush()
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # an `mlflow server` writing, say
        for step in range(1, 100):
            run.log_metric("x", float(step), step=step)
        with pytest.raises(WriteError, match="another process held the database"):
            run.flush()
        other.execute("ROLLBACK")
        other.close()
        run.flush()
    finally:
        run.close()
    assert list(range(100)) == SqliteStore(f"sqlite:///{db}").metric_history(run.run_id, "x").steps
    assert run.stats().errors >= 1


def test_full_disk_is_a_typed_error_and_nothing_is_lost(tmp_path: Path) -> None:
    """SQLITE_FULL (the database may not grow) is a WriteError with ENOSPC; once space returns all is written."""
    import errno

    db = tmp_path / "m.db"
    sink = SqliteSink(f"sqlite:///{db}")
    run = steplog.start_run("full", sinks=[sink], flush_interval=0.01)
    try:
        run.log_metric("x", 0.0, step=0)
        run.flush()
        assert sink._con is not None
        pages = sink._con.execute("PRAGMA page_count").fetchone()[0]
        sink._con.execute(f"PRAGMA max_page_count = {pages + 2}")  # the seam: the disk is full from here
        for step in range(1, 20_000):
            run.log_metric("x", float(step), step=step)
        with pytest.raises(WriteError) as info:
            run.flush()
        assert errno.ENOSPC == info.value.errno
        assert "disk is full" in str(info.value)
        assert [0] == SqliteStore(f"sqlite:///{db}").metric_history(run.run_id, "x").steps  # earlier flush intact
        sink._con.execute("PRAGMA max_page_count = 1073741823")  # space is back
        run.flush()
    finally:
        run.close()
    assert list(range(20_000)) == SqliteStore(f"sqlite:///{db}").metric_history(run.run_id, "x").steps


def test_store_and_cli_read_the_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """steplog.Store, its watcher and the CLI (runs, show, tail) read a database steplog wrote."""
    from steplog.cli import main

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    with steplog.start_run("cli", tracking_uri=uri, run_name="one") as run:
        run.log_params({"lr": 0.1})
        for step in range(5):
            run.log_metric("loss", 1.0 / (step + 1), step=step)
        run.log_metric("loss", float("nan"), step=2)
    store = steplog.Store(uri)
    assert isinstance(store, SqliteStore)
    assert ["Default", "cli"] == [e.name for e in store.experiments()]
    (found,) = store.runs("cli", status="FINISHED")
    assert (run.run_id, "one", {"lr": "0.1"}) == (found.run_id, found.run_name, found.params)
    assert run.run_id == store.get_run(run.run_id[:8]).run_id
    history = store.metric_history(run.run_id, "loss")
    assert [0, 1, 2, 3, 4, 2] == history.steps
    assert math.isnan(history.values[-1])
    assert (4, 0.2) == (found.latest["loss"].step, found.latest["loss"].value)
    watcher = store.watch(run.run_id)
    assert {"loss"} == set(watcher.poll())
    assert {"loss": 6} == watcher.counts
    assert {} == watcher.poll()
    for args in (["runs"], ["show", run.run_id[:8]], ["tail", run.run_id[:8], "--plain"]):
        assert main([*args, "--uri", uri]) in (0, None)
    out = capsys.readouterr().out
    assert "one" in out
    assert "FINISHED" in out
    assert "loss" in out


def test_mlflow_server_serves_the_run_while_steplog_writes(tmp_path: Path) -> None:
    """A real ``mlflow server`` on the same database file serves the live run, then its end."""
    import httpx

    sys.path.insert(0, str(Path(__file__).parent))
    from _mlflow_server import MlflowServer

    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        uri = f"sqlite:///{server.root / 'mlflow.db'}"  # the database the server created
        with steplog.start_run("served", tracking_uri=uri) as run:
            for step in range(100):
                run.log_metric("loss", step / 10, step=step)
            run.flush()
            got = httpx.get(
                f"{server.url}/api/2.0/mlflow/metrics/get-history",
                params={"run_id": run.run_id, "metric_key": "loss"},
                timeout=30,
            ).json()
            assert list(range(100)) == [m["step"] for m in got["metrics"]]
            live = httpx.get(f"{server.url}/api/2.0/mlflow/runs/get", params={"run_id": run.run_id}, timeout=30)
            assert "RUNNING" == live.json()["run"]["info"]["status"]
            for step in range(100, 200):
                run.log_metric("loss", step / 10, step=step)
        done = httpx.get(f"{server.url}/api/2.0/mlflow/runs/get", params={"run_id": run.run_id}, timeout=30).json()
        assert "FINISHED" == done["run"]["info"]["status"]
        assert {"key": "loss", "value": 19.9, "step": 199} == {
            k: v for k, v in done["run"]["data"]["metrics"][0].items() if k != "timestamp"
        }
    finally:
        server.stop()


def test_tracking_uri_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``MLFLOW_TRACKING_URI=sqlite:///...`` (MLflow's recommended setting) sends runs and Store() to the database."""
    uri = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with steplog.start_run("env") as run:
        run.log_metric("x", 2.0)
    store = steplog.Store()
    assert isinstance(store, SqliteStore)
    assert [2.0] == store.metric_history(run.run_id, "x").values
    assert uri == run.info.tracking_uri


def test_every_finite_double_is_stored_exactly(tmp_path: Path, insert_path: str) -> None:
    """Doubles from random bit patterns (every exponent, subnormals included) read back bit for bit."""
    import random
    import struct

    rng = random.Random(20261129)
    values: list[float] = []
    while len(values) < 20_000:
        value = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        if math.isfinite(value) and value != 0:
            values.append(value)
    values += [5e-324, -5e-324, 2.225073858507201e-308, 2.2250738585072014e-308, MAX_FLOAT, 0.1, 1e23, 1.0]
    uri = f"sqlite:///{tmp_path / 'exact.db'}"
    with steplog.start_run("exact", tracking_uri=uri) as run:
        for step, value in enumerate(values):
            run.log_metric("x", value, step=step)
    got = SqliteStore(uri).metric_history(run.run_id, "x").values
    assert [struct.pack("<d", v) for v in values] == [struct.pack("<d", v) for v in got]
