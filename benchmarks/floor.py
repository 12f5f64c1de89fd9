"""The CPython floor of the writer: ns per point to read the buffer's Python objects at C speed.

The writer budget is 50 ns of CPU per point while holding the interpreter lock. A writer
written in Python cannot go below what the cheapest C-level call needs to read a point out
of the objects the buffer holds, so this script measures that floor on realistic buffer
contents: steplog's own ``Buffer`` filled by a training-loop shaped loop (20 keys, 10,000
points per key: one key's interleaved list ``[ts, value, step, ...]``, the stamp an int
shared by the records of one step and millisecond, a fresh float per point, a fresh int per
step since the steps are above 256), then drained as the writer drains it.

Rows, each the median (min-max) over interleaved rounds (the order rotates each round):

1. touching each object once at C speed, for reference: a slice copy of the list (one
   reference count per item) and ``sum`` of the values (one float read per point);
2. the cheapest ways to get every field of every point out of the Python objects:
   ``array('d', items)``, ``marshal``, ``pickle`` (protocol 5), ``struct.pack`` of all
   items as doubles, ``orjson.dumps`` (which also spells every number as text: the floor of
   any writer that formats metric lines from these objects);
3. the encoders that produce the metric-file bytes: ``_layout.encode_metric_lines`` (what the
   mlruns sink runs, a key at a time) and ``_encode.encode_columns`` (the column encoder; the
   split of the interleaved list into its three columns is counted, the buffer holds no columns);
4. the writer as it runs: ``throughput.py``'s measurement (CPU time of every thread but the
   caller's, from the first call until ``close()`` returned, over the points written);
5. hot-path alternatives that would store compact data at the call: ns per call in a tight
   loop of 10,000 calls (a fresh container each repeat), beside the bare loop.

Rows 1-3 time one pass over the 20 keys with the results kept (freed after the clock stops),
as the thread's CPU ns (the time the calling thread holds the interpreter lock: none of these
calls releases it) and wall ns. The targets and the last line ("conclusion") state the floor
against the 50 ns budget, computed from the medians.

    python benchmarks/floor.py [--quick | --smoke] [--out DIR]
"""

from __future__ import annotations

import marshal
import math
import pickle
import random
import struct
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
from _common import KEYS
from steplog._buffer import Buffer
from steplog._encode import encode_columns
from steplog._layout import encode_metric_lines

NAME = "floor"
TITLE = "The CPython floor of the writer: CPU ns per point to read the buffer's objects"
BUDGET_NS = 50.0
STEP0 = 100_000  # steps above 256: range() makes a fresh int for each, as a training loop does

GIL_ONE_CALL = "yes (one C call)"
GIL_ENCODER = "yes (a few C calls; a switch may fall between them)"
GIL_WRITER = "no: includes its write syscalls, lock released there (upper bound)"
GIL_CALLER = "yes (caller's thread)"

TEXT = "orjson.dumps(items)"  # the cheapest call measured here that spells every number as text

# (group, name, what one call does with one key's interleaved items)
READS: list[tuple[str, str, Callable[[list[Any]], object]]] = [
    ("1 touch", "items[:] (reference)", lambda items: items[:]),
    ("1 touch", "sum(items[1::3])", lambda items: sum(items[1::3])),
    ("2 read", "array('d', items)", lambda items: array("d", items)),
    ("2 read", "marshal.dumps(items)", marshal.dumps),
    ("2 read", "pickle.dumps(items, 5)", lambda items: pickle.dumps(items, 5)),
    ("2 read", "struct.pack(f'{3n}d', *items)", lambda items: struct.pack(f"{len(items)}d", *items)),
    ("2 read", TEXT, orjson.dumps),
    ("3 encode", "_layout.encode_metric_lines(items)", encode_metric_lines),
    (
        "3 encode",
        "_encode.encode_columns(items[0::3], items[1::3], items[2::3])",
        lambda items: encode_columns(items[0::3], items[1::3], items[2::3]),
    ),
]
WRITER = "steplog writer thread(s), sustained run (throughput.py)"


