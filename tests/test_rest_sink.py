"""The REST sink (sinks/mlflow_rest.py) against the in-memory fake server: streaming, start, outage, journal, close."""

from __future__ import annotations

import contextlib
from pathlib import Path

import anyio
import httpx
import pytest

import steplog
from _rest_fake import URL, FakeServer, error, items, make_sink
from steplog._journal import Journal, journal_folders
from steplog._records import RunStatus
from steplog._sync import sync
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
    run.log_params({"lr": 0.1})
    for step in range(1500):
        run.log_metric("x", float(step), step=step)
    run.log_text("kept", "a.txt")
    server.down = True
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
    """write_sync/close_sync (no event loop) put the batch and the run's end in the journal, in order."""
    server = FakeServer()
    sink = make_sink(server, tmp_path)

    request = RunRequest(experiment_name="exp", run_name="r", tags={}, start_time=1, user_id="u")
    anyio.run(sink.open, request)
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
