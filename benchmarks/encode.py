"""Micro benchmark: ns per point to encode one key's batch as metric-file lines.

Compares, on the same batches and interleaved round by round, the per-point encoder the
mlruns sink uses now (``sinks/mlruns.py``'s ``_lines`` on interleaved items) with the
column encoder of ``steplog._encode`` (lists, and ``array('q')``/``array('d')`` columns).
Batches of 2,048 points (the sink's chunk), with the timestamps a training loop produces:
one stamp for the whole batch (a fast loop: the buffer stamps once per step and per ms),
one per 256 points, one per 20 points, one per point. Figures are the median (min-max)
over rounds of the thread's CPU ns per point (the writer holds the interpreter lock for
exactly that long), with wall ns beside it.

    python benchmarks/encode.py [--quick | --smoke] [--out DIR]
"""

from __future__ import annotations

import random
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
from steplog._encode import encode_columns
from steplog.sinks.mlruns import _lines

NAME = "encode"
TITLE = "Encoding one key's batch of 2,048 points as metric lines: ns per point"
N = 2048
SHAPES = {"1 stamp per batch": N, "1 stamp per 256 points": 256, "1 stamp per 20 points": 20, "1 stamp per point": 1}


def _batch(per_stamp: int) -> tuple[list[int], list[float], list[int]]:
    rng = random.Random(per_stamp)
    ts0 = 1_764_000_000_000
    stamps = [ts0 + i // per_stamp for i in range(N)]
    values = [rng.random() * 10 ** rng.randint(-6, 6) for _ in range(N)]
    steps = list(range(1_000_000, 1_000_000 + N))
    return stamps, values, steps


def _time(f: Callable[[], object], reps: int) -> tuple[float, float]:
    """Wall and thread-CPU ns per point of ``reps`` calls of ``f``."""
    c0 = time.thread_time_ns()
    t0 = time.perf_counter_ns()
    for _ in range(reps):
        f()
    return (time.perf_counter_ns() - t0) / reps / N, (time.thread_time_ns() - c0) / reps / N


def _current(t: list[int], v: list[float], s: list[int]) -> Callable[[], object]:
    items = [x for row in zip(t, v, s, strict=True) for x in row]
    return lambda: _lines(items)


def _arrays(t: list[int], v: list[float], s: list[int]) -> Callable[[], object]:
    a, b, d = array("q", t), array("d", v), array("q", s)
    return lambda: encode_columns(a, b, d)


def run(mode: str = "full", out: Path | None = None, chart: bool = True) -> dict[str, Any]:
    """Measure, print the table, write JSON (and PNG); return the result."""
    rounds = c.pick(mode, 1, 5, 15)
    reps = c.pick(mode, 2, 20, 50)
    encoders: dict[str, Callable[[list[int], list[float], list[int]], Callable[[], object]]] = {
        "current (per point, mlruns _lines)": _current,
        "columns (_encode, lists)": lambda t, v, s: lambda: encode_columns(t, v, s),
        "columns (_encode, arrays)": _arrays,
    }
    wall: dict[str, dict[str, list[float]]] = {sh: {e: [] for e in encoders} for sh in SHAPES}
    cpu: dict[str, dict[str, list[float]]] = {sh: {e: [] for e in encoders} for sh in SHAPES}
    for shape, per in SHAPES.items():
        t, v, s = _batch(per)
        expected = _lines([x for row in zip(t, v, s, strict=True) for x in row])[0]
        calls = {name: make(t, v, s) for name, make in encoders.items()}
        for name, call in calls.items():
            got = call()
            if (got[0] if isinstance(got, tuple) else got) != expected:
                raise AssertionError(f"{name} encodes {shape} differently from the current encoder")
        for r in range(rounds):
            for name in c.rotate(list(calls), r):
                w, u = _time(calls[name], reps)
                wall[shape][name].append(w)
                cpu[shape][name].append(u)
    rows = [
        {"name": e, **{sh: {"cpu_ns": c.summary(cpu[sh][e]), "wall_ns": c.summary(wall[sh][e])} for sh in SHAPES}}
        for e in encoders
    ]
    base = rows[0]
    targets = []
    for sh in SHAPES:
        new = rows[1][sh]["cpu_ns"]["median"]
        x = base[sh]["cpu_ns"]["median"] / new
        targets.append(
            c.target(f"column encoder speed-up, {sh}", x, "≥ 1x (never slower)", x >= 0.9, f"{x:.2f}x ({new:.0f} ns)")
        )
    fields = {"rounds": rounds, "points_per_batch": N, "shapes": list(SHAPES), "rows": rows}
    result = c.result_of(TITLE, mode, fields, targets=targets, notes=[], packages=("steplog", "orjson"))
    return c.report(NAME, result, out, _print, _chart(rows) if chart else None)


def _chart(rows: list[dict[str, Any]]) -> Callable[[Any], None]:
    return c.grouped_bar_chart_drawer(
        [r["name"] for r in rows],
        list(SHAPES),
        lambda sh: [r[sh]["cpu_ns"]["median"] for r in rows],
        lambda sh: sh,
        width=0.8 / len(SHAPES),
        target=(50.0, "writer budget: 50 ns per point"),
        title=TITLE,
        xlabel="CPU ns per point (median; lower is better)",
    )


def _print(result: dict[str, Any]) -> None:
    print(f"\n## {result['title']} ({result['mode']}, {result['rounds']} rounds, median (min-max))\n")
    c.print_grouped(
        result,
        result["shapes"],
        lambda sh: [f"{sh}: CPU ns", "min-max", "wall ns"],
        lambda r, sh: [
            c.fmt(r[sh]["cpu_ns"]["median"]),
            f"{c.fmt(r[sh]['cpu_ns']['min'])}-{c.fmt(r[sh]['cpu_ns']['max'])}",
            c.fmt(r[sh]["wall_ns"]["median"]),
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    return c.script_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