def buffer_contents(points: int, keys: Sequence[str]) -> list[list[Any]]:
    """Each key's interleaved items as steplog's ``Buffer`` holds them after ``points`` steps of a loop."""
    rng = random.Random(17)
    scales = [10.0 ** rng.randint(-4, 3) for _ in keys]
    buf = Buffer(max_buffer=points * len(keys) + 1)
    log_metric = buf.log_metric
    uniform = rng.random
    for step in range(STEP0, STEP0 + points):
        for key, scale in zip(keys, scales, strict=True):
            log_metric(key, uniform() * scale, step)  # a fresh float per point
    metrics, _events = buf.drain()
    cols = [items for _key, items in metrics]
    if [3 * points] * len(keys) != [len(items) for items in cols]:
        raise AssertionError("the buffer did not hold every point logged")
    return cols


def _pass(f: Callable[[list[Any]], object], cols: list[list[Any]], reps: int) -> tuple[float, float]:
    """Thread-CPU and wall ns per point of ``reps`` passes of ``f`` over every key (results freed untimed)."""
    kept: list[object] = []
    keep = kept.append
    c0 = time.thread_time_ns()
    t0 = time.perf_counter_ns()
    for _ in range(reps):
        for items in cols:
            keep(f(items))
    wall, cpu = time.perf_counter_ns() - t0, time.thread_time_ns() - c0
    points = reps * sum(len(items) for items in cols) // 3
    del kept[:]
    return cpu / points, wall / points


def _writer(root: Path, steps: int) -> tuple[float, float]:
    """CPU ns per point of steplog's threads but the caller's, in throughput.py's sustained run."""
    import contenders as cs
    import throughput

    _elapsed, _cpu, others, logger = throughput._one_round(cs.STEPLOG, root, steps, use_dict=False)
    stats = logger.stats()
    points = steps * len(KEYS)
    if not stats.written == stats.logged == points:
        raise AssertionError(f"the writer wrote {stats.written} of {points} points")
    return others / points * 1e9, math.nan


# ---------------------------------------------------------------------------- row 5: the call


def _bare_loop(values: list[float], ts: int, step: int) -> int:
    c0 = time.thread_time_ns()
    for _v in values:
        pass
    return time.thread_time_ns() - c0


def _list_extend(values: list[float], ts: int, step: int) -> int:
    col: list[Any] = []
    c0 = time.thread_time_ns()
    for v in values:
        col += (ts, v, step)
    return time.thread_time_ns() - c0


def _array_append(values: list[float], ts: int, step: int) -> int:
    append = array("d").append
    c0 = time.thread_time_ns()
    for v in values:
        append(v)
    return time.thread_time_ns() - c0


def _array_extend(values: list[float], ts: int, step: int) -> int:
    extend = array("d").extend
    c0 = time.thread_time_ns()
    for v in values:
        extend((ts, v, step))
    return time.thread_time_ns() - c0


CALLS: list[tuple[str, Callable[[list[float], int, int], int]]] = [
    ("for v in values: pass (the loop alone)", _bare_loop),
    ("list += (ts, v, step) (today)", _list_extend),
    ("array('d').append(v) (one of three columns)", _array_append),
    ("array('d').extend((ts, v, step))", _array_extend),
]


def _calls(f: Callable[[list[float], int, int], int], values: list[float], repeats: int) -> tuple[float, float]:
    """CPU ns per call of ``repeats`` loops of ``len(values)`` calls, each into a fresh container."""
    ts, step = time.time_ns() // 1_000_000, STEP0 + 7
    total = sum(f(values, ts, step) for _ in range(repeats))
    return total / (repeats * len(values)), math.nan


# ---------------------------------------------------------------------------- the run


