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

NAME = "event_loop"
TITLE = "Event-loop lag while logging at full speed (20 metrics per step)"
KEYS = [f"m{i:02d}" for i in range(20)]
TICK = 0.001


class _Noop:
    def log_metric(self, key: str, value: float, step: int) -> None:
        pass

    def close(self) -> None:
        pass


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
    logger: Any = _Noop() if name == "no-op" else {x.name: x for x in cs.ALL}[name].open(root)
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
                    c.target(f"event-loop lag p99 while logging, {backend}", p99, "≤ 1 ms", p99 <= 1.0, f"{p99:.2f} ms")
                )
    result = {
        "title": TITLE,
        "mode": mode,
        "rounds": rounds,
        "seconds_per_run": seconds,
        "backends": backends,
        "rows": rows,
        "targets": targets,
        "notes": notes,
        "versions": c.versions("steplog", "anyio", "trio", "mlflow"),
    }
    _print(result)
    if out is not None:
        c.write_results(NAME, result, out, chart=_chart(rows, backends) if chart else None)
    return result


def _print(result: dict[str, Any]) -> None:
    print(f"\n## {result['title']} ({result['mode']}, {result['rounds']} rounds, ticks pooled)\n")
    headers = ["contender"]
    for b in result["backends"]:
        headers += [f"{b}: lag p50 ms", "p99 ms", "max ms", "points/s logged"]
    rows = []
    for r in result["rows"]:
        line = [r["name"]]
        for b in result["backends"]:
            s = r[b]
            line += [c.fmt(s["p50_ms"]), c.fmt(s["p99_ms"]), c.fmt(s["max_ms"]), c.fmt(s["points_per_s"])]
        rows.append(line)
    print(c.table(headers, rows))
    for note in result["notes"]:
        print(f"note: {note}")
    c.print_targets(result["targets"])


def _chart(rows: list[dict[str, Any]], backends: list[str]) -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        width = 0.8 / len(backends)
        for k, b in enumerate(backends):
            ys = [i + (k - (len(backends) - 1) / 2) * width for i in range(len(rows))]
            ax.barh(ys, [max(r[b]["p99_ms"], 1e-3) for r in rows], height=width, label=f"p99 lag, {b}")
        ax.set_yticks(range(len(rows)), [r["name"] for r in rows])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="#d62728", linestyle="--", label="target 1 ms")
        ax.set_xlabel("event-loop lag, ms (p99; log scale)")
        ax.set_title(TITLE)
        ax.legend(fontsize=8)

    return draw


def main(argv: Sequence[str] | None = None) -> int:
    args = c.parse_args(__doc__.splitlines()[0], argv)
    try:
        run(args.mode, args.out, chart=not args.no_chart)
    finally:
        cs.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
