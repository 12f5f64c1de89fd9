"""The REST sink (sinks/mlflow_rest.py) against the in-memory fake server: streaming, start, outage, journal, close."""

from __future__ import annotations

import contextlib
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import steplog
import steplog.sinks
from _rest_fake import FAST, URL, FakeServer, error, items, make_sink
from steplog._cli.sync_command import sync
from steplog._journal import Journal, journal_folders
from steplog._records import RunStatus
from steplog.sinks.mlflow_rest import MlflowRestSink
from steplog.typing import Batch, RunRequest

# ---------------------------------------------------------------------------- the sink


def test_a_run_streams_params_metrics_artifacts_and_its_end(tmp_path: Path) -> None:
    """Everything a run logs reaches the server, and close ends the run with status and end time."""
    server = FakeServer()
    with steplog.start_run("exp", run_name="r", sinks=[make_sink(server, tmp_path)]) as run:
        run.log_params({f"p{i}": i for i in range(150)})
        run.set_tag("team", "ml")
        for step in range(2500):
            run.log_metric("loss", 1.0 / (step + 1), step=step)
        run.log_text("hello", "notes/a.txt")
    info = server.runs[run.run_id]
    assert list(range(2500)) == server.steps("loss")
    assert 150 == len(server.params)
    assert "ml" == server.tags["team"]
    assert b"hello" == server.uploads[f"1/{run.run_id}/artifacts/notes/a.txt"]
    assert "FINISHED" == info["status"]
    assert not (tmp_path / "journal").exists()


def test_experiment_creation_race_is_resolved_by_fetching_again(tmp_path: Path) -> None:
    """If another client creates the experiment between lookup and create, the run joins that experiment."""
    server = FakeServer()

    def created_by_someone_else(request: httpx.Request) -> httpx.Response | None:
        server.experiments["exp"] = "7"
        return error(400, "RESOURCE_ALREADY_EXISTS", "exists")

    server.fail_next = [lambda r: None, created_by_someone_else]
    with steplog.start_run("exp", sinks=[make_sink(server, tmp_path)]) as run:
        pass
    assert "7" == run.experiment_id


def test_a_lost_runs_create_answer_does_not_create_a_second_run(tmp_path: Path) -> None:
    """When runs/create succeeds but its answer is lost, the retry finds the run by its key instead of re-creating."""
    server = FakeServer()

    def create_then_fail(request: httpx.Request) -> httpx.Response | None:
        if request.url.path.endswith("/runs/create"):
            server.handle(request)  # the run is created...
            raise httpx.ReadTimeout("answer lost", request=request)  # ...but the client never hears
        return None

    server.experiments["exp"] = "1"
    server.fail_next = [lambda r: None, create_then_fail]
    with steplog.start_run("exp", sinks=[make_sink(server, tmp_path)]) as run:
        run.log_metric("m", 1.0)
    assert [run.run_id] == list(server.runs)


def test_an_unreachable_server_at_start_is_a_clear_error_in_bounded_time(tmp_path: Path) -> None:
    """A server that never answers makes start_run raise a StepLogError naming it, after start_timeout."""
    server = FakeServer()
    server.down = True
    with pytest.raises(steplog.StepLogError) as info:
        steplog.start_run("exp", sinks=[make_sink(server, tmp_path, start_timeout=0.3)])
    assert "http://mlflow.test:5000" in str(info.value)
    assert "did not answer in time" in str(info.value)


def test_a_permanent_refusal_is_reported_at_close_with_its_error_code(tmp_path: Path) -> None:
    """A log-batch the server refuses (400) is not retried forever; close raises naming the error_code."""
    server = FakeServer()
    run = steplog.start_run("exp", sinks=[make_sink(server, tmp_path)])
    server.fail_next = [lambda r: error(400, "INVALID_PARAMETER_VALUE", "Changing param values is not allowed")]
    run.log_param("lr", 0.1)
    with pytest.raises(steplog.WriteError) as info:
        run.close()
    assert "INVALID_PARAMETER_VALUE" in str(info.value)
    assert "FINISHED" == server.runs[run.run_id]["status"]


