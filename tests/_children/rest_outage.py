"""A child for the SIGTERM-during-an-outage tests: streams to a fake server that goes down, then waits for a signal.

Usage: ``rest_outage.py <journal_dir> <points> <refuse|hang|up|end-hangs> [closing <thread|asyncio|trio>]``

The server (an httpx transport in this process) answers the run's start, then either refuses
every connection (``refuse``) or takes each request and never answers (``hang``, what a server
behind a dead network looks like); ``up`` stays up; ``end-hangs`` stays up, except that the run's end
(``runs/update``) hangs once steplog has interrupted the sink. The child logs ``points`` points,
says ``ready <run_id>``, and sleeps until the parent's SIGTERM (and later SIGKILL) ends it. The
first request that starts once steplog has interrupted the sink (the run is closing after the signal) prints
``request after interrupt``: the parent sends SIGKILL then. Request and close deadlines are an
hour, so nothing but the order of the close's steps puts the points in the journal before it.

With ``closing``, the run (on a thread of its own, or in an asyncio or trio loop) is already
closing when the signal comes: the child says ``closing`` once the close waits for the sink,
``hung`` when the sink's first request starts to hang (the parent signals once it has read both),
and ``request after interrupt`` at the first request that starts after the signal.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import anyio
import httpx

import steplog
from steplog import _exit, _writer
from steplog.sinks.mlflow_rest import MlflowRestSink

RUN_ID = "5" * 32


def say(line: str) -> None:
    """One line to the parent in one write: lines from the writer's thread and the main one never interleave
    (``print`` writes the text and its end separately)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


HOUR = 3600.0


class Server(httpx.BaseTransport, httpx.AsyncBaseTransport):
    def __init__(self, mode: str, *, closing: bool = False) -> None:
        self.mode = mode
        self.closing = closing
        self.hung = False
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
        after = _exit.signalled() if self.closing else getattr(self.sink, "_interrupted", False)
        if not self.said and after:
            self.said = True
            say("request after interrupt")
        elif self.closing and self.mode == "hang" and not self.hung:
            self.hung = True
            say("hung")  # a request the close will wait for

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not self.down:
            return self._answer(request)
        self._seen()
        if self.mode == "hang":
            time.sleep(HOUR)
        raise httpx.ConnectError("connection refused", request=request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.mode in ("up", "end-hangs"):  # end-hangs: the run's end hangs once steplog interrupted the sink
            interrupted = getattr(self.sink, "_interrupted", False)
            if self.mode == "end-hangs" and request.url.path.endswith("/runs/update") and interrupted:
                say("request after interrupt")
                await anyio.sleep(HOUR)
            return self._answer(request)
        if not self.down:
            return self._answer(request)
        self._seen()
        if self.mode == "hang":
            await anyio.sleep(HOUR)
        raise httpx.ConnectError("connection refused", request=request)


def main() -> None:
    journal_dir, points, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    server = Server(mode, closing=sys.argv[4:5] == ["closing"])
    sink = MlflowRestSink("http://mlflow.test:5000", transport=server, journal_dir=journal_dir, request_timeout=HOUR)
    server.sink = sink
    if server.closing:
        close_then_wait(sink, server, points, sys.argv[5])
        return
    run = steplog.start_run("outage", sinks=[sink], flush_interval=0.05, close_timeout=HOUR)
    server.down = mode not in ("up", "end-hangs")
    for step in range(points):
        run.log_metric("loss", step / 10, step=step)
    say(f"ready {run.run_id}")
    time.sleep(HOUR)


def close_then_wait(sink: MlflowRestSink, server: Server, points: int, host: str) -> None:
    """Log with the server down, then close: the close waits on the hung request until the signal."""
    stop = _writer.Writer.stop

    async def say_closing(self: _writer.Writer) -> None:
        say("closing")  # the close is under way: it checked for a signal already
        await stop(self)

    _writer.Writer.stop = say_closing  # type: ignore[method-assign]

    def log(run: steplog.Run) -> None:
        server.down = True
        for step in range(points):
            run.log_metric("loss", step / 10, step=step)
        say(f"ready {run.run_id}")

    if host == "thread":
        with steplog.start_run("outage", sinks=[sink], flush_interval=0.05, close_timeout=HOUR) as run:
            log(run)
        return

    async def in_a_loop() -> None:
        async with steplog.start_run("outage", sinks=[sink], flush_interval=0.05, close_timeout=HOUR) as run:
            log(run)

    anyio.run(in_a_loop, backend=host)


if __name__ == "__main__":
    main()
