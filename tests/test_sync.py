"""``steplog sync``: incremental uploads to a real ``mlflow server``, counted request by request.

A counting transport sits between sync and the server, so each test sees exactly what was
sent: a second sync of an unchanged store sends no point, param, tag or artifact; a grown
store sends only what is new; a lost or interrupted sync state falls back to the server's
history and still sends nothing twice.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sqlite3
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import steplog
from steplog._cli import main as cli_main
from steplog._cli.sync_command import STATE_FILE, LineProgress, SyncResult, TerminalProgress, _Sidecar, sync

pytestmark = [pytest.mark.server, pytest.mark.slow]


class Counting(httpx.AsyncBaseTransport):
    """Passes every request to the server and records it; can fail one endpoint after it reached the server."""

    def __init__(self, fail_after: str | None = None) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.requests: list[tuple[str, str, bytes]] = []
        self.fail_after = fail_after

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        self.requests.append((request.method, request.url.path, body))
        response = await self.inner.handle_async_request(request)
        if self.fail_after is not None and self.fail_after in request.url.path:
            await response.aread()
            raise RuntimeError("the process dies here")  # after the server stored the request
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()

    def sent_points(self) -> list[tuple[str, int, int]]:
        """(key, step, timestamp) of every metric point sent in log-batch requests."""
        out = []
        for _method, path, body in self.requests:
            if path.endswith("/runs/log-batch"):
                out += [(m["key"], m["step"], m["timestamp"]) for m in json.loads(body)["metrics"]]
        return out

    def calls(self, suffix: str) -> int:
        return sum(path.endswith(suffix) for _m, path, _b in self.requests)

    def uploads(self) -> list[str]:
        return [path.rsplit("/artifacts/", 1)[-1] for method, path, _b in self.requests if method == "PUT"]


def run_sync(store: Path | str, url: str, transport: Counting | None = None, **kwargs: Any) -> list[SyncResult]:
    return anyio.run(lambda: sync(store, url, transport=transport, **kwargs))


def history(url: str, run_id: str, key: str) -> list[tuple[int, int]]:
    """(step, timestamp) of every point the server holds, sorted."""
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.timestamp) for m in MlflowClient(tracking_uri=url).get_metric_history(run_id, key))


def local_run(store: Path, experiment: str, points: int = 1500) -> str:
    with steplog.start_run(experiment, run_name="offline", tracking_uri=store, handle_signals=False) as run:
        run.log_params({"lr": 0.01, "layers": 4})
        run.set_tag("node", "hpc-1")
        for step in range(points):
            run.log_metrics({"loss": 1.0 / (step + 1), "grad_norm/2": float(step)}, step=step)
        run.log_text("weights" * 100, "ckpt/model.txt")
    return run.run_id


def grow(store: Path, run_id: str, start: int, stop: int) -> None:
    """Append points to a finished run with MLflow's own client, and add an artifact (as a later job would)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    metrics = [Metric("loss", 0.5, 1_800_000_000_000 + s, s) for s in range(start, stop)]
    client.log_batch(run_id, metrics=metrics)
    client.log_text(run_id, "evaluated", "eval/report.txt")


def test_second_sync_sends_nothing_but_checks(mlflow_server: Any, store: Path) -> None:
    """Syncing an unchanged store again sends no point, param, tag, artifact or status: it only looks.

    (The first sync sends the tags with the run it creates, so it counts no tag of its own.)
    """
    local_run(store, "sync-again")
    (first,) = run_sync(store, mlflow_server.url)
    assert (3000, 2, 0, 1, True) == (first.points, first.params, first.tags, first.artifacts, first.created)
    counting = Counting()
    (second,) = run_sync(store, mlflow_server.url, counting)
    assert (0, 0, 0, 0, False, 0) == (
        second.points, second.params, second.tags, second.artifacts, second.created, second.bytes
    )  # fmt: skip
    assert [] == counting.sent_points()
    assert (0, 0, 0, []) == (
        counting.calls("/log-batch"), counting.calls("/runs/update"), counting.calls("/runs/create"), counting.uploads()
    )  # fmt: skip
    assert all(method == "GET" for method, _p, _b in counting.requests)
    assert 4 >= len(counting.requests)  # the experiment, the run, its artifact listing