@pytest.mark.anyio
async def test_an_outage_spills_to_the_journal_and_replays_in_order(tmp_path: Path) -> None:
    """Points logged while the server is down wait in memory, spill to the journal past max_buffer,
    and reach the server in logged order, each once, when it is back; the journal is then removed."""
    server = FakeServer()
    sink = make_sink(server, tmp_path, max_buffer=500)
    async with steplog.start_run("exp", sinks=[sink]) as run:
        for step in range(300):
            run.log_metric("x", float(step), step=step)
        await run.aflush()
        server.down = True
        for step in range(300, 3000):
            run.log_metric("x", float(step), step=step)
            if step % 250 == 0:
                await run.aflush()  # the hot path went on; the sink holds the backlog
        await run.aflush()
        assert sink.journal_path is not None
        journal = Journal.open(sink.journal_path)
        spilled = [m["step"] for _, op in journal.pending() for m in op.get("body", {}).get("metrics", [])]
        journal.close()
        assert spilled == sorted(spilled)
        assert sink.spilled_points > 0
        server.down = False
        for step in range(3000, 3100):
            run.log_metric("x", float(step), step=step)
    assert list(range(3100)) == server.steps("x")
    assert "FINISHED" == server.runs[run.run_id]["status"]
    assert [] == journal_folders(tmp_path / "journal")


def test_close_during_an_outage_leaves_a_journal_that_sync_uploads_once(tmp_path: Path) -> None:
    """close(timeout) with the server down keeps the data in the journal and names the sync command;
    sync then uploads everything and ends the run, and a second sync adds nothing."""
    server = FakeServer()
    sink = make_sink(server, tmp_path)
    run = steplog.start_run("exp", sinks=[sink])
    server.down = True  # before anything is logged: the writer cannot race the outage
    run.log_params({"lr": 0.1})
    for step in range(1500):
        run.log_metric("x", float(step), step=step)
    run.log_text("kept", "a.txt")
    with pytest.raises(steplog.StepLogError) as info:
        run.close(timeout=1.0)
    folder = tmp_path / "journal" / run.run_id
    assert f"steplog sync {folder} --to {URL}" in str(info.value)
    server.down = False
    first = anyio.run(lambda: sync(folder, URL, transport=server.transport()))
    again = anyio.run(lambda: sync(folder, URL, transport=server.transport()))
    assert list(range(1500)) == server.steps("x")
    assert {"lr": "0.1"} == server.params
    assert b"kept" == server.uploads[f"1/{run.run_id}/artifacts/a.txt"]
    assert "FINISHED" == server.runs[run.run_id]["status"]
    assert (1500, 0) == (first[0].points, again[0].points)


def test_emergency_path_writes_the_journal_without_network(tmp_path: Path) -> None:
    """write_sync/close_sync (no event loop) put the batch and the run's end in the journal, in order,
    and leave them there when the server does not answer."""
    server = FakeServer()
    sink = make_sink(server, tmp_path)

    request = RunRequest(experiment_name="exp", run_name="r", tags={}, start_time=1, user_id="u")
    anyio.run(sink.open, request)
    server.down = True
    sink.write_sync(Batch(metrics=[("x", items(3))]))
    sink.close_sync(RunStatus.KILLED, 99)
    assert sink.journal_path is not None
    journal = Journal.open(sink.journal_path)
    ops = [op for _, op in journal.pending()]
    journal.close()
    assert ["batch", "end"] == [op["op"] for op in ops]
    assert [0, 1, 2] == [m["step"] for m in ops[0]["body"]["metrics"]]
    assert {"op": "end", "status": "KILLED", "end_time": 99} == ops[1]


