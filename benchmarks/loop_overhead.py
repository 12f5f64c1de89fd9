"""Workload 2, training-loop overhead: how much slower a loop gets when it logs 20 metrics a step.

Two kinds of step, each about 200 µs: pure-Python work that holds the interpreter lock
(float additions), and work that releases it (SHA-256 of a buffer, as a GPU wait or a
C extension would). Each round times, side by side, the same loop without logging and
with each contender logging 20 metrics a step; a contender's clock runs from the first
step until its ``close()`` returns, so deferred work is counted. Overhead is
``time / time without logging - 1`` against the no-logging loop of the same round.
steplog also runs a 2 ms pure-Python step (20 ``log_metric`` calls per step), the
second loop-overhead target, against its own no-logging loop in the same rounds.

    python benchmarks/loop_overhead.py [--quick | --smoke] [--out DIR]
"""

from __future__ import annotations

import hashlib
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

NAME = "loop_overhead"
TITLE = "Training-loop overhead: 20 metrics per ~200 µs step, including close"
STEP_S = 200e-6
LONG_STEP_S = 2e-3
LONG = "python step, 2 ms (holds the GIL)"


def _calibrate_hash(seconds: float) -> bytes:
    size = 1 << 16
    data = b"x" * size
    t0 = time.perf_counter()
    for _ in range(20):
        hashlib.sha256(data).digest()
    per_byte = (time.perf_counter() - t0) / 20 / size
    return b"x" * max(4096, int(seconds / per_byte))


def _loop(work: Callable[[], object], steps: int, logger: Any, use_dict: bool) -> tuple[float, float]:
    """Wall and process CPU seconds for ``steps`` steps of ``work`` (plus logging and close)."""
    values = [0.5 + i / 11 for i in range(len(KEYS))]
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if logger is None:
        for _step in range(steps):
            work()
    elif use_dict:
        log_metrics = logger.log_metrics
        for step in range(steps):
            work()
            log_metrics(dict(zip(KEYS, values)), step)  # noqa: B905 - a fresh dict per step, as in training
    else:
        log_metric = logger.log_metric
        for step in range(steps):
            work()
            for key, value in zip(KEYS, values):  # noqa: B905
                log_metric(key, value, step)
    if logger is not None:
        logger.close()
    return time.perf_counter() - t0, time.process_time() - cpu0