def test_a_grown_source_sends_only_what_is_new(mlflow_server: Any, store: Path) -> None:
    """After the local run gained points and an artifact, sync sends exactly those; the server holds each point once."""
    run_id = local_run(store, "sync-grown", points=1000)
    (first,) = run_sync(store, mlflow_server.url)
    grow(store, run_id, 1000, 1300)
    counting = Counting()
    (second,) = run_sync(store, mlflow_server.url, counting)
    assert [("loss", s, 1_800_000_000_000 + s) for s in range(1000, 1300)] == counting.sent_points()
    assert ["eval/report.txt"] == [path.split("/artifacts/", 1)[-1] for path in counting.uploads()]
    assert (300, 1) == (second.points, second.artifacts)
    loss = history(mlflow_server.url, first.run_id, "loss")
    assert 1300 == len(loss) == len(set(loss))
    assert list(range(1300)) == [step for step, _ts in loss]


def test_a_lost_state_falls_back_to_the_server_and_sends_nothing_twice(mlflow_server: Any, store: Path) -> None:
    """Without the sync-state file, sync compares with the server's history and artifact sizes: only new points go."""
    run_id = local_run(store, "sync-lost-state", points=800)
    (first,) = run_sync(store, mlflow_server.url)
    grow(store, run_id, 800, 850)
    (state_file,) = store.glob(f"*/{run_id}/{STATE_FILE}")
    state_file.unlink()
    counting = Counting()
    (second,) = run_sync(store, mlflow_server.url, counting)
    assert (50, 1) == (second.points, second.artifacts)
    assert [("loss", s, 1_800_000_000_000 + s) for s in range(800, 850)] == counting.sent_points()
    assert ["eval/report.txt"] == [path.split("/artifacts/", 1)[-1] for path in counting.uploads()]
    assert 2 <= counting.calls("/metrics/get-history")
    assert 850 == len(set(history(mlflow_server.url, first.run_id, "loss")))
    assert state_file.is_file()  # written again: the next sync is cheap
    again = Counting()
    run_sync(store, mlflow_server.url, again)
    assert (0, 0) == (again.calls("/log-batch"), again.calls("/metrics/get-history"))


def test_a_sync_killed_after_sending_never_resends(mlflow_server: Any, store: Path) -> None:
    """A sync that died after the server stored the points but before recording it checks the server next time."""
    local_run(store, "sync-killed", points=600)
    dying = Counting(fail_after="/mlflow-artifacts/")  # the points went through; the process dies on the artifact
    with pytest.raises(RuntimeError):
        run_sync(store, mlflow_server.url, dying)
    assert 1200 == len(dying.sent_points())
    counting = Counting()
    (result,) = run_sync(store, mlflow_server.url, counting)
    assert [] == counting.sent_points()  # the keys were marked in flight: checked on the server, none resent
    assert ([], 0, 0) == (counting.uploads(), result.points, result.artifacts)  # the file reached the server whole
    assert 600 == len(set(history(mlflow_server.url, result.run_id, "loss")))