def test_an_artifact_the_server_cannot_take_does_not_stall_the_rest(tmp_path: Path) -> None:
    """With artifacts not served by the server, later metrics still arrive, and close names the fix."""
    server = FakeServer()

    def s3_artifacts(request: httpx.Request) -> httpx.Response | None:
        if not request.url.path.endswith("/runs/create"):
            return None
        response = server.handle(request)
        info = response.json()["run"]["info"]
        info["artifact_uri"] = "s3://bucket/run/artifacts"
        return httpx.Response(200, json={"run": {"info": info}})

    server.fail_next = [lambda r: None, lambda r: None, s3_artifacts]
    run = steplog.start_run("exp", sinks=[make_sink(server, tmp_path)])
    run.log_text("x", "a.txt")
    with contextlib.suppress(steplog.WriteError):  # raised here too when the barrier's own write met the refusal
        run.flush()
    run.log_metric("after", 1.0, step=1)
    with pytest.raises(steplog.WriteError) as info:
        run.close()
    assert [1] == server.steps("after")
    assert "--serve-artifacts" in str(info.value)


# ---------------------------------------------------------------------------- hostile answers


def _answer_create_with(server: FakeServer, **changes: Any) -> Any:
    """A fault: runs/create answers with some fields of the run's info replaced."""

    def hook(request: httpx.Request) -> httpx.Response | None:
        if not request.url.path.endswith("/runs/create"):
            return None
        info = server.handle(request).json()["run"]["info"]
        info.update(changes)
        return httpx.Response(200, json={"run": {"info": info}})

    return hook


@pytest.mark.parametrize(
    "changes",
    [
        {"run_id": "../../escaped"},
        {"run_id": "<absolute>"},
        {"run_id": "0123456789ABCDEF0123456789ABCDEF"},
        {"run_id": 12},
        {"experiment_id": "../1"},
        {"experiment_id": "١٢"},
        {"artifact_uri": "mlflow-artifacts:/1/../../x"},
    ],
)
def test_a_malformed_id_from_the_server_is_refused_at_start_and_nothing_is_written(
    tmp_path: Path, changes: dict[str, Any]
) -> None:
    """A run id, experiment id or artifact URI that is not MLflow's is a StepLogError at start, and no
    destination (the local store beside the server, the journal) writes anything for it."""
    server = FakeServer()
    if changes.get("run_id") == "<absolute>":
        changes = {"run_id": str(tmp_path / "outside")}
    server.fail_next = [lambda r: None, lambda r: None, _answer_create_with(server, **changes)]
    store = tmp_path / "work" / "mlruns"
    journal = tmp_path / "work" / "journal"
    sink = make_sink(server, tmp_path, journal_dir=journal)
    with pytest.raises(steplog.StepLogError) as info:
        steplog.start_run("exp", sinks=[sink, steplog.sinks.MlrunsSink(store)])
    assert "is not allowed" in str(info.value) or "gave the artifact URI" in str(info.value)
    assert [] == sorted(tmp_path.iterdir())  # no store, no journal, nothing at "../../x" or the absolute path


def test_invalid_json_at_start_is_a_steplog_error(tmp_path: Path) -> None:
    """Broken JSON in answer to get-by-name is a StepLogError saying what answered, not a raw decode error."""
    server = FakeServer()
    server.fail_next = [lambda r: httpx.Response(200, text="{not json", headers={"Content-Type": "application/json"})]
    with pytest.raises(steplog.StepLogError) as info:
        steplog.start_run("exp", sinks=[make_sink(server, tmp_path)])
    assert "not MLflow's JSON" in str(info.value)


# ---------------------------------------------------------------------------- refusals that a fix undoes


