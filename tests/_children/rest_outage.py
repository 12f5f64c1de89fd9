"""A child for the SIGTERM-during-an-outage tests: streams to a fake server that goes down, then waits for a signal.

Usage: ``rest_outage.py <journal_dir> <points> <refuse|hang>``

The server (an httpx transport in this process) answers the run's start, then either refuses
every connection (``refuse``) or takes each request and never answers (``hang``, what a server
behind a dead network looks like). The child logs ``points`` points, says ``ready <run_id>``,
and sleeps until the parent's SIGTERM (and later SIGKILL) ends it. The first request that starts
once steplog has interrupted the sink (the run is closing after the signal) prints
``request after interrupt``: the parent sends SIGKILL then. Request and close deadlines are an
hour, so nothing but the order of the close's steps puts the points in the journal before it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import anyio
import httpx

import steplog
from steplog.sinks.mlflow_rest import MlflowRestSink

RUN_ID = "5" * 32
HOUR = 3600.0


class Server(httpx.BaseTransport, httpx.AsyncBaseTransport):
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.down = False
        self.sink: Any = None
        self.said = False

    def _answer(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/experiments/get-by-name"):
            return httpx.Response(200, json={"experiment": {"experiment_id": "1", "lifecycle_stage": "active"}})
        if path.endswith("/runs/create"):
            info = {"run_id": RUN_ID, "experiment_id": "1", "artifact_uri": f"mlflow-artifacts:/1/{RUN_ID}/artifacts"}
            return httpx.Response(200, json={"run": {"info": info}})
        return httpx.Response(200, json={})

    def _seen(self) -> None:
        if not self.said and getattr(self.sink, "_interrupted", False):
            self.said = True
            print("request after interrupt", flush=True)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not self.down:
            return self._answer(request)
        self._seen()
        if self.mode == "hang":
            time.sleep(HOUR)
        raise httpx.ConnectError("connection refused", request=request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.down:
            return self._answer(request)
        self._seen()
        if self.mode == "hang":
            await anyio.sleep(HOUR)
        raise httpx.ConnectError("connection refused", request=request)


def main() -> None:
    journal_dir, points, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    server = Server(mode)
    sink = MlflowRestSink("http://mlflow.test:5000", transport=server, journal_dir=journal_dir, request_timeout=HOUR)
    server.sink = sink
    run = steplog.start_run("outage", sinks=[sink], flush_interval=0.05, close_timeout=HOUR)
    server.down = True
    for step in range(points):
        run.log_metric("loss", step / 10, step=step)
    print(f"ready {run.run_id}", flush=True)
    time.sleep(HOUR)


if __name__ == "__main__":
    main()
