"""The REST sink without a server: chunking, encoding, retry classification, backoff, outage journal replay.

A small in-memory stand-in for an MLflow tracking server answers through
``httpx.MockTransport``; faults are injected there (a server that is down, one
that loses the answer to ``runs/create``, one that refuses a request).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import steplog
from steplog._cli.sync_command import sync
from steplog._journal import Journal, journal_folders
from steplog._records import RunStatus
from steplog.sinks.mlflow_rest import (
    MAX_BODY_BYTES,
    MlflowRestSink,
    RestClient,
    RetryPolicy,
    ServerError,
    TransientError,
    client_options,
    encode_log_batches,
    parse_retry_after,
    redact,
)
from steplog.typing import Batch, RunRequest

URL = "http://mlflow.test:5000"
FAST = RetryPolicy(base=0.01, cap=0.05)


def _strict_loads(body: bytes) -> Any:
    """json.loads that refuses bare NaN/Infinity tokens (what the server would silently corrupt)."""

    def refuse(token: str) -> Any:
        raise AssertionError(f"bare {token} token in a request body")

    return json.loads(body, parse_constant=refuse)


class FakeServer:
    """Just enough of MLflow's REST API, storing what it is sent (identical points once, as the SQL store)."""

    def __init__(self) -> None:
        self.down = False
        self.experiments: dict[str, str] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.points: dict[str, list[tuple[int, int, Any]]] = {}
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.uploads: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.fail_next: list[Callable[[httpx.Request], httpx.Response | None]] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append(path)
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if self.fail_next:
            answer = self.fail_next.pop(0)(request)
            if answer is not None:
                return answer
        body = _strict_loads(request.content) if request.method == "POST" else None
        if path.endswith("/experiments/get-by-name"):
            name = request.url.params["experiment_name"]
            if name not in self.experiments:
                return _error(404, "RESOURCE_DOES_NOT_EXIST", f"no experiment {name}")
            exp = {"experiment_id": self.experiments[name], "name": name, "lifecycle_stage": "active"}
            return httpx.Response(200, json={"experiment": exp})
        if path.endswith("/experiments/create"):
            if body["name"] in self.experiments:
                return _error(400, "RESOURCE_ALREADY_EXISTS", "exists")
            self.experiments[body["name"]] = str(len(self.experiments) + 1)
            return httpx.Response(200, json={"experiment_id": self.experiments[body["name"]]})
        if path.endswith("/runs/create"):
            run_id = f"{len(self.runs) + 1:032x}"
            info = {
                "run_id": run_id,
                "experiment_id": body["experiment_id"],
                "run_name": body["run_name"],
                "user_id": body["user_id"],
                "start_time": body["start_time"],
                "artifact_uri": f"mlflow-artifacts:/{body['experiment_id']}/{run_id}/artifacts",
                "status": "RUNNING",
                "tags": {t["key"]: t["value"] for t in body["tags"]},
            }
            self.runs[run_id] = info
            return httpx.Response(200, json={"run": {"info": info}})
        if path.endswith("/runs/search"):
            key = body["filter"].split("'")[1]
            found = [{"info": r} for r in self.runs.values() if r["tags"].get("steplog.run_key") == key]
            return httpx.Response(200, json={"runs": found})
        if path.endswith("/runs/get"):
            run = self.runs.get(request.url.params["run_id"])
            if run is None:
                return _error(404, "RESOURCE_DOES_NOT_EXIST", "no run")
            return httpx.Response(200, json={"run": {"info": run}})
        if path.endswith("/runs/log-batch"):
            assert len(body["metrics"]) <= 1000
            assert len(body["params"]) <= 100
            assert len(body["tags"]) <= 100
            assert len(request.content) <= MAX_BODY_BYTES
            for m in body["metrics"]:
                point = (m["step"], m["timestamp"], m["value"])
                points = self.points.setdefault(m["key"], [])
                if point not in points:
                    points.append(point)
            for p in body["params"]:
                self.params[p["key"]] = p["value"]
            for t in body["tags"]:
                self.tags[t["key"]] = t["value"]
            return httpx.Response(200, json={})
        if path.endswith("/runs/update"):
            run = self.runs[body["run_id"]]
            run["status"], run["end_time"] = body["status"], body["end_time"]
            return httpx.Response(200, json={"run_info": run})
        if "/mlflow-artifacts/artifacts/" in path:
            self.uploads[path.split("/mlflow-artifacts/artifacts/", 1)[1]] = request.content
            return httpx.Response(200)
        return httpx.Response(404, text="<html>not found</html>")

    def steps(self, key: str) -> list[int]:
        return [p[0] for p in self.points.get(key, [])]