def test_an_expired_token_mid_run_keeps_every_point_for_sync(tmp_path: Path) -> None:
    """A 401 mid-run drops nothing: the points go to the journal, the error says what to set, and
    `steplog sync` uploads them all once the token is fixed."""
    server = FakeServer()
    sink = make_sink(server, tmp_path)
    run = steplog.start_run("exp", sinks=[sink])
    expired = True

    def auth(request: httpx.Request) -> httpx.Response | None:
        return error(401, "UNAUTHENTICATED", "token expired") if expired else None

    server.fail_next = [auth] * 10_000
    for step in range(500):
        run.log_metric("x", float(step), step=step)
    with pytest.raises(steplog.StepLogError) as info:
        run.close(timeout=2.0)
    assert "authentication failed (401)" in str(info.value)
    assert "MLFLOW_TRACKING_TOKEN" in str(info.value)
    assert [] == server.steps("x")
    expired = False
    folder = tmp_path / "journal" / run.run_id
    (result,) = anyio.run(lambda: sync(folder, URL, transport=server.transport()))
    assert list(range(500)) == server.steps("x")
    assert 500 == result.points
    assert "FINISHED" == server.runs[run.run_id]["status"]


def test_a_200_that_is_not_mlflow_mid_run_is_not_an_acknowledgement(tmp_path: Path) -> None:
    """A proxy's 200 login page in answer to log-batch counts nothing as stored: the points stay in the journal."""
    server = FakeServer()
    sink = make_sink(server, tmp_path)
    run = steplog.start_run("exp", sinks=[sink])

    def portal(request: httpx.Request) -> httpx.Response | None:
        return httpx.Response(200, text="<html>Sign in</html>", headers={"Content-Type": "text/html"})

    server.fail_next = [portal] * 10_000
    for step in range(100):
        run.log_metric("x", float(step), step=step)
    with pytest.raises(steplog.StepLogError):
        run.close(timeout=2.0)
    assert 0 == sink.acknowledged_points
    journal = Journal.open(tmp_path / "journal" / run.run_id)
    points = sum(op.get("points", 0) for _, op in journal.pending())
    journal.close()
    assert 100 == points


# ---------------------------------------------------------------------------- a hung server, the backlog


@pytest.mark.anyio
async def test_a_hung_server_is_given_up_on_and_close_journals_every_point(tmp_path: Path) -> None:
    """log-batch requests that never get an answer end at the request deadline; write() returns, and close()
    puts every point of every batch (not just the first) in the journal."""
    server = FakeServer()
    hung = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(("/runs/log-batch", "/runs/update")) and not hung.is_set():
            await anyio.sleep_forever()
        return server.handle(request)

    sink = MlflowRestSink(
        URL, transport=httpx.MockTransport(handler), journal_dir=tmp_path / "j", retry=FAST, request_timeout=0.2
    )
    request = RunRequest(experiment_name="exp", run_name="r", tags={}, start_time=1, user_id="u")
    await sink.open(request)
    with anyio.fail_after(10):
        for n in range(5):
            await sink.write(Batch(metrics=[("x", items(100, start=100 * n))]))
        with anyio.move_on_after(1.0), pytest.raises(steplog.StepLogError) as info:
            await sink.close(RunStatus.FINISHED, 5)
    assert "steplog sync" in str(info.value)
    journal = Journal.open(tmp_path / "j" / sink.journal_path.name)  # type: ignore[union-attr]
    steps = [m["step"] for _, op in journal.pending() for m in op.get("body", {}).get("metrics", [])]
    journal.close()
    assert list(range(500)) == steps
    assert 0 == sink.acknowledged_points


@pytest.mark.anyio
async def test_a_backlog_is_drained_in_full_requests(tmp_path: Path) -> None:
    """50 small batches taken during an outage go out as one 1000-metric request when the server is back,
    and outage_state() describes the outage meanwhile."""
    server = FakeServer()
    sink = make_sink(server, tmp_path)
    request = RunRequest(experiment_name="exp", run_name="r", tags={}, start_time=1, user_id="u")
    await sink.open(request)
    server.down = True
    for n in range(50):
        await sink.write(Batch(metrics=[("x", items(20, start=20 * n))]))
    state = sink.outage_state()
    assert (1000, 0) == (state.backlog_points, state.acknowledged_points)
    assert state.retries >= 1
    assert "cannot connect" in (state.last_error or "")
    server.down = False
    server.requests.clear()
    await sink.close(RunStatus.FINISHED, 5)
    assert 1 == sum(path.endswith("/runs/log-batch") for path in server.requests)
    assert list(range(1000)) == server.steps("x")
    assert (0, None, 1000) == (sink.backlog_points, sink.outage_state().last_error, sink.acknowledged_points)