def run(mode: str = "full", out: Path | None = None, chart: bool = True) -> dict[str, Any]:
    """Measure, print the table, write JSON (and PNG); return the result."""
    rounds = c.pick(mode, 1, 2, 5)
    steps = c.pick(mode, 5, 200, 1500)
    budget = c.pick(mode, 0.01, 0.15, 0.6)
    n_busy = c.calibrate_busy(STEP_S)
    blob = _calibrate_hash(STEP_S)
    works: dict[str, Callable[[], object]] = {
        "python step (holds the GIL)": lambda: c.busy(n_busy),
        "released step (sha256, no GIL)": lambda: hashlib.sha256(blob).digest(),
    }
    usable, notes = cs.available(cs.ALL)
    entries: list[tuple[str, cs.Contender, bool]] = []
    for x in usable:
        entries.append((x.name if x is not cs.STEPLOG else "steplog (log_metric x20)", x, False))
        if x is cs.STEPLOG:
            entries.append(("steplog (log_metrics dict)", x, True))
    overhead: dict[str, dict[str, list[float]]] = {w: {name: [] for name, _x, _d in entries} for w in works}
    cpu_overhead: dict[str, dict[str, list[float]]] = {w: {name: [] for name, _x, _d in entries} for w in works}
    baseline: dict[str, list[float]] = {w: [] for w in works}
    step_counts: dict[str, int] = {}
    n_long = c.calibrate_busy(LONG_STEP_S)
    long_steps = c.pick(mode, 3, 100, 500)
    long_overhead: list[float] = []
    long_cpu: list[float] = []
    with tempfile.TemporaryDirectory(prefix="steplog-bench-") as tmp:
        for r in range(rounds):
            # steplog only (the peers' figures at 200 µs already say enough): 20 x log_metric per 2 ms step
            base, base_cpu = _loop(lambda: c.busy(n_long), long_steps, None, False)
            logger = cs.STEPLOG.open(Path(tmp) / f"r{r}-long")
            elapsed, cpu = _loop(lambda: c.busy(n_long), long_steps, logger, False)
            long_overhead.append(elapsed / base - 1)
            long_cpu.append(cpu / base_cpu - 1)
            for wname, work in works.items():
                for i, (name, x, use_dict) in enumerate(c.rotate(entries, r)):
                    n = min(steps, c.scaled(x.cost * 20 + STEP_S * 1e6, budget, lo=2, hi=steps))
                    step_counts[name] = n
                    # the same loop without logging right before, so both meet the same neighbours
                    base, base_cpu = _loop(work, n, None, False)
                    logger = x.open(Path(tmp) / f"r{r}-{wname[:6]}-{i}")
                    elapsed, cpu = _loop(work, n, logger, use_dict)
                    overhead[wname][name].append(elapsed / base - 1)
                    cpu_overhead[wname][name].append(cpu / base_cpu - 1)
                    baseline[wname].append(base / n * 1e6)
    rows = []
    for name, _x, _d in entries:
        row: dict[str, Any] = {"name": name, "steps_per_round": step_counts[name]}
        for wname in works:
            row[wname] = c.summary([100 * o for o in overhead[wname][name]])
            row[wname + " (CPU)"] = c.summary([100 * o for o in cpu_overhead[wname][name]])
        rows.append(row)
    targets = []
    key = "steplog (log_metric x20)"
    if any(r["name"] == key for r in rows):
        got = next(r for r in rows if r["name"] == key)["python step (holds the GIL)"]["median"]
        cpu_got = next(r for r in rows if r["name"] == key)["python step (holds the GIL) (CPU)"]["median"]
        targets.append(
            c.target(
                "loop overhead, 20 x log_metric per 200 µs Python step, incl. close",
                got,
                "≤ 2 %",
                got <= 2,
                f"{got:.1f} % (CPU {cpu_got:.1f} %)",
            )
        )
        long = c.summary([100 * o for o in long_overhead])["median"]
        long_c = c.summary([100 * o for o in long_cpu])["median"]
        targets.append(
            c.target(
                "loop overhead, 20 x log_metric per 2 ms Python step, incl. close",
                long,
                "≤ 1 %",
                long <= 1,
                f"{long:.2f} % (CPU {long_c:.2f} %)",
            )
        )
        got_d = next(r for r in rows if r["name"] == "steplog (log_metrics dict)")["python step (holds the GIL)"][
            "median"
        ]
        targets.append(
            c.target(
                "loop overhead, one log_metrics dict per 200 µs Python step, incl. close",
                got_d,
                "≤ 2 %",
                got_d <= 2,
                f"{got_d:.1f} %",
            )
        )
    notes = [
        *notes,
        "slow contenders run fewer steps per round (see steps_per_round); overhead is per step either way",
        "CPU overhead: process CPU time (all threads) against the loop without logging; it does not "
        "move with the neighbours' load the way wall time does, and counts work done on another core",
    ]
    step_us = {w: c.summary(v) for w, v in baseline.items()}
    long_fig = {
        "steps": long_steps,
        "overhead_pct": c.summary([100 * o for o in long_overhead]),
        "cpu_overhead_pct": c.summary([100 * o for o in long_cpu]),
    }
    fields = {
        "rounds": rounds,
        "steps": steps,
        "step_us": step_us,
        "works": list(works),
        "rows": rows,
        "long_step": long_fig,
    }
    result = c.result_of(TITLE, mode, fields, targets=targets, notes=notes)
    return c.report(NAME, result, out, _print, _chart(rows, list(works)) if chart else None)


def _chart(rows: list[dict[str, Any]], works: list[str]) -> Callable[[Any], None]:
    names, values = [r["name"] for r in rows], [r[works[0]]["median"] for r in rows]
    return c.bar_chart_drawer(
        names,
        values,
        "Loop overhead, 20 metrics per 200 µs Python step (log scale; lower is better)",
        "overhead % (median), including close",
    )


def _print(result: dict[str, Any]) -> None:
    works = result["works"]
    base = ", ".join(f"{w}: {c.fmt(result['step_us'][w]['median'])} µs" for w in works)
    print(f"\n## {result['title']} ({result['mode']}, {result['rounds']} rounds, median (min-max))\n")
    print(f"step without logging: {base}\n")
    long = result.get("long_step")
    if long:
        print(
            f"steplog, 20 x log_metric per {LONG_STEP_S * 1e3:.0f} ms Python step ({long['steps']} steps): "
            f"{c.fmt(long['overhead_pct']['median'], ' %')} wall, {c.fmt(long['cpu_overhead_pct']['median'], ' %')} "
            "CPU overhead\n"
        )

    def cells(r: dict[str, Any], w: str) -> list[str]:
        s = r[w]
        return [
            c.fmt(s["median"], " %"),
            f"{c.fmt(s['min'])}-{c.fmt(s['max'])}",
            c.fmt(r[w + " (CPU)"]["median"], " %"),
        ]

    c.print_grouped(
        result,
        works,
        lambda w: [f"{w}: wall overhead", "min-max", "CPU overhead"],
        cells,
        ("steps/round", lambda r: f"{r['steps_per_round']:,}"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    return c.script_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