def test_the_command_prints_one_line_per_run_into_a_pipe(
    mlflow_server: Any, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Into a pipe, `steplog sync` prints one line per run: what it sent, then `up to date`; `--run latest` works."""
    local_run(store, "sync-lines", points=10)
    newest = local_run(store, "sync-lines", points=10)
    assert 0 == cli_main(["sync", str(store), "--to", mlflow_server.url])
    lines = capsys.readouterr().out.splitlines()
    assert 2 == len(lines)
    assert all(" created: 20 points, 2 params, 0 tags, 1 artifact files, " in line for line in lines)
    assert 0 == cli_main(["sync", str(store), "--to", mlflow_server.url, "--run", "latest"])
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{newest} -> {mlflow_server.url} run ")
    assert ": up to date in " in line


def result(points: int = 5) -> SyncResult:
    return SyncResult("abc", "def", "1", points, 1, 1, 0, created=False, bytes=2048)


@pytest.mark.parametrize("with_rich", [False, True])
def test_terminal_progress_shows_points_bytes_rate_and_time_left(
    with_rich: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal the live line counts points and bytes with a rate and time left (rich optional), then one line."""
    out = io.StringIO()
    if not with_rich:
        monkeypatch.setitem(sys.modules, "rich.progress", None)  # as if rich were not installed
    progress = TerminalProgress("http://server", out=out)
    assert (progress._bar is not None) == with_rich
    progress.run_started("abc", 100, 5000)
    progress.advance(50, 2048)
    progress._draw(force=True)
    if not with_rich:
        text = out.getvalue()
        assert "50/100 points" in text
        assert "2.0 kB" in text
        assert "pts/s" in text
        assert "s left" in text
    progress.run_done(result())
    progress.close()
    last = out.getvalue().rsplit("\r\x1b[K", 1)[-1] if not with_rich else out.getvalue()
    assert "abc -> http://server run def (experiment 1): updated: 5 points" in last


def test_line_progress_says_up_to_date() -> None:
    """Into a pipe a run that needed nothing is one line saying so."""
    out = io.StringIO()
    LineProgress("http://server", out=out).run_done(result(points=0).__class__("abc", "def", "1", 0, 0, 0, 0, False))
    assert out.getvalue().startswith("abc -> http://server run def (experiment 1): up to date in ")


def sqlite_run(db: Path, experiment: str, points: int, artifact: bool = False) -> str:
    with steplog.start_run(experiment, tracking_uri=f"sqlite:///{db}", handle_signals=False) as run:
        run.log_params({"lr": 0.01})
        for step in range(points):
            run.log_metrics({"loss": 1.0 / (step + 1), "acc": float("nan") if step == 3 else step / 10}, step=step)
        if artifact:  # lands in ./mlruns/<experiment>/<run>/artifacts, as MLflow's client puts it for a database
            run.log_text("weights" * 100, "ckpt/model.txt")
    return run.run_id


def test_a_sqlite_source_syncs_incrementally(
    mlflow_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sqlite:///db` syncs through the Store API: the second sync sends no point or artifact, a grown run only
    its new rows, the state lives beside the database (not in MLflow's schema), the server holds each point once."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    run_id = sqlite_run(db, "sync-sqlite", points=400, artifact=True)
    uri = f"sqlite:///{db}"
    (first,) = run_sync(uri, mlflow_server.url)
    assert (800, 1, 1, True) == (first.points, first.params, first.artifacts, first.created)
    assert (tmp_path / "mlflow.db.steplog-sync.json").is_file()
    with contextlib.closing(sqlite3.connect(db)) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    assert not any("steplog" in t for t in tables)
    counting = Counting()
    (second,) = run_sync(uri, mlflow_server.url, counting)
    assert ([], 0, 0, False) == (counting.sent_points(), counting.calls("/log-batch"), second.points, second.created)
    assert ([], 0) == (counting.uploads(), second.artifacts)
    assert first.run_id == second.run_id
    # MLflow itself appends to the run in the database; the next sync sends exactly those rows
    grown = [Metric("loss", 0.5, 1_800_000_000_000 + s, s) for s in range(400, 450)]
    MlflowClient(uri).log_batch(run_id, metrics=grown)
    counting = Counting()
    (third,) = run_sync(uri, mlflow_server.url, counting)
    assert 50 == third.points
    assert [("loss", s, 1_800_000_000_000 + s) for s in range(400, 450)] == counting.sent_points()
    loss = history(mlflow_server.url, first.run_id, "loss")
    assert 450 == len(loss) == len(set(loss))
    artifacts = MlflowClient(tracking_uri=mlflow_server.url).list_artifacts(first.run_id, "ckpt")
    assert [("ckpt/model.txt", 700)] == [(a.path, a.file_size) for a in artifacts]
    acc = MlflowClient(tracking_uri=mlflow_server.url).get_metric_history(first.run_id, "acc")
    assert 400 == len(acc)
    assert math.isnan(sorted(acc, key=lambda m: m.step)[3].value)


def test_a_sqlite_source_without_state_checks_the_server(mlflow_server: Any, tmp_path: Path) -> None:
    """A lost sidecar (or one cut off mid-write) falls back to the server's history: nothing is sent twice."""
    db = tmp_path / "mlflow.db"
    sqlite_run(db, "sync-sqlite-lost", points=300)
    uri = f"sqlite:///{db}"
    (first,) = run_sync(uri, mlflow_server.url)
    (tmp_path / "mlflow.db.steplog-sync.json").write_text('{"version": 1, "ru')
    counting = Counting()
    (second,) = run_sync(uri, mlflow_server.url, counting)
    assert ([], 0) == (counting.sent_points(), second.points)
    assert 300 == len(set(history(mlflow_server.url, first.run_id, "loss")))


def test_sidecar_updates_keep_what_another_sync_recorded(tmp_path: Path) -> None:
    """Two syncs of one database to two servers, each loaded before the other saved: the file keeps both states."""
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"")
    first, second = _Sidecar(db), _Sidecar(db)
    first.update("run1", "http://a", {"run_id": "x", "metrics": {"loss": {"count": 5}}})
    second.update("run1", "http://b", {"run_id": "y", "metrics": {}})
    second.update("run2", "http://b", {"run_id": "z", "metrics": {}})
    targets = _Sidecar(db).runs["run1"]["targets"]
    assert {
        "http://a": {"run_id": "x", "metrics": {"loss": {"count": 5}}},
        "http://b": {"run_id": "y", "metrics": {}},
    } == targets
    assert ["mlflow.db", "mlflow.db.steplog-sync.json"] == sorted(p.name for p in tmp_path.iterdir())


def test_the_command_syncs_a_sqlite_uri(mlflow_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`steplog sync sqlite:///... --to URL` prints one line per run; a missing database is a one-line error."""
    db = tmp_path / "mlflow.db"
    run_id = sqlite_run(db, "sync-sqlite-cli", points=5)
    assert 0 == cli_main(["sync", f"sqlite:///{db}", "--to", mlflow_server.url])
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{run_id} -> {mlflow_server.url} run ")
    assert " created: 10 points, 1 params" in line
    assert 1 == cli_main(["sync", f"sqlite:///{tmp_path / 'nope.db'}", "--to", mlflow_server.url])
    err = capsys.readouterr().err
    assert err.startswith("steplog sync: error: cannot sync sqlite:///")
    assert "no MLflow database at" in err
    assert 1 == len(err.splitlines())


def test_a_sqlite_sync_killed_after_sending_never_resends(mlflow_server: Any, tmp_path: Path) -> None:
    """Killed after the server stored a batch but before the sidecar recorded it: the next sync checks, resends none."""
    db = tmp_path / "mlflow.db"
    sqlite_run(db, "sync-sqlite-killed", points=1200)  # 2400 points: more than one batch
    uri = f"sqlite:///{db}"
    dying = Counting(fail_after="/runs/log-batch")
    with pytest.raises(RuntimeError):
        run_sync(uri, mlflow_server.url, dying)
    sent = len(dying.sent_points())
    assert 0 < sent < 2400
    counting = Counting()
    (result,) = run_sync(uri, mlflow_server.url, counting)
    assert 2400 - sent == len(counting.sent_points()) == result.points
    loss = history(mlflow_server.url, result.run_id, "loss")
    assert 1200 == len(loss) == len(set(loss))
