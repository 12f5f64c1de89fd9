"""Workload 3, throughput: points per second end to end (log everything, close, all written).

Each round opens a fresh run per contender, logs 20 keys per step as fast as the loop
goes, and closes it; the clock stops when ``close()`` returns, so whatever a logger
deferred is paid for. steplog runs twice: one ``log_metric`` call per key and one
``log_metrics`` dict per step. "points per CPU-s" divides by the process's CPU time (all
its threads) instead of wall time: about what the figure would be with the machine to
itself, since a busy neighbour does not inflate it. "writer CPU ns/point" is the CPU time of
every thread but the calling one (steplog's writer thread and the worker threads its sinks
write from) over the points written, from the first call until ``close()`` returned: an
upper bound of the time the writer holds the interpreter lock per point (it includes the
system time of its writes, during which the lock is released). The ratio to the buffered
sync writer (a file per key kept open, one ``write`` per point) comes from the same rounds.

    python benchmarks/throughput.py [--quick | --smoke] [--out DIR]
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import contenders as cs
from _common import KEYS

NAME = "throughput"
TITLE = "Throughput: points per second, end to end (log + close)"


def _one_round(x: cs.Contender, root: Path, steps: int, use_dict: bool) -> tuple[float, float, float, Any]:
    """Wall seconds, process CPU seconds (all threads) and CPU seconds of the other threads,
    from the first call until close returned."""
    values = [0.25 + i / 9 for i in range(len(KEYS))]
    metrics = dict(zip(KEYS, values, strict=True))
    logger = x.open(root)
    m0 = time.thread_time()
    c0 = time.process_time()
    t0 = time.perf_counter()
    if use_dict:
        log_metrics = logger.log_metrics
        for step in range(steps):
            log_metrics(metrics, step)
    else:
        log_metric = logger.log_metric
        for step in range(steps):
            for key, value in zip(KEYS, values):  # noqa: B905
                log_metric(key, value, step)
    logger.close()
    elapsed = time.perf_counter() - t0
    cpu, mine = time.process_time() - c0, time.thread_time() - m0
    return elapsed, cpu, cpu - mine, logger


def _open_sqlite(root: Path) -> Any:
    """steplog writing MLflow's SQLite database (``sqlite:///.../mlflow.db``) instead of mlruns files."""
    import steplog

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return steplog.start_run("bench", run_name="bench", tracking_uri=uri, handle_signals=False)


SQLITE = cs.Contender("steplog sqlite", "steplog Run.log_metric into MLflow's SQLite database", _open_sqlite, cost=0.3)


