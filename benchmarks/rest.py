"""Streaming to an MLflow tracking server: points per second against the same local server, side by side.

Contenders, each logging one metric key, one point per step, into a fresh run:

* raw httpx: pre-built 1000-metric ``runs/log-batch`` bodies posted one after another
  (the server's own ceiling: nothing a client library could do faster, one request at a time);
* steplog: ``run.log_metric`` in a loop, clock stopped when ``close()`` returns (everything
  acknowledged by the server);
* steplog backlog drain: the same points logged while the server is unreachable (a
  transport that refuses connections), in many small writer cycles; the clock runs from
  the moment the server is reachable again until ``close()`` returns (the whole backlog
  acknowledged). Target: N points in at most 1.2 x N / the raw rate;
* MLflow's client, sync: ``MlflowClient.log_metric`` (one request per point);
* MLflow's client, ``synchronous=False``: the same calls queued, then waited for.

The MLflow client contenders get fewer points (they send one request per point). A
round runs every contender once, in rotating order; the figures are medians over rounds.
The script starts its own ``mlflow server`` (sqlite backend, one worker) on 127.0.0.1,
unless ``--url`` names one.

    python benchmarks/rest.py [--quick | --smoke] [--url http://127.0.0.1:5000] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

NAME = "rest"
TITLE = "Streaming to an MLflow server (sqlite, 1 worker): points per second"
BASE_TS = 1_700_000_000_000


class Server:
    """A local ``mlflow server`` in its own process group (stopped with it)."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination", str(root / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )  # fmt: skip
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("mlflow server did not start within 120 s")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def _new_run(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name("bench-rest")
    exp_id = exp.experiment_id if exp else client.create_experiment("bench-rest")
    return str(client.create_run(exp_id, run_name=name).info.run_id)


def raw_httpx(url: str, client: Any, n: int) -> float:
    """Seconds to post ``n`` points as 1000-metric log-batch requests with a plain httpx client."""
    import httpx
    import orjson

    run_id = _new_run(client, "raw")
    bodies = []
    for start in range(0, n, 1000):
        metrics = [
            {"key": "loss", "value": 1.0 / (i + 1), "timestamp": BASE_TS + i, "step": i}
            for i in range(start, min(n, start + 1000))
        ]
        bodies.append(orjson.dumps({"run_id": run_id, "metrics": metrics}))
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=url, timeout=120) as http:
        t0 = time.perf_counter()
        for body in bodies:
            http.post("/api/2.0/mlflow/runs/log-batch", content=body, headers=headers).raise_for_status()
        return time.perf_counter() - t0


def _log_and_close(run: Any, n: int) -> tuple[float, float]:
    """Seconds of ``n`` log_metric calls, and seconds from the first call until close() returns."""
    log_metric = run.log_metric
    t0 = time.perf_counter()
    for i in range(n):
        log_metric("loss", 1.0 / (i + 1), i)
    t1 = time.perf_counter()
    run.close()
    return t1 - t0, time.perf_counter() - t0


def steplog_run(url: str, client: Any, n: int, hot: list[float]) -> float:
    """Seconds from the first log call until close() returns (everything acknowledged)."""
    import steplog

    run = steplog.start_run("bench-rest", run_name="steplog", tracking_uri=url, handle_signals=False)
    calls, total = _log_and_close(run, n)
    hot.append(calls / n * 1e9)
    return total


class _Switch:
    """An httpx transport in front of the real one that refuses connections while ``down`` (an outage)."""

    def __init__(self) -> None:
        import httpx

        self.down = False
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: Any) -> Any:
        import httpx

        if self.down:
            raise httpx.ConnectError("unreachable (benchmark outage)", request=request)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def steplog_drain(url: str, client: Any, n: int, requests: list[int], journal_dir: Path) -> float:
    """Seconds from the end of an outage until close() returns, with ``n`` points logged during it."""
    import steplog
    from steplog.sinks.mlflow_rest import MlflowRestSink, RetryPolicy

    switch = _Switch()
    # a short backoff: the clock measures the drain, not the wait for the next probe
    sink = MlflowRestSink(
        url,
        transport=switch,  # type: ignore[arg-type]
        retry=RetryPolicy(base=0.01, cap=0.05),
        journal_dir=journal_dir,
    )
    run = steplog.start_run("bench-rest", run_name="drain", sinks=[sink], handle_signals=False)
    switch.down = True
    for start in range(0, n, 50):  # many small writer cycles, as a training loop makes them
        for i in range(start, min(n, start + 50)):
            run.log_metric("loss", 1.0 / (i + 1), i)
        run.flush()
    backlog = sink.outage_state().backlog_points
    if backlog != n:
        raise RuntimeError(f"the backlog holds {backlog} points, not {n}: the outage did not hold them all")
    before = sink.requests
    switch.down = False
    t0 = time.perf_counter()
    run.close()
    elapsed = time.perf_counter() - t0
    requests.append(sink.requests - before)
    return elapsed


def steplog_local_hot(root: Path, n: int) -> float:
    """ns per log_metric call with the local store (the hot path the REST sink must not change)."""
    import steplog

    run = steplog.start_run("bench-rest", tracking_uri=str(root / "mlruns"), handle_signals=False)
    calls, _total = _log_and_close(run, n)
    return calls / n * 1e9


def mlflow_sync(url: str, client: Any, n: int) -> float:
    run_id = _new_run(client, "mlflow-sync")
    t0 = time.perf_counter()
    for i in range(n):
        client.log_metric(run_id, "loss", 1.0 / (i + 1), timestamp=BASE_TS + i, step=i)
    return time.perf_counter() - t0


