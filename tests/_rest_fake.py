"""A small in-memory stand-in for an MLflow tracking server, answering through ``httpx.MockTransport``.

Faults are injected there: a server that is down, one that loses the answer to
``runs/create``, one that refuses a request, one that answers what MLflow never would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from steplog.sinks._rest.encode import MAX_BODY_BYTES
from steplog.sinks._rest.retry import RetryPolicy
from steplog.sinks.mlflow_rest import MlflowRestSink

URL = "http://mlflow.test:5000"
RID = "0123456789abcdef0123456789abcdef"
FAST = RetryPolicy(base=0.01, cap=0.05)


def strict_loads(body: bytes) -> Any:
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
        # None for a GET; the endpoints that read a body assert the client POSTed one
        body = strict_loads(request.content) if request.method == "POST" else None
        if path.endswith("/experiments/get-by-name"):
            name = request.url.params["experiment_name"]
            if name not in self.experiments:
                return error(404, "RESOURCE_DOES_NOT_EXIST", f"no experiment {name}")
            exp = {"experiment_id": self.experiments[name], "name": name, "lifecycle_stage": "active"}
            return httpx.Response(200, json={"experiment": exp})
        if path.endswith("/experiments/create"):
            assert body is not None
            if body["name"] in self.experiments:
                return error(400, "RESOURCE_ALREADY_EXISTS", "exists")
            self.experiments[body["name"]] = str(len(self.experiments) + 1)
            return httpx.Response(200, json={"experiment_id": self.experiments[body["name"]]})
        if path.endswith("/runs/create"):
            assert body is not None
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
            assert body is not None
            key = body["filter"].split("'")[1]
            found = [{"info": r} for r in self.runs.values() if r["tags"].get("steplog.run_key") == key]
            return httpx.Response(200, json={"runs": found})
        if path.endswith("/runs/get"):
            run = self.runs.get(request.url.params["run_id"])
            if run is None:
                return error(404, "RESOURCE_DOES_NOT_EXIST", "no run")
            return httpx.Response(200, json={"run": {"info": run}})
        if path.endswith("/runs/log-batch"):
            assert body is not None
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
            assert body is not None
            run = self.runs[body["run_id"]]
            run["status"], run["end_time"] = body["status"], body["end_time"]
            return httpx.Response(200, json={"run_info": run})
        if "/mlflow-artifacts/artifacts/" in path:
            self.uploads[path.split("/mlflow-artifacts/artifacts/", 1)[1]] = request.content
            return httpx.Response(200)
        return httpx.Response(404, text="<html>not found</html>")

    def steps(self, key: str) -> list[int]:
        return [p[0] for p in self.points.get(key, [])]


def error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error_code": code, "message": message})


def make_sink(server: FakeServer, tmp_path: Path, **kwargs: Any) -> MlflowRestSink:
    options: dict[str, Any] = {"journal_dir": tmp_path / "journal", "retry": FAST, "start_timeout": 2.0}
    options.update(kwargs)
    return MlflowRestSink(URL, transport=server.transport(), **options)


def bodies(chunks: list[tuple[bytes, int]]) -> list[dict[str, Any]]:
    return [strict_loads(body) for body, _n in chunks]


def items(n: int, start: int = 0) -> list[Any]:
    items: list[Any] = []
    for step in range(start, start + n):
        items += (1_700_000_000_000 + step, step * 0.5, step)
    return items