def run(mode: str = "full", out: Path | None = None, chart: bool = True) -> dict[str, Any]:
    """Measure, print the table, write JSON (and PNG); return the result."""
    rounds = c.pick(mode, 1, 2, 5)
    budget = c.pick(mode, 0.002, 0.15, 0.6)
    usable, notes = cs.available(cs.ALL)
    entries: list[tuple[str, cs.Contender, bool]] = []
    for x in usable:
        entries.append((x.name, x, False))
        if x is cs.STEPLOG:
            entries.append(("steplog (log_metrics dict)", x, True))
            entries.append((SQLITE.name, SQLITE, False))
    samples: dict[str, list[float]] = {name: [] for name, _x, _d in entries}
    per_cpu: dict[str, list[float]] = {name: [] for name, _x, _d in entries}
    others_ns: dict[str, list[float]] = {name: [] for name, _x, _d in entries}
    points: dict[str, int] = {}
    checks: dict[str, bool] = {}
    sqlite_checks: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="steplog-bench-") as tmp:
        for r in range(rounds):
            for i, (name, x, use_dict) in enumerate(c.rotate(entries, r)):
                steps = max(1, c.scaled(x.cost * 20, budget, lo=1, hi=100_000))
                if x in (cs.STEPLOG, cs.BUFFERED, SQLITE):  # the same points: the ratio compares like with like
                    steps = c.pick(mode, 50, 10_000, 50_000)
                elapsed, cpu, others, logger = _one_round(x, Path(tmp) / f"r{r}-{i}", steps, use_dict)
                samples[name].append(steps * len(KEYS) / elapsed)
                others_ns[name].append(others / (steps * len(KEYS)) * 1e9)
                per_cpu[name].append(steps * len(KEYS) / cpu if cpu > 0 else float("nan"))
                points[name] = steps * len(KEYS)
                if x in (cs.STEPLOG, SQLITE):
                    stats = logger.stats()  # type: ignore[attr-defined]
                    into = checks if x is cs.STEPLOG else sqlite_checks  # sqlite's kept apart: the row is optional
                    into[name] = into.get(name, True) and stats.written == steps * len(KEYS) == stats.logged
    rows = [
        {
            "name": name,
            "points_per_s": c.summary(samples[name]),
            "points_per_cpu_s": c.summary(per_cpu[name]),
            "other_threads_cpu_ns_per_point": c.summary(others_ns[name]),
            "points_per_round": points[name],
        }
        for name, _x, _d in entries
    ]
    by = {row["name"]: row for row in rows}
    base = by["steplog"]["points_per_s"]["median"] if "steplog" in by else float("nan")
    for row in rows:
        row["x_slower_than_steplog"] = base / row["points_per_s"]["median"]
    targets = []
    if "steplog" in by:
        buffered = by.get("buffered sync", {}).get("points_per_s", {}).get("median", float("nan"))
        for name, api in (("steplog", "log_metric per key"), ("steplog (log_metrics dict)", "a dict per step")):
            got = by[name]["points_per_s"]["median"]
            targets.append(
                c.target(
                    f"end-to-end throughput ({api}), incl. close",
                    got,
                    "≥ 4 M points/s",
                    got >= 4e6,
                    f"{got / 1e6:.2f} M points/s",
                )
            )
            x = got / buffered
            targets.append(
                c.target(
                    f"end to end vs buffered sync writer ({api}), same rounds",
                    x,
                    "≥ 3x",
                    x >= 3,
                    f"{x:.2f}x ({buffered / 1e6:.2f} M points/s buffered)",
                )
            )
        per = by["steplog"]["points_per_cpu_s"]["median"]
        targets.append(
            c.target(
                "end-to-end, points per CPU-second (log_metric per key)",
                per,
                "≥ 4 M points/s",
                per >= 4e6,
                f"{per / 1e6:.2f} M points/CPU-s",
            )
        )
        w = by["steplog"]["other_threads_cpu_ns_per_point"]["median"]
        targets.append(
            c.target("writer CPU per point (threads but the caller's)", w, "≤ 50 ns", w <= 50, f"{w:.0f} ns")
        )
    if SQLITE.name in by:
        lite = by[SQLITE.name]["points_per_s"]["median"]
        targets.append(
            c.target(
                "end-to-end throughput into MLflow's SQLite database",
                lite,
                "≥ 1 M points/s",
                lite >= 1e6,
                f"{lite / 1e6:.2f} M points/s",
            )
        )
    fields = {"rounds": rounds, "rows": rows, "all_written": checks, "sqlite_all_written": sqlite_checks}
    result = c.result_of(TITLE, mode, fields, targets=targets, notes=notes)
    return c.report(NAME, result, out, _print, _chart(rows) if chart else None)


def _chart(rows: list[dict[str, Any]]) -> Callable[[Any], None]:
    names, values = [r["name"] for r in rows], [r["points_per_s"]["median"] for r in rows]
    return c.bar_chart_drawer(names, values, TITLE + " (log scale; higher is better)", "points per second (median)")


def _print(result: dict[str, Any]) -> None:
    print(f"\n## {result['title']} ({result['mode']}, {result['rounds']} rounds, median (min-max))\n")
    rows = []
    for r in result["rows"]:
        s = r["points_per_s"]
        rows.append(
            [
                r["name"],
                c.fmt(s["median"]),
                f"{c.fmt(s['min'])}-{c.fmt(s['max'])}",
                c.fmt(r["x_slower_than_steplog"], "x"),
                c.fmt(r["points_per_cpu_s"]["median"]),
                c.fmt(r["other_threads_cpu_ns_per_point"]["median"]),
                f"{r['points_per_round']:,}",
            ]
        )
    print(
        c.table(
            [
                "contender",
                "points/s",
                "min-max",
                "steplog is x",
                "points per CPU-s",
                "CPU ns/point, other threads",
                "points per round",
            ],
            rows,
        )
    )
    for name, ok in {**result["all_written"], **result.get("sqlite_all_written", {})}.items():
        print(f"check: {name}: every point written = {ok}")
    c.print_footer(result)


def main(argv: Sequence[str] | None = None) -> int:
    return c.script_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