# ---------------------------------------------------------------------------- SIGTERM during an outage


OUTAGE_CHILD = Path(__file__).parent / "_children" / "rest_outage.py"


@contextlib.contextmanager
def outage_child(tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``rest_outage.py <tmp_path/journal> *args``, killed (and reaped) on the way out whatever happened."""
    proc = subprocess.Popen(
        [sys.executable, str(OUTAGE_CHILD), str(tmp_path / "journal"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def sigterm_then_sigkill_at_the_first_request_after_it(proc: subprocess.Popen[str]) -> None:
    """SIGTERM; once the child says a request started after steplog interrupted its sink, SIGKILL (the grace
    period is over). The wait for that line is bounded generously: it is an event, not a timing."""
    assert proc.stdout is not None
    proc.send_signal(signal.SIGTERM)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready, "no request after the signal within 60 s"
    assert "request after interrupt" == proc.stdout.readline().strip()
    proc.kill()


def journal_ops(folder: Path) -> list[dict[str, Any]]:
    journal = Journal.open(folder)
    try:
        return [op for _, op in journal.pending()]
    finally:
        journal.close()


def journaled_steps(folder: Path) -> list[int]:
    return [m["step"] for op in journal_ops(folder) for m in op.get("body", {}).get("metrics", [])]


@pytest.mark.slow
@pytest.mark.parametrize("server", ["refuse", "hang"])
def test_sigterm_during_an_outage_journals_every_point_before_it_waits_on_the_network(
    tmp_path: Path, server: str
) -> None:
    """SIGTERM with the server down (refusing, or taking requests and never answering), then SIGKILL as soon as
    the close tries the server (docker stop with a short grace): the journal already holds every point.

    Request and close deadlines are an hour in the child: only the order of the close's steps can
    put the points in the journal before the first request after the signal.
    """
    points = 30_000
    with outage_child(tmp_path, str(points), server) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready"), line
        run_id = line.split()[1]
        sigterm_then_sigkill_at_the_first_request_after_it(proc)
    assert list(range(points)) == journaled_steps(tmp_path / "journal" / run_id)


@pytest.mark.slow
@pytest.mark.parametrize("host", ["thread", "asyncio", "trio"])
def test_sigterm_while_a_close_waits_on_a_hung_server_journals_every_point(tmp_path: Path, host: str) -> None:
    """The close began before the signal (the training finished; the server hangs on a request): SIGTERM still
    journals every point before the next network wait, on a writer thread or in an asyncio or trio loop.

    Request and close deadlines are an hour in the child: without the signal, the close waits for the hung request.
    """
    points = 3_000
    with outage_child(tmp_path, str(points), "hang", "closing", host) as proc:
        assert proc.stdout is not None
        # in any order (the writer may send, and hang, before the logging ends): the points are logged,
        # the close is under way, and it waits for the sink, which hangs on a request
        lines = {proc.stdout.readline().strip() for _ in range(3)}
        said_ready = [line for line in lines if line.startswith("ready ")]
        assert said_ready, lines
        assert {"closing", "hung"} == lines - set(said_ready), lines
        run_id = said_ready[0].split()[1]
        sigterm_then_sigkill_at_the_first_request_after_it(proc)
    assert list(range(points)) == journaled_steps(tmp_path / "journal" / run_id)


@pytest.mark.slow
def test_sigterm_with_a_server_that_hangs_on_the_runs_end_journals_the_end(tmp_path: Path) -> None:
    """SIGTERM, every point acknowledged, then the server hangs on the run's end until SIGKILL: the journal
    holds the end (KILLED), so ``steplog sync`` records it; nothing else is left in it."""
    with outage_child(tmp_path, "3000", "end-hangs") as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready"), line
        run_id = line.split()[1]
        sigterm_then_sigkill_at_the_first_request_after_it(proc)  # the request for the run's end
    ops = journal_ops(tmp_path / "journal" / run_id)
    assert [("end", "KILLED")] == [(op["op"], op.get("status")) for op in ops]


@pytest.mark.slow
def test_sigterm_with_a_healthy_server_sends_everything_and_leaves_no_journal(tmp_path: Path) -> None:
    """SIGTERM with the server up: the close journals first (as after any signal), sends, records the end, and
    removes the journal; the process then dies by SIGTERM as it would without steplog."""
    with outage_child(tmp_path, "3000", "up") as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("ready")
        proc.send_signal(signal.SIGTERM)
        assert -signal.SIGTERM == proc.wait(60)
    assert [] == journal_folders(tmp_path / "journal")


def test_emergency_close_journals_then_sends_with_the_time_left(tmp_path: Path) -> None:
    """With the server up, close_sync replays the journal it just wrote: the points and the run's end reach the
    server, and the journal is removed."""
    server = FakeServer()
    sink = make_sink(server, tmp_path)
    request = RunRequest(experiment_name="exp", run_name="r", tags={}, start_time=1, user_id="u")
    info = anyio.run(sink.open, request)
    sink.write_sync(Batch(metrics=[("x", items(1500))]))
    sink.close_sync(RunStatus.KILLED, 99)
    assert list(range(1500)) == server.steps("x")
    assert ("KILLED", 99) == (server.runs[info.run_id]["status"], server.runs[info.run_id]["end_time"])
    assert [] == journal_folders(tmp_path / "journal")


class _SyncTrickle(httpx.SyncByteStream):
    """A body that arrives one byte at a time, never ending."""

    def __iter__(self) -> Any:
        while True:
            time.sleep(0.05)
            yield b"{"


def test_emergency_close_gives_up_on_a_trickling_server_and_keeps_the_journal(tmp_path: Path) -> None:
    """A server that trickles its answer cannot hold the emergency close past its budget; the journal stays."""
    server = FakeServer()
    sink = make_sink(server, tmp_path, request_timeout=0.3)
    request = RunRequest(experiment_name="exp", run_name="r", tags={}, start_time=1, user_id="u")
    anyio.run(sink.open, request)
    server.fail_next = [lambda r: httpx.Response(200, stream=_SyncTrickle())]
    sink.write_sync(Batch(metrics=[("x", items(10))]))
    closing = threading.Thread(target=sink.close_sync, args=(RunStatus.KILLED, 99), daemon=True)
    closing.start()
    closing.join(30)
    assert not closing.is_alive()
    assert sink.journal_path is not None
    journal = Journal.open(sink.journal_path)
    ops = [op["op"] for _, op in journal.pending()]
    journal.close()
    assert ["batch", "end"] == ops


def test_stats_describe_an_outage_and_its_end(tmp_path: Path) -> None:
    """During an outage run.stats() shows the backlog, the retries and the last error in words; once the
    server is back and a barrier returns, the backlog is empty."""
    server = FakeServer()
    sink = make_sink(server, tmp_path)
    run = steplog.start_run("exp", sinks=[sink], flush_interval=0.01, handle_signals=False)
    try:
        server.down = True
        for step in range(200):
            run.log_metric("x", float(step), step=step)
        run.flush()  # the sink keeps the points safe (memory or journal): flush returns during the outage
        during = run.stats()
        assert 200 == during.backlog
        assert during.retries >= 1
        assert "cannot connect" in (during.last_error or "")
        server.down = False
    finally:
        run.close()
    after = run.stats()
    assert (0, None) == (after.backlog, after.last_error)
    assert list(range(200)) == server.steps("x")