def mlflow_async(url: str, client: Any, n: int) -> float:
    run_id = _new_run(client, "mlflow-async")
    t0 = time.perf_counter()
    ops = [
        client.log_metric(run_id, "loss", 1.0 / (i + 1), timestamp=BASE_TS + i, step=i, synchronous=False)
        for i in range(n)
    ]
    for op in ops:
        op.wait()
    return time.perf_counter() - t0


def run(
    mode: str = "full", out: Path | None = None, chart: bool = True, url: str | None = None, rounds: int | None = None
) -> dict[str, Any]:
    """Measure, print the table, write JSON (and PNG); return the result."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    rounds = rounds or c.pick(mode, 1, 3, 7)
    n_big = c.pick(mode, 2000, 20_000, 30_000)
    n_small = c.pick(mode, 50, 200, 300)
    out = c.default_out(mode) if out is None else out
    with tempfile.TemporaryDirectory(prefix="steplog-bench-rest-") as tmp:
        root = Path(tmp)
        server = None if url else Server(root)
        target_url = url or server.url  # type: ignore[union-attr]
        try:
            client = MlflowClient(tracking_uri=target_url)
            hot: list[float] = []
            drain_requests: list[int] = []
            contenders: dict[str, tuple[Callable[[], float], int]] = {
                "raw httpx (1000-metric log-batch)": (lambda: raw_httpx(target_url, client, n_big), n_big),
                "steplog": (lambda: steplog_run(target_url, client, n_big, hot), n_big),
                "steplog backlog drain (after an outage)": (
                    lambda: steplog_drain(target_url, client, n_big, drain_requests, root / "journal"),
                    n_big,
                ),
                "mlflow client (sync)": (lambda: mlflow_sync(target_url, client, n_small), n_small),
                "mlflow client (synchronous=False)": (lambda: mlflow_async(target_url, client, n_small), n_small),
            }
            rates: dict[str, list[float]] = {name: [] for name in contenders}
            for r in range(rounds):
                for name in c.rotate(list(contenders), r):
                    fn, n = contenders[name]
                    rates[name].append(n / fn())
            local_hot = [steplog_local_hot(root, n_big) for _ in range(rounds)]
        finally:
            if server is not None:
                server.stop()
    medians = {name: c.summary(v)["median"] for name, v in rates.items()}
    raw = medians["raw httpx (1000-metric log-batch)"]
    rows = [
        (name, c.fmt(medians[name]), f"{c.fmt(min(v))}-{c.fmt(max(v))}", f"{medians[name] / raw:.2f}")
        for name, v in rates.items()
    ]
    print(TITLE)
    print(f"({n_big} points for raw httpx and steplog, {n_small} for MLflow's client; {rounds} rounds; medians)")
    print(c.table(["contender", "points/s", "min-max", "vs raw"], rows))
    hot_rest = c.summary(hot)["median"]
    hot_local = c.summary(local_hot)["median"]
    print(
        f"\nsteplog hot path: {hot_rest:.0f} ns/call streaming to the server, {hot_local:.0f} ns/call to a local store"
    )
    # the server's speed drifts (other load, a growing database): compare within each round
    paired = [s / r for s, r in zip(rates["steplog"], rates["raw httpx (1000-metric log-batch)"], strict=True)]
    ratio = c.summary(paired)["median"]
    print(f"steplog / raw httpx, per round: {', '.join(f'{x:.2f}' for x in paired)}; median {ratio:.2f}")
    drained = [
        d / r
        for d, r in zip(
            rates["steplog backlog drain (after an outage)"], rates["raw httpx (1000-metric log-batch)"], strict=True
        )
    ]
    drain = c.summary(drained)["median"]
    print(
        f"backlog drain / raw httpx, per round: {', '.join(f'{x:.2f}' for x in drained)}; median {drain:.2f} "
        f"(log-batch requests per drain: {drain_requests}; {n_big} points)"
    )
    targets = [
        c.target(
            "steplog vs raw ceiling (median of per-round ratios)", ratio, ">= 0.90", ratio >= 0.90, f"{ratio:.2f}"
        ),
        c.target(
            "backlog drain: N points in <= 1.2 x N / raw rate (drain/raw rate)",
            drain,
            ">= 0.83",
            drain >= 1 / 1.2,
            f"{drain:.2f}",
        ),
    ]
    c.print_targets(targets)
    result = {
        "mode": mode,
        "points": {"big": n_big, "small": n_small},
        "rounds": rounds,
        "rates": rates,
        "medians": medians,
        "steplog_vs_raw_per_round": paired,
        "drain_vs_raw_per_round": drained,
        "drain_requests": drain_requests,
        "hot_path_ns": {"rest": hot_rest, "local": hot_local},
        "targets": targets,
        "versions": c.versions("mlflow", "httpx", "steplog"),
    }
    draw = (
        (lambda ax: c.bar_chart(ax, list(medians), list(medians.values()), title=TITLE, xlabel="points/s"))
        if chart
        else None
    )
    c.write_results(NAME, result, out, chart=draw)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="fewer rounds and points")
    group.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs")
    parser.add_argument("--url", help="use this running server instead of starting one")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: 1 smoke, 3 quick, 7 full)")
    parser.add_argument("--out", type=Path, default=None, help="where to write JSON and PNG")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    run(mode, args.out or c.default_out(mode), not args.no_chart, args.url, args.rounds)


if __name__ == "__main__":
    main()
