"""A child for the SIGTERM-during-an-outage test: streams to a fake server that goes down, then waits for a signal.

Usage: ``rest_outage.py <journal_dir> <points>``

The server (an ``httpx.MockTransport`` in this process) answers the run's start, then
refuses every connection. The child logs ``points`` points, says ``ready <run_id>``,
and sleeps until the parent's SIGTERM (and, after a grace period, SIGKILL) ends it.
"""

from __future__ import annotations

import sys
import time

import httpx

import steplog
from steplog.sinks.mlflow_rest import MlflowRestSink

RUN_ID = "5" * 32
down = False


def handler(request: httpx.Request) -> httpx.Response:
    if down:
        raise httpx.ConnectError("connection refused", request=request)
    path = request.url.path
    if path.endswith("/experiments/get-by-name"):
        return httpx.Response(200, json={"experiment": {"experiment_id": "1", "lifecycle_stage": "active"}})
    if path.endswith("/runs/create"):
        info = {"run_id": RUN_ID, "experiment_id": "1", "artifact_uri": f"mlflow-artifacts:/1/{RUN_ID}/artifacts"}
        return httpx.Response(200, json={"run": {"info": info}})
    return httpx.Response(200, json={})


def main() -> None:
    global down
    journal_dir, points = sys.argv[1], int(sys.argv[2])
    sink = MlflowRestSink("http://mlflow.test:5000", transport=httpx.MockTransport(handler), journal_dir=journal_dir)
    run = steplog.start_run("outage", sinks=[sink], flush_interval=0.05)
    down = True
    for step in range(points):
        run.log_metric("loss", step / 10, step=step)
    print(f"ready {run.run_id}", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