def _error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error_code": code, "message": message})


def _sink(server: FakeServer, tmp_path: Path, **kwargs: Any) -> MlflowRestSink:
    options: dict[str, Any] = {"journal_dir": tmp_path / "journal", "retry": FAST, "start_timeout": 2.0}
    options.update(kwargs)
    return MlflowRestSink(URL, transport=server.transport(), **options)


def _bodies(chunks: list[tuple[bytes, int]]) -> list[dict[str, Any]]:
    return [_strict_loads(body) for body, _n in chunks]


def _items(n: int, start: int = 0) -> list[Any]:
    items: list[Any] = []
    for step in range(start, start + n):
        items += (1_700_000_000_000 + step, step * 0.5, step)
    return items


# ---------------------------------------------------------------------------- chunking


def test_metrics_are_split_at_1000_per_request_in_logged_order() -> None:
    """2500 points of one key become requests of 1000, 1000 and 500 metrics, in order."""
    bodies = _bodies(encode_log_batches("r", [("loss", _items(2500))]))
    assert [1000, 1000, 500] == [len(b["metrics"]) for b in bodies]
    assert list(range(2500)) == [m["step"] for b in bodies for m in b["metrics"]]


def test_params_and_tags_are_split_at_100_per_request() -> None:
    """250 params and 150 tags are spread so no request holds more than 100 of either."""
    params = [(f"p{i}", str(i)) for i in range(250)]
    tags = [(f"t{i}", str(i)) for i in range(150)]
    bodies = _bodies(encode_log_batches("r", [], params, tags))
    assert all(len(b["params"]) <= 100 and len(b["tags"]) <= 100 for b in bodies)
    assert [f"p{i}" for i in range(250)] == [p["key"] for b in bodies for p in b["params"]]
    assert [f"t{i}" for i in range(150)] == [t["key"] for b in bodies for t in b["tags"]]


def test_entities_are_limited_to_1000_per_request() -> None:
    """100 params, 100 tags and 1000 metrics never share a request beyond 1000 entities."""
    params = [(f"p{i}", "v") for i in range(100)]
    tags = [(f"t{i}", "v") for i in range(100)]
    bodies = _bodies(encode_log_batches("r", [("m", _items(1000))], params, tags))
    sizes = [len(b["metrics"]) + len(b["params"]) + len(b["tags"]) for b in bodies]
    assert [1000, 200] == sizes
    assert 1000 == sum(len(b["metrics"]) for b in bodies)


def test_request_bodies_stay_under_one_megabyte() -> None:
    """100 params of 6000 characters and 100 tags of 8000 are split by size (no body over 1 MB)."""
    params = [(f"p{i}", "x" * 6000) for i in range(100)]
    tags = [(f"t{i}", "y" * 8000) for i in range(100)]
    chunks = encode_log_batches("r", [], params, tags)
    assert all(len(body) <= MAX_BODY_BYTES for body, _n in chunks)
    assert len(chunks) >= 2
    bodies = _bodies(chunks)
    assert 100 == sum(len(b["params"]) for b in bodies)
    assert 100 == sum(len(b["tags"]) for b in bodies)


def test_params_and_tags_are_deduplicated_per_request() -> None:
    """A key given twice is sent once per request: params keep their value, a tag its last value."""
    (body,) = _bodies(encode_log_batches("r", [], [("lr", "0.1"), ("lr", "0.1")], [("t", "a"), ("t", "b")]))
    assert [{"key": "lr", "value": "0.1"}] == body["params"]
    assert [{"key": "t", "value": "b"}] == body["tags"]


# ---------------------------------------------------------------------------- encoding


def test_special_values_are_sent_as_strings_and_ints_as_int64() -> None:
    """NaN and infinities become "NaN"/"Infinity"/"-Infinity"; -0.0 and big steps stay exact."""
    big = 2**63 - 1
    items = [1, math.nan, 0, 2, math.inf, 1, 3, -math.inf, 2, 4, -0.0, big, 5, 0.1, -5]
    (body,) = _bodies(encode_log_batches("r", [("m", items)]))
    values = [m["value"] for m in body["metrics"]]
    assert ["NaN", "Infinity", "-Infinity", -0.0, 0.1] == values
    assert math.copysign(1.0, values[3]) == -1.0
    assert [0, 1, 2, big, -5] == [m["step"] for m in body["metrics"]]
    assert [1, 2, 3, 4, 5] == [m["timestamp"] for m in body["metrics"]]