def run(mode: str = "full", out: Path | None = None, chart: bool = True) -> dict[str, Any]:
    """Measure, print the table, write JSON (and PNG); return the result."""
    rounds = c.pick(mode, 1, 5, 15)
    reps = c.pick(mode, 1, 1, 3)
    points = c.pick(mode, 200, 10_000, 10_000)
    writer_steps = c.pick(mode, 50, 10_000, 50_000)
    repeats = c.pick(mode, 1, 5, 20)
    load = c.load_average()
    keys = KEYS[: c.pick(mode, 2, 20, 20)]
    cols = buffer_contents(points, keys)
    first = cols[0]
    stamps = len({id(x) for items in cols for x in items[0::3]})
    if encode_metric_lines(first) != encode_columns(first[0::3], first[1::3], first[2::3]):
        raise AssertionError("the two encoders write different bytes for the same points")
    values = [x + 0.5 for x in first[1::3]]  # fresh floats for the call loops

    meta: dict[str, tuple[str, str, str]] = {}  # name -> (group, unit, GIL)
    measures: dict[str, Callable[[], tuple[float, float]]] = {}
    for group, name, f in READS:
        meta[name] = (group, "point", GIL_ENCODER if group.startswith("3") else GIL_ONE_CALL)
        measures[name] = lambda f=f: _pass(f, cols, reps)  # type: ignore[misc]
    tmp = tempfile.TemporaryDirectory(prefix="steplog-floor-")
    counter = iter(range(1_000_000))
    meta[WRITER] = ("4 writer", "point", GIL_WRITER)
    measures[WRITER] = lambda: _writer(Path(tmp.name) / f"r{next(counter)}", writer_steps)
    for name, g in CALLS:
        meta[name] = ("5 call", "call", GIL_CALLER)
        measures[name] = lambda g=g: _calls(g, values, repeats)  # type: ignore[misc]

    cpu: dict[str, list[float]] = {n: [] for n in measures}
    wall: dict[str, list[float]] = {n: [] for n in measures}
    t_start = time.perf_counter()
    try:
        for r in range(rounds):
            for name in c.rotate(list(measures), r):
                u, w = measures[name]()
                cpu[name].append(u)
                wall[name].append(w)
    finally:
        tmp.cleanup()
    seconds = time.perf_counter() - t_start
    load_end = c.load_average()

    rows = []
    for name in measures:
        group, unit, gil = meta[name]
        ws = [w for w in wall[name] if not math.isnan(w)]
        rows.append(
            {
                "name": name,
                "group": group,
                "unit": f"ns per {unit}",
                "gil_held_throughout": gil,
                "cpu_ns": c.summary(cpu[name]),
                "wall_ns": c.summary(ws),
            }
        )
    conclusion, targets = _conclude(rows)
    busy = c.too_busy(max(load, load_end), 1.0)
    if busy:
        conclusion += f" (Busy machine: {busy}; absolute figures are inflated.)"
    notes = [
        f"input: {len(keys)} keys x {points:,} points from steplog's Buffer ({stamps} distinct stamp objects); "
        f"rows 1-3: {reps} pass(es) over all keys per round; measured in {seconds:.1f} s",
        "row 4 reuses throughput.py's loop (one log_metric per key, 20 float objects reused each step), "
        f"{writer_steps * len(KEYS):,} points per round; its figure includes system time of the writes",
        f"row 5: {repeats} repeats of {len(values):,} calls per round; subtract the bare loop for the operation",
        f"load average (1 min) at start/end: {load:.2f}/{load_end:.2f} on {c.machine()['cpus']} CPUs",
    ]
    fields = {
        "rounds": rounds,
        "keys": len(keys),
        "points_per_key": points,
        "distinct_stamps": stamps,
        "budget_ns": BUDGET_NS,
        "load_1min": [load, load_end],
        "seconds": seconds,
        "conclusion": conclusion,
        "rows": rows,
    }
    result = c.result_of(TITLE, mode, fields, targets=targets, notes=notes, packages=("steplog", "orjson"))
    return c.report(NAME, result, out, _print, _chart(rows) if chart else None)


