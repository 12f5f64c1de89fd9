"""Reading a long metric history back: steplog's Store against MLflow's own reader.

    MLFLOW_ALLOW_FILE_STORE=true .venv/bin/python benchmarks/reader.py [--points 1000000] [--repeat 5]

Writes one run with steplog (one metric of ``--points`` points, a realistic float per
step), then times, in this one process and interleaved round by round:

* ``Store(...).metric_history(run_id, key)``, steplog's reader (the history as columns);
* ``MlflowClient(...).get_metric_history(run_id, key)``, MLflow 3.17's file-store reader;
* ``parse_metric_lines`` on the file's bytes, fast path, and the exact line-by-line
  parser it falls back to (the same bytes with one ``-0`` value appended, which only the
  exact parser reads), to show what the fast path is worth;
* ``Store.get_run(run_id).latest[key]``, the latest point by MLflow's rule.

It checks that both readers return the same points, then prints medians and ratios.
MLflow's reader builds one ``Metric`` object per point (about 40 µs each), so a million
points take it most of a minute: it runs once unless ``--mlflow-rounds`` says otherwise.
Timings on a shared machine are noisy: compare the ratios, which are taken side by side.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

import steplog
from steplog._layout import parse_metric_lines


def _write_run(root: Path, points: int) -> str:
    with steplog.start_run("reader-bench", tracking_uri=root) as run:
        for step in range(points):
            run.log_metric("loss", 2.3 * math.exp(-step / points * 3) + 1e-3 * math.sin(step), step=step)
    return run.run_id


def _time(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one call (CPU time suffers less from a shared machine)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=1_000_000, help="points in the history (default 1M)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of steplog's readers (default 5)")
    parser.add_argument("--mlflow-rounds", type=int, default=1, help="rounds of MLflow's reader (default 1)")
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "mlruns"
        t0 = time.perf_counter()
        run_id = _write_run(root, args.points)
        print(f"wrote {args.points:,} points with steplog in {time.perf_counter() - t0:.2f} s")
        metric_file = next(root.glob(f"*/{run_id}/metrics/loss"))
        data = metric_file.read_bytes()
        slow_data = data + b"1700000000000 -0 0\n"  # one value only the exact parser reads: no fast path
        print(f"metric file: {len(data) / 1e6:.1f} MB")

        store = steplog.Store(root)
        client = MlflowClient(tracking_uri=root.as_uri())

        timings: dict[str, list[tuple[float, float]]] = {
            "steplog Store.metric_history": [],
            "MLflow get_metric_history": [],
            "parse_metric_lines (fast path)": [],
            "parse_metric_lines (exact path)": [],
            "steplog latest (MLflow's rule)": [],
        }
        # Same points from both readers (MLflow's Metric objects vs steplog's columns); MLflow's
        # reader takes about 40 µs a point, so it runs --mlflow-rounds times only (default once).
        theirs: list[Any] = []

        def mlflow_read() -> None:
            nonlocal theirs
            theirs = client.get_metric_history(run_id, "loss")

        for _ in range(args.mlflow_rounds):
            timings["MLflow get_metric_history"].append(_time(mlflow_read))
            wall, cpu = timings["MLflow get_metric_history"][-1]
            print(f"MLflow get_metric_history: {wall:.2f} s wall, {cpu:.2f} s CPU")
        ours = store.metric_history(run_id, "loss")
        assert len(ours) == len(theirs) == args.points, (len(ours), len(theirs))
        for i in (0, 1, args.points // 2, args.points - 1):
            m = theirs[i]
            assert (ours[i].step, ours[i].value, ours[i].timestamp) == (m.step, m.value, m.timestamp), i
        assert parse_metric_lines(slow_data)[:3] == tuple(
            [*c, x] for c, x in zip(parse_metric_lines(data)[:3], (0, -0.0, 1700000000000), strict=True)
        )
        del ours, theirs

        for _ in range(args.repeat):
            timings["steplog Store.metric_history"].append(_time(lambda: store.metric_history(run_id, "loss")))
            timings["parse_metric_lines (fast path)"].append(_time(lambda: parse_metric_lines(data)))
            timings["parse_metric_lines (exact path)"].append(_time(lambda: parse_metric_lines(slow_data)))
            timings["steplog latest (MLflow's rule)"].append(_time(lambda: store.get_run(run_id).latest["loss"]))

    wall = {name: statistics.median(t[0] for t in ts) for name, ts in timings.items()}
    cpu = {name: statistics.median(t[1] for t in ts) for name, ts in timings.items()}
    base = "steplog Store.metric_history"
    print(f"\n{'reader':34} {'wall':>9} {'CPU':>9}  {'CPU/point':>10}  {'CPU vs steplog':>14}  rounds")
    for name in timings:
        print(
            f"{name:34} {wall[name]:8.3f}s {cpu[name]:8.3f}s  {cpu[name] / args.points * 1e6:8.3f}µs"
            f"  {cpu[name] / cpu[base]:13.1f}x  {len(timings[name])}"
        )
    mlflow = "MLflow get_metric_history"
    print(
        f"\nMLflow's reader takes {cpu[mlflow] / cpu[base]:.0f}x the CPU time of steplog's "
        f"({wall[mlflow] / wall[base]:.0f}x the wall time) for {args.points:,} points."
    )
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