def test_numpy_values_are_sent_as_plain_numbers() -> None:
    """A numpy float32 in the batch is encoded as its exact float value, not its short str()."""
    import numpy as np  # in the test extra: a missing numpy must fail, not skip

    (body,) = _bodies(encode_log_batches("r", [("m", [1, np.float32(0.1), 0])]))
    assert float(np.float32(0.1)) == body["metrics"][0]["value"]


# ---------------------------------------------------------------------------- retry classification


@pytest.mark.anyio
@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_transient_statuses_are_retryable(status: int) -> None:
    """408, 429, 500, 502, 503 and 504 raise TransientError (retried), not ServerError."""
    client = RestClient(URL, transport=httpx.MockTransport(lambda r: _error(status, "X", "busy")))
    with pytest.raises(TransientError):
        await client.request("GET", "/api/2.0/mlflow/runs/get")
    await client.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 501])
async def test_other_statuses_are_permanent_and_name_the_error_code(status: int) -> None:
    """Other 4xx (and 501) raise ServerError naming the server's error_code and message."""
    client = RestClient(URL, transport=httpx.MockTransport(lambda r: _error(status, "INVALID_X", "bad thing")))
    with pytest.raises(ServerError) as info:
        await client.request("POST", "/api/2.0/mlflow/runs/log-batch", json={})
    await client.aclose()
    assert (status, "INVALID_X") == (info.value.status, info.value.error_code)
    assert "INVALID_X: bad thing" in str(info.value)


@pytest.mark.anyio
async def test_connection_errors_are_transient_and_not_applied() -> None:
    """A refused connection is transient and marked as never reaching the server; a read timeout may have."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def stall(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    outcomes = []
    for handler in (refuse, stall):
        client = RestClient(URL, transport=httpx.MockTransport(handler))
        with pytest.raises(TransientError) as info:
            await client.request("GET", "/x")
        await client.aclose()
        outcomes.append(info.value.maybe_applied)
    assert [False, True] == outcomes


@pytest.mark.anyio
async def test_retry_after_is_honoured_on_429() -> None:
    """A 429 carries the server's Retry-After, which replaces the backoff."""
    client = RestClient(
        URL, transport=httpx.MockTransport(lambda r: httpx.Response(429, headers={"Retry-After": "7"}, text="slow"))
    )
    with pytest.raises(TransientError) as info:
        await client.request("GET", "/x")
    await client.aclose()
    assert 7.0 == info.value.retry_after
    assert 7.0 == RetryPolicy().delay(3, info.value.retry_after)


def test_retry_after_accepts_an_http_date() -> None:
    """Retry-After as an HTTP date gives the seconds until then."""
    assert 30.0 == parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now=1767225600.0)
    assert None is parse_retry_after("soon")


def test_backoff_is_exponential_capped_and_jittered() -> None:
    """The n-th wait lies in [d/2, d] with d = min(cap, base * 2**n); Retry-After is capped too."""
    policy = RetryPolicy(base=0.5, cap=4.0, max_retry_after=20.0)
    low = [policy.delay(n, rand=lambda: 0.0) for n in range(6)]
    high = [policy.delay(n, rand=lambda: 1.0) for n in range(6)]
    assert [0.25, 0.5, 1.0, 2.0, 2.0, 2.0] == low
    assert [0.5, 1.0, 2.0, 4.0, 4.0, 4.0] == high
    assert 20.0 == policy.delay(0, retry_after=3600)


# ---------------------------------------------------------------------------- auth and TLS


def test_auth_comes_from_mlflow_environment_variables() -> None:
    """MLFLOW_TRACKING_TOKEN is a bearer header; username/password become basic auth; insecure TLS turns off checks."""
    token = client_options({"MLFLOW_TRACKING_TOKEN": "s3cret"})
    basic = client_options({"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p"})
    insecure = client_options({"MLFLOW_TRACKING_INSECURE_TLS": "true"})
    assert "Bearer s3cret" == token["headers"]["Authorization"]
    assert isinstance(basic["auth"], httpx.BasicAuth)
    assert False is insecure["verify"]


