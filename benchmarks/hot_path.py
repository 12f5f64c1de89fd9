"""Workload 1, the hot path: nanoseconds per ``log_metric`` call, side by side in one process.

Every contender runs the same loop (20 keys per step, the step advancing after the 20th
key), with one key per call and with a dict of the 20 keys per call, alternating round by
round with a no-op function of the same signature. Figures are the median (min-max) over
rounds of ns per call; p50/p99 come from calls timed one by one (the timer's own cost
subtracted). steplog's writer runs all the while, as it does in training, so the wall
figures include the time its thread holds the interpreter lock; "CPU ns/call" is the
calling thread's own CPU time per call, which other processes on a busy machine do not
inflate. Between samples (untimed) steplog's buffer is flushed, so each sample measures
the call with the writer idle: the "idle writer" table.

The "sustained" table measures the way a training loop lives: one run per shape kept
open, the writer at steady state (a warm-up first, then no flush between samples), keyword
``step=``, a new step every 10 (or 20) calls, 10 and 20 keys per step. Each sample of
steplog's calls is timed right beside a sample of the same loop calling a no-op method of
the same signature (order alternating). The figure is the ratio of the totals (all steplog
samples over all no-op samples): the writer holds the interpreter lock in bursts every
50 ms, so a median of per-sample ratios would hide it; the per-sample ratios' median and
min-max are shown beside it. Wall and CPU of the calling thread. The calling thread's CPU/wall ratio
for the no-op samples says how much of a core it had.

    python benchmarks/hot_path.py [--quick | --smoke] [--out DIR]
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

NAME = "hot_path"
TITLE = "Hot path: ns per log call (20 keys per step)"


def _loop_single(f: Callable[..., Any], values: Sequence[float], step0: int, steps: int) -> tuple[float, float]:
    """Wall seconds, and CPU seconds of this thread, for ``steps`` steps of 20 calls."""
    keys = KEYS
    c0 = time.thread_time()
    t0 = time.perf_counter()
    for step in range(step0, step0 + steps):
        for key, value in zip(keys, values):  # noqa: B905 - same length; strict= costs per step
            f(key, value, step)
    return time.perf_counter() - t0, time.thread_time() - c0


def _loop_dict(f: Callable[..., Any], metrics: dict[str, float], step0: int, steps: int) -> float:
    t0 = time.perf_counter()
    for step in range(step0, step0 + steps):
        f(metrics, step)
    return time.perf_counter() - t0


def _timed_calls(f: Callable[..., Any], values: Sequence[float], step0: int, steps: int) -> list[int]:
    pc = time.perf_counter_ns
    out: list[int] = []
    append = out.append
    for step in range(step0, step0 + steps):
        for key, value in zip(KEYS, values):  # noqa: B905
            t0 = pc()
            f(key, value, step)
            append(pc() - t0)
    return out


def _settle(logger: Any) -> None:
    """Let a logger with a barrier (steplog) write what it holds, outside the timed loops."""
    flush = getattr(logger, "flush", None)
    if flush is not None:
        flush()


def _sustained_loop(
    log_metric: Callable[..., Any], keys: Sequence[str], values: Sequence[float], step0: int, steps: int
) -> tuple[float, float]:
    """Wall and thread-CPU seconds of ``steps`` steps, one keyword-``step=`` call per key."""
    c0 = time.thread_time()
    t0 = time.perf_counter()
    for step in range(step0, step0 + steps):
        for key, value in zip(keys, values):  # noqa: B905
            log_metric(key, value, step=step)
    return time.perf_counter() - t0, time.thread_time() - c0


def sustained(mode: str, root: Path) -> dict[str, Any]:
    """The sustained hot path per shape: ns per call and ratios to a no-op call measured beside it."""
    samples = c.pick(mode, 2, 50, 150)
    sample_s = c.pick(mode, 0.0005, 0.004, 0.004)  # the writer wakes every 50 ms: many samples span a write
    warmup_s = c.pick(mode, 0.001, 0.15, 0.3)
    out: dict[str, Any] = {}
    for nkeys in (10, 20):
        keys = KEYS[:nkeys]
        values = [0.1 + i / 7 for i in range(nkeys)]
        noop = c.Noop()
        run = cs.STEPLOG.open(root / f"sustained-{nkeys}")
        wall: dict[str, list[float]] = {"steplog": [], "no-op": []}
        cpu: dict[str, list[float]] = {"steplog": [], "no-op": []}
        step = 0
        try:
            # warm-up until the writer has written a few times; it also sizes the samples
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < warmup_s or n == 0:
                _sustained_loop(run.log_metric, keys, values, step, 100)
                step, n = step + 100, n + 100
            steps = max(1, int(sample_s / ((time.perf_counter() - t0) / n)))
            for i in range(samples):
                pair = [("steplog", run.log_metric), ("no-op", noop.log_metric)]
                for name, f in pair if i % 2 == 0 else pair[::-1]:
                    w, u = _sustained_loop(f, keys, values, step, steps)
                    step += steps
                    wall[name].append(w / (steps * nkeys) * 1e9)
                    cpu[name].append(u / (steps * nkeys) * 1e9)
        finally:
            t0 = time.perf_counter()
            run.close()
            close_s = time.perf_counter() - t0
        stats = run.stats()  # type: ignore[attr-defined]
        out[f"{nkeys} keys per step"] = {
            "calls": steps * nkeys * samples,
            "ns": c.summary(wall["steplog"]),
            "cpu_ns": c.summary(cpu["steplog"]),
            "noop_ns": c.summary(wall["no-op"]),
            "noop_cpu_ns": c.summary(cpu["no-op"]),
            "ratio": c.summary([a / b for a, b in zip(wall["steplog"], wall["no-op"], strict=True)]),
            "cpu_ratio": c.summary([a / b for a, b in zip(cpu["steplog"], cpu["no-op"], strict=True)]),
            "total_ratio": sum(wall["steplog"]) / sum(wall["no-op"]),
            "total_cpu_ratio": sum(cpu["steplog"]) / sum(cpu["no-op"]),
            "noop_cpu_share": c.summary([u / w for u, w in zip(cpu["no-op"], wall["no-op"], strict=True)]),
            "close_s": close_s,
            "all_written": stats.logged == stats.written > 0,
        }
    return out


def _timer_floor() -> float:
    pc = time.perf_counter_ns
    samples = []
    for _ in range(20_000):
        t0 = pc()
        samples.append(pc() - t0)
    return float(c.percentile(samples, 50))


def run(mode: str = "full", out: Path | None = None, chart: bool = True) -> dict[str, Any]:
    """Measure, print the table, write JSON (and PNG); return the result."""
    rounds = c.pick(mode, 1, 2, 7)
    samples = c.pick(mode, 1, 2, 4)
    budget = c.pick(mode, 0.002, 0.06, 0.25)
    usable, notes = cs.available(cs.ALL)
    noop = cs.Contender("no-op", "a function call that does nothing", lambda root: c.Noop(), cost=0.08)
    order = [noop, *usable]
    values = [0.1 + i / 7 for i in range(len(KEYS))]
    metrics = dict(zip(KEYS, values, strict=True))
    single: dict[str, list[float]] = {x.name: [] for x in order}
    single_cpu: dict[str, list[float]] = {x.name: [] for x in order}
    per_dict: dict[str, list[float]] = {x.name: [] for x in order}
    timed: dict[str, list[int]] = {x.name: [] for x in order}
    floor = _timer_floor()
    steps = {x.name: 1 for x in order}
    close_s: dict[str, list[float]] = {x.name: [] for x in order}
    written: list[bool] = []
    with tempfile.TemporaryDirectory(prefix="steplog-bench-") as tmp:
        for r in range(rounds):
            for x in c.rotate(order, r):
                # a fresh run per round, open only while it is measured: no contender's background
                # threads (writers, senders) run while another one is timed
                lg = x.open(Path(tmp) / f"{x.name.replace(' ', '_')}-{r}")
                try:
                    _loop_single(lg.log_metric, values, 0, 1)  # keys validated/created before timing
                    _settle(lg)
                    # at most 2500 steps (50,000 calls) a sample: the call is measured, not backpressure
                    n = c.scaled(x.cost * 20, budget / samples, lo=1, hi=2_500)
                    for _ in range(samples):
                        elapsed, cpu = _loop_single(lg.log_metric, values, steps[x.name], n)
                        steps[x.name] += n
                        single[x.name].append(elapsed / (n * 20) * 1e9)
                        single_cpu[x.name].append(cpu / (n * 20) * 1e9)
                        _settle(lg)
                        elapsed = _loop_dict(lg.log_metrics, metrics, steps[x.name], n)
                        steps[x.name] += n
                        per_dict[x.name].append(elapsed / n * 1e9)
                        _settle(lg)
                    k = max(1, min(n, 500))
                    timed[x.name] += _timed_calls(lg.log_metric, values, steps[x.name], k)
                    steps[x.name] += k
                finally:
                    t0 = time.perf_counter()
                    lg.close()
                    close_s[x.name].append(time.perf_counter() - t0)
                if x is cs.STEPLOG:
                    stats = lg.stats()  # type: ignore[attr-defined]
                    written.append(stats.logged == stats.written > 0)
    rows = []
    for x in order:
        s, d = c.summary(single[x.name]), c.summary(per_dict[x.name])
        calls = [max(0.0, t - floor) for t in timed[x.name]]
        rows.append(
            {
                "name": x.name,
                "description": x.description,
                "single_ns": s,
                "single_cpu_ns": c.summary(single_cpu[x.name]),
                "single_p50_ns": c.percentile(calls, 50),
                "single_p99_ns": c.percentile(calls, 99),
                "dict20_ns": d,
                "dict20_ns_per_point": {k: v / 20 for k, v in d.items() if k != "n"},
                "close_s": c.summary(close_s[x.name]),
            }
        )
    by = {row["name"]: row for row in rows}
    base = by["steplog"]["single_ns"]["median"] if "steplog" in by else float("nan")
    base_d = by["steplog"]["dict20_ns"]["median"] if "steplog" in by else float("nan")
    for row in rows:
        row["x_steplog_single"] = row["single_ns"]["median"] / base
        row["x_steplog_dict20"] = row["dict20_ns"]["median"] / base_d
    with tempfile.TemporaryDirectory(prefix="steplog-bench-") as tmp:
        held = sustained(mode, Path(tmp))
    targets = _targets(by, held)
    fields = {
        "rounds": rounds,
        "timer_floor_ns": floor,
        "rows": rows,
        "sustained": held,
        "steplog_all_written": all(written) and all(v["all_written"] for v in held.values()),
    }
    result = c.result_of(TITLE, mode, fields, targets=targets, notes=notes)
    return c.report(NAME, result, out, _print, _chart(rows) if chart else None)


def _chart(rows: list[dict[str, Any]]) -> Callable[[Any], None]:
    names, values = [r["name"] for r in rows], [r["single_ns"]["median"] for r in rows]
    return c.bar_chart_drawer(names, values, TITLE + " (log scale; lower is better)", "ns per log_metric call (median)")


def _targets(by: dict[str, Any], held: dict[str, Any]) -> list[dict[str, Any]]:
    if "steplog" not in by:
        return []
    sus = []
    for shape, fig in held.items():
        x, xc = fig["total_ratio"], fig["total_cpu_ratio"]
        sus.append(
            c.target(
                f"sustained hot path vs no-op call, {shape} (writer running, step=, wall)",
                x,
                "≤ 3x",
                x <= 3,
                f"{x:.2f}x (median sample {fig['ratio']['median']:.2f}x; CPU {xc:.2f}x)",
            )
        )
    ns = by["steplog"]["single_ns"]["median"]
    noop = by["no-op"]["single_ns"]["median"]
    cpu = by["steplog"]["single_cpu_ns"]["median"]
    cpu_noop = by["no-op"]["single_cpu_ns"]["median"]
    out = [
        c.target("hot path, one key per call", ns, "≤ 300 ns", ns <= 300, f"{ns:.0f} ns"),
        c.target(
            "hot path vs no-op loop", ns / noop, "≤ 4x", ns / noop <= 4, f"{ns / noop:.2f}x ({noop:.0f} ns no-op)"
        ),
        c.target("hot path, CPU of the calling thread", cpu, "≤ 300 ns", cpu <= 300, f"{cpu:.0f} ns"),
        c.target(
            "hot path vs no-op loop, CPU of the calling thread",
            cpu / cpu_noop,
            "≤ 4x",
            cpu / cpu_noop <= 4,
            f"{cpu / cpu_noop:.2f}x ({cpu_noop:.0f} ns no-op)",
        ),
    ]
    for name, goal in (("naive sync", 25), ("tensorboardX", 200), ("mlflow sync", 1000)):
        if name in by:
            x = by[name]["x_steplog_single"]
            out.append(c.target(f"faster than {name}", x, f"≥ {goal}x", x >= goal, f"{x:,.0f}x"))
    return sus + out


def _print(result: dict[str, Any]) -> None:
    print(f"\n## {result['title']} ({result['mode']}, {result['rounds']} rounds, median (min-max))\n")
    headers = [
        "contender",
        "ns/call, 1 key",
        "min-max",
        "CPU ns/call",
        "p50",
        "p99",
        "x steplog",
        "ns/call, dict of 20",
        "ns/point",
        "x steplog",
    ]
    rows = []
    for r in result["rows"]:
        s, d = r["single_ns"], r["dict20_ns"]
        rows.append(
            [
                r["name"],
                c.fmt(s["median"]),
                f"{c.fmt(s['min'])}-{c.fmt(s['max'])}",
                c.fmt(r["single_cpu_ns"]["median"]),
                c.fmt(r["single_p50_ns"]),
                c.fmt(r["single_p99_ns"]),
                c.fmt(r["x_steplog_single"], "x"),
                c.fmt(d["median"]),
                c.fmt(d["median"] / 20),
                c.fmt(r["x_steplog_dict20"], "x"),
            ]
        )
    print("\nidle writer (flushed between samples, untimed):")
    print(c.table(headers, rows))
    held = result.get("sustained") or {}
    if held:
        print("\nsustained (writer running, no flush between samples, keyword step=, median of interleaved samples):")
        srows = [
            [
                shape,
                f"{v['calls']:,}",
                c.fmt(v["ns"]["median"]),
                c.fmt(v["noop_ns"]["median"]),
                c.fmt(v["total_ratio"], "x"),
                f"{c.fmt(v['ratio']['median'], 'x')} ({c.fmt(v['ratio']['min'])}-{c.fmt(v['ratio']['max'])})",
                c.fmt(v["cpu_ns"]["median"]),
                c.fmt(v["total_cpu_ratio"], "x"),
                f"{v['noop_cpu_share']['median']:.0%}",
                c.fmt(v["close_s"] * 1000),
            ]
            for shape, v in held.items()
        ]
        heads = [
            "shape",
            "calls",
            "ns/call",
            "no-op ns",
            "x no-op (totals)",
            "per sample: median (min-max)",
            "CPU ns/call",
            "CPU x no-op",
            "CPU/wall (no-op)",
            "close ms",
        ]
        print(c.table(heads, srows))
    c.print_footer(result)


def main(argv: Sequence[str] | None = None) -> int:
    return c.script_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
