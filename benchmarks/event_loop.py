"""Workload 5, async: event-loop lag on asyncio and trio while a task logs at full speed.

In one event loop, a task logs 20 metrics a step as fast as it can (yielding to the loop
after each step, as an async training or RL loop does), while a ticker task asks to
sleep 1 ms again and again and records how late it wakes up. steplog runs its writer in
that same loop (``async with steplog.start_run(...)``), with file I/O on worker threads;
the peers are called from the loop as they would be. The no-op row is the loop's own
lag with the same logging task calling a function that does nothing.

    python benchmarks/event_loop.py [--quick | --smoke] [--out DIR]
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

NAME = "event_loop"
TITLE = "Event-loop lag while logging at full speed (20 metrics per step)"
TICK = 0.001


async def _scenario(name: str, root: Path, seconds: float) -> tuple[list[float], int]:
    """Lags (seconds late) of the ticker, and points logged, for one contender in the running loop."""
    import anyio
    import anyio.lowlevel

    import steplog

    values = [0.5 + i / 17 for i in range(len(KEYS))]
    lags: list[float] = []
    points = 0
    done = False

    async def ticker() -> None:
        while not done:
            t0 = time.perf_counter()
            await anyio.sleep(TICK)
            lags.append(max(0.0, time.perf_counter() - t0 - TICK))

    async def logging(log_metric: Callable[[str, float, int], Any]) -> None:
        nonlocal done, points
        end = time.perf_counter() + seconds
        step = 0
        while time.perf_counter() < end:
            for key, value in zip(KEYS, values):  # noqa: B905
                log_metric(key, value, step)
            step += 1
            await anyio.lowlevel.checkpoint()
        points = step * len(KEYS)
        done = True

    if name == "steplog":
        run = steplog.start_run("bench", tracking_uri=root, handle_signals=False)
        async with run, anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            tg.start_soon(logging, run.log_metric)
        return lags, points
    logger: Any = c.Noop() if name == "no-op" else {x.name: x for x in cs.ALL}[name].open(root)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        tg.start_soon(logging, logger.log_metric)
    logger.close()
    return lags, points


def run(mode: str = "full", out: Path | None = None, chart: bool = True) -> dict[str, Any]:
    """Measure, print the table, write JSON (and PNG); return the result."""
    import anyio

    rounds = c.pick(mode, 1, 1, 3)
    seconds = c.pick(mode, 0.05, 0.3, 2.0)
    usable, notes = cs.available((cs.NAIVE, cs.MLFLOW_ASYNC))
    names = ["no-op", "steplog", *(x.name for x in usable)]
    backends = ["asyncio"]
    try:
        import trio  # noqa: F401

        backends.append("trio")
    except ImportError:
        notes.append("trio: skipped, not installed")
    lags: dict[str, dict[str, list[float]]] = {b: {n: [] for n in names} for b in backends}
    rates: dict[str, dict[str, list[float]]] = {b: {n: [] for n in names} for b in backends}
    with tempfile.TemporaryDirectory(prefix="steplog-bench-") as tmp:
        for r in range(rounds):
            for backend in backends:
                for i, name in enumerate(c.rotate(names, r)):
                    root = Path(tmp) / f"r{r}-{backend}-{i}"
                    got, points = anyio.run(_scenario, name, root, seconds, backend=backend)
                    lags[backend][name] += got
                    rates[backend][name].append(points / seconds)
    rows = []
    for name in names:
        row: dict[str, Any] = {"name": name}
        for backend in backends:
            ms = [v * 1000 for v in lags[backend][name]]
            row[backend] = {
                "p50_ms": c.percentile(ms, 50),
                "p99_ms": c.percentile(ms, 99),
                "max_ms": max(ms) if ms else float("nan"),
                "ticks": len(ms),
                "points_per_s": c.summary(rates[backend][name])["median"],
            }
        rows.append(row)
    targets = []
    for row in rows:
        if row["name"] == "steplog":
            for backend in backends:
                p99 = row[backend]["p99_ms"]
                targets.append(
                    c.target(
                        f"event-loop lag p99 while logging, {backend}", p99, "≤ 0.5 ms", p99 <= 0.5, f"{p99:.2f} ms"
                    )
                )
    fields = {"rounds": rounds, "seconds_per_run": seconds, "backends": backends, "rows": rows}
    packages = ("steplog", "anyio", "trio", "mlflow")
    result = c.result_of(TITLE, mode, fields, targets=targets, notes=notes, packages=packages)
    return c.report(NAME, result, out, _print, _chart(rows, backends) if chart else None)


def _chart(rows: list[dict[str, Any]], backends: list[str]) -> Callable[[Any], None]:
    return c.grouped_bar_chart_drawer(
        [r["name"] for r in rows],
        backends,
        lambda b: [max(r[b]["p99_ms"], 1e-3) for r in rows],
        lambda b: f"p99 lag, {b}",
        width=0.8 / len(backends),
        target=(0.5, "target 0.5 ms"),
        title=TITLE,
        xlabel="event-loop lag, ms (p99; log scale)",
        log=True,
    )


def _print(result: dict[str, Any]) -> None:
    print(f"\n## {result['title']} ({result['mode']}, {result['rounds']} rounds, ticks pooled)\n")
    c.print_grouped(
        result,
        result["backends"],
        lambda b: [f"{b}: lag p50 ms", "p99 ms", "max ms", "points/s logged"],
        lambda r, b: [c.fmt(r[b][k]) for k in ("p50_ms", "p99_ms", "max_ms", "points_per_s")],
    )


def main(argv: Sequence[str] | None = None) -> int:
    return c.script_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