@pytest.mark.anyio
async def test_bearer_token_is_sent_and_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The token reaches the server in the Authorization header, but no error message shows it or a URL password."""
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123")
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization"))
        return _error(403, "PERMISSION_DENIED", "no")

    client = RestClient("http://user:pw-456@mlflow.test:5000", transport=httpx.MockTransport(handler))
    with pytest.raises(ServerError) as info:
        await client.request("GET", "/x")
    await client.aclose()
    assert ["Bearer tok-123"] == seen
    assert "tok-123" not in str(info.value)
    assert "pw-456" not in str(info.value)
    assert "http://mlflow.test:5000" == redact("http://user:pw-456@mlflow.test:5000")


# ---------------------------------------------------------------------------- the sink


def test_a_run_streams_params_metrics_artifacts_and_its_end(tmp_path: Path) -> None:
    """Everything a run logs reaches the server, and close ends the run with status and end time."""
    server = FakeServer()
    with steplog.start_run("exp", run_name="r", sinks=[_sink(server, tmp_path)]) as run:
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
        return _error(400, "RESOURCE_ALREADY_EXISTS", "exists")

    server.fail_next = [lambda r: None, created_by_someone_else]
    with steplog.start_run("exp", sinks=[_sink(server, tmp_path)]) as run:
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
    with steplog.start_run("exp", sinks=[_sink(server, tmp_path)]) as run:
        run.log_metric("m", 1.0)
    assert [run.run_id] == list(server.runs)


def test_an_unreachable_server_at_start_is_a_clear_error_in_bounded_time(tmp_path: Path) -> None:
    """A server that never answers makes start_run raise a StepLogError naming it, after start_timeout."""
    server = FakeServer()
    server.down = True
    with pytest.raises(steplog.StepLogError) as info:
        steplog.start_run("exp", sinks=[_sink(server, tmp_path, start_timeout=0.3)])
    assert "http://mlflow.test:5000" in str(info.value)
    assert "did not answer in time" in str(info.value)


def test_a_permanent_refusal_is_reported_at_close_with_its_error_code(tmp_path: Path) -> None:
    """A log-batch the server refuses (400) is not retried forever; close raises naming the error_code."""
    server = FakeServer()
    run = steplog.start_run("exp", sinks=[_sink(server, tmp_path)])
    server.fail_next = [lambda r: _error(400, "INVALID_PARAMETER_VALUE", "Changing param values is not allowed")]
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
    sink = _sink(server, tmp_path, max_buffer=500)
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
    sink = _sink(server, tmp_path)
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
    sink = _sink(server, tmp_path)

    request = RunRequest(experiment_name="exp", run_name="r", tags={}, start_time=1, user_id="u")
    anyio.run(sink.open, request)
    sink.write_sync(Batch(metrics=[("x", _items(3))]))
    sink.close_sync(RunStatus.KILLED, 99)
    assert sink.journal_path is not None
    journal = Journal.open(sink.journal_path)
    ops = [op for _, op in journal.pending()]
    journal.close()
    assert ["batch", "end"] == [op["op"] for op in ops]
    assert [0, 1, 2] == [m["step"] for m in ops[0]["body"]["metrics"]]
    assert {"op": "end", "status": "KILLED", "end_time": 99} == ops[1]


def test_a_torn_journal_tail_is_cut_back_on_reopen(tmp_path: Path) -> None:
    """A crash mid-append leaves a partial last line; reopening the journal cuts it; replay sees whole lines only."""
    journal = Journal.create(tmp_path, {"run_id": "r1", "tracking_uri": URL})
    journal.append([journal.batch_line(b'{"run_id":"r1","metrics":[]}', 0), journal.end_line("FINISHED", 5)])
    journal.close()
    with open(tmp_path / "r1" / "journal.jsonl", "ab") as f:
        f.write(b'{"op":"batch","points":3,"bo')  # the torn tail of a crashed append
    reopened = Journal.create(tmp_path, {"run_id": "r1", "tracking_uri": URL})
    ops = [op["op"] for _, op in reopened.pending()]
    reopened.close()
    assert ["batch", "end"] == ops
    assert (tmp_path / "r1" / "journal.jsonl").read_bytes().endswith(b"\n")
    assert "r1" == reopened.header["run_id"]


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
    run = steplog.start_run("exp", sinks=[_sink(server, tmp_path)])
    run.log_text("x", "a.txt")
    with contextlib.suppress(steplog.WriteError):  # raised here too when the barrier's own write met the refusal
        run.flush()
    run.log_metric("after", 1.0, step=1)
    with pytest.raises(steplog.WriteError) as info:
        run.close()
    assert [1] == server.steps("after")
    assert "--serve-artifacts" in str(info.value)


def test_redact_keeps_ipv6_hosts_and_ports() -> None:
    """Credentials are removed from a URL while an IPv6 literal keeps its brackets and port."""
    from steplog.sinks.mlflow_rest import redact

    assert "http://[::1]:5000/x" == redact("http://user:secret@[::1]:5000/x")
    assert "https://host:8443/a" == redact("https://user:secret@host:8443/a")