def _conclude(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The conclusion line and the targets, from the medians."""
    med = {r["name"]: r["cpu_ns"]["median"] for r in rows}

    def cheapest(group: str) -> tuple[str, float]:
        return min(((r["name"], med[r["name"]]) for r in rows if r["group"] == group), key=lambda x: x[1])

    read_name, read = cheapest("2 read")
    enc_name, enc = cheapest("3 encode")
    text = med[TEXT]
    touch = med["items[:] (reference)"]
    writer = med[WRITER]
    line = (
        f"cheapest full read of a point: {read:.0f} ns ({read_name}); cheapest text of its three numbers: "
        f"{text:.0f} ns ({TEXT}); steplog's cheapest metric-file encoder: {enc:.0f} ns ({enc_name}); "
        f"touching its 3 objects: {touch:.1f} ns; the writer as it runs: {writer:.0f} ns; "
        f"target {BUDGET_NS:.0f} ns per point. "
    )
    if read > BUDGET_NS:
        line += (
            f"Reading alone takes {read / BUDGET_NS:.1f}x the budget: no pure-Python writer that reads "
            "the buffer's objects can meet it."
        )
    elif text > BUDGET_NS:
        line += (
            f"Reading alone takes {read / BUDGET_NS:.0%} of the budget; spelling the numbers as text takes "
            f"{text / BUDGET_NS:.1f}x: no writer that formats the metric lines from these objects while "
            f"holding the lock can meet it; one that only reads them (and formats elsewhere) has "
            f"{BUDGET_NS - read:.0f} ns left for everything else."
        )
    else:
        line += "The floor is below the budget: a writer at C speed could meet it."
    targets = [
        c.target(
            "floor: cheapest full read of a point from the buffer's objects (GIL held)",
            read,
            f"≤ {BUDGET_NS:.0f} ns (writer budget)",
            read <= BUDGET_NS,
            f"{read:.0f} ns ({read_name})",
        ),
        c.target(
            "floor: cheapest text of a point's three numbers (GIL held)",
            text,
            f"≤ {BUDGET_NS:.0f} ns (writer budget)",
            text <= BUDGET_NS,
            f"{text:.0f} ns ({TEXT})",
        ),
    ]
    return line, targets


def _chart(rows: list[dict[str, Any]]) -> Callable[[Any], None]:
    per_point = [r for r in rows if r["unit"] == "ns per point"]
    names, values = [r["name"] for r in per_point], [r["cpu_ns"]["median"] for r in per_point]
    draw_bars = c.bar_chart_drawer(
        names, values, "The writer's floor in CPython", "CPU ns per point (median; log scale)"
    )

    def draw(ax: Any) -> None:
        draw_bars(ax)
        ax.axvline(BUDGET_NS, color="#d62728", linestyle="--", label=f"writer budget: {BUDGET_NS:.0f} ns per point")
        ax.legend(fontsize=8)

    return draw


def _print(result: dict[str, Any]) -> None:
    print(f"\n## {result['title']} ({result['mode']}, {result['rounds']} rounds, median (min-max))\n")
    rows = [
        [
            r["group"],
            r["name"],
            r["unit"],
            c.fmt(r["cpu_ns"]["median"]),
            f"{c.fmt(r['cpu_ns']['min'])}-{c.fmt(r['cpu_ns']['max'])}",
            c.fmt(r["wall_ns"]["median"]),
            r["gil_held_throughout"],
        ]
        for r in result["rows"]
    ]
    print(c.table(["row", "what", "unit", "CPU ns", "min-max", "wall ns", "GIL held throughout"], rows))
    print()
    c.print_footer(result)
    print(f"\nconclusion: {result['conclusion']}")


def main(argv: Sequence[str] | None = None) -> int:
    return c.script_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
