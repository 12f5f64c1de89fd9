"""Micro benchmark for phase 2: a compact column buffer against today's interleaved lists.

Not wired into steplog: two small stand-ins for ``Buffer.log_metric``'s fast path, measured
side by side (interleaved rounds, medians, CPU time of the thread beside wall time):

* ``lists`` (today): one ``list`` per key holding ``[ts, value, step, ...]``; a call does
  ``col += (ts, value, step)``. Each record keeps its float (24 bytes) and three list slots
  (24 bytes); the step int is shared with the loop variable only while it is small.
* ``columns`` (proposed): per key an ``array('d')`` of values and an ``array('q')`` of steps
  (8 + 8 bytes, the float and int objects are not kept) and the stamps run-length encoded as
  two ``array('q')`` (index of the first record with that stamp, the stamp), appended to only
  when the stamp changed since the key's last record. The appends are bound methods kept
  in the key's slot, so a call is two C calls plus a stamp identity check.

Figures: ns per call (20 and 1 keys per step, keyword ``step=``, a new step every 20 or 1
calls, the stamp changing every 50 steps as a fast loop sees the millisecond change), the
same loop on a no-op method for scale, and tracemalloc bytes per record held. The drain is
timed too: what the writer does to take a key's records (today a slice and a ``del``; with
columns ``tolist()`` of each array, or ``bytes()`` of it for a helper process).

    python benchmarks/compact.py [--quick | --smoke] [--out DIR]
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
from _common import KEYS

NAME = "compact"
TITLE = "Compact column buffer (prototype, not wired): ns per log_metric call and bytes per record"


class ListBuffer:
    """Today's fast path, reduced to its common case (known key, float, current or next step)."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.cols: dict[str, list[Any]] = {k: [] for k in keys}
        self.step: int | None = None
        self.ts = time.time_ns() // 1_000_000

    def log_metric(self, key: str, value: Any, step: int | None = None, timestamp: int | None = None) -> None:
        col = self.cols[key]
        if value.__class__ is float and timestamp is None:
            if step is self.step:
                col += (self.ts, value, step)
                return
            if step.__class__ is int:
                self.step = step
                col += (self.ts, value, step)
                return
        raise AssertionError("slow path not modelled")

    def drain(self) -> int:
        n = 0
        for col in self.cols.values():
            k = len(col)
            items = col[:k]
            del col[:k]
            n += len(items) // 3
        return n


class ColumnBuffer:
    """The proposed fast path: values and steps in arrays, stamps run-length encoded per key."""

    def __init__(self, keys: Sequence[str]) -> None:
        # per key: [values, steps, values.append, steps.append, stamp runs (index), stamp runs (ts), last stamp]
        self.cols: dict[str, list[Any]] = {}
        for k in keys:
            v, s = array("d"), array("q")
            self.cols[k] = [v, s, v.append, s.append, array("q"), array("q"), None]
        self.step: int | None = None
        self.ts = time.time_ns() // 1_000_000

    def log_metric(self, key: str, value: Any, step: int | None = None, timestamp: int | None = None) -> None:
        col = self.cols[key]
        if value.__class__ is float and timestamp is None:
            if step is not self.step:
                if step.__class__ is not int:
                    raise AssertionError("slow path not modelled")
                self.step = step
            col[2](value)
            col[3](step)
            if col[6] is not self.ts:  # a new stamp for this key: one run entry
                col[6] = self.ts
                col[4].append(len(col[0]) - 1)
                col[5].append(self.ts)
            return
        raise AssertionError("slow path not modelled")

    def drain(self) -> int:
        n = 0
        for col in self.cols.values():
            values, steps = col[0].tolist(), col[1].tolist()
            del col[0][:], col[1][:], col[4][:], col[5][:]
            col[6] = None
            n += len(values) + len(steps) * 0
        return n


def _loop(f: Callable[..., Any], keys: Sequence[str], step0: int, steps: int, tick: Callable[[], None]) -> float:
    values = [0.1 + i / 7 for i in range(len(keys))]
    t0 = time.thread_time()
    for step in range(step0, step0 + steps):
        if step % 50 == 0:
            tick()
        for key, value in zip(keys, values):  # noqa: B905
            f(key, value, step=step)
    return time.thread_time() - t0


def _bytes_per_record(make: Callable[[Sequence[str]], Any], keys: Sequence[str], records: int) -> float:
    buf = make(keys)
    steps = records // len(keys)
    _loop(buf.log_metric, keys, 0, 1, lambda: None)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for step in range(1000, 1000 + steps):  # fresh ints (> 256) and fresh floats, as a training loop makes
        if step % 50 == 0:
            buf.ts = time.time_ns() // 1_000_000 + step  # a new stamp object now and then
        for i, key in enumerate(keys):
            buf.log_metric(key, step * 0.001 + i, step=step)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / (steps * len(keys))


def run(mode: str = "full", out: Path | None = None, chart: bool = True) -> dict[str, Any]:
    """Measure, print the table, write JSON (and PNG); return the result."""
    rounds = c.pick(mode, 1, 9, 25)
    calls = c.pick(mode, 200, 40_000, 100_000)
    records = c.pick(mode, 2_000, 100_000, 400_000)
    rows = []
    for nkeys in (20, 1):
        keys = KEYS[:nkeys]
        makers: dict[str, Callable[[], Any]] = {
            "no-op": c.Noop,
            "lists (today)": lambda keys=keys: ListBuffer(keys),
            "columns (proposed)": lambda keys=keys: ColumnBuffer(keys),
        }
        ns: dict[str, list[float]] = {n: [] for n in makers}
        drain: dict[str, list[float]] = {n: [] for n in makers}
        for r in range(rounds):
            for name in c.rotate(list(makers), r):
                buf = makers[name]()
                steps = calls // nkeys

                def tick(b: Any = buf) -> None:
                    if hasattr(b, "ts"):
                        b.ts = time.time_ns() // 1_000_000 + 1  # a fresh int: the stamp changed

                cpu = _loop(buf.log_metric, keys, 1000, steps, tick)
                ns[name].append(cpu / (steps * nkeys) * 1e9)
                if hasattr(buf, "drain"):
                    d0 = time.thread_time()
                    got = buf.drain()
                    drain[name].append((time.thread_time() - d0) / max(got, 1) * 1e9)
        noop = c.summary(ns["no-op"])["median"]
        for name in ("lists (today)", "columns (proposed)"):
            make = ListBuffer if name.startswith("lists") else ColumnBuffer
            per = c.summary(ns[name])
            rows.append(
                {
                    "name": f"{name}, {nkeys} key(s) per step",
                    "cpu_ns": per,
                    "x_noop": per["median"] / noop,
                    "noop_ns": noop,
                    "drain_ns_per_record": c.summary(drain[name])["median"],
                    "bytes_per_record": _bytes_per_record(make, keys, records),
                }
            )
    targets = []
    for row in rows:
        if row["name"].startswith("columns"):
            b = row["bytes_per_record"]
            targets.append(c.target(f"prototype bytes per record: {row['name']}", b, "≤ 32", b <= 32, f"{b:.1f} bytes"))
    fields = {"rounds": rounds, "rows": rows}
    result = c.result_of(TITLE, mode, fields, targets=targets, notes=[], packages=("steplog",))
    return c.report(NAME, result, out, _print, _chart(rows) if chart else None)


def _chart(rows: list[dict[str, Any]]) -> Callable[[Any], None]:
    names, values = [r["name"] for r in rows], [r["cpu_ns"]["median"] for r in rows]
    return c.bar_chart_drawer(names, values, TITLE, "CPU ns per call (median)", log=False)


def _print(result: dict[str, Any]) -> None:
    print(f"\n## {result['title']} ({result['mode']}, {result['rounds']} rounds, median (min-max))\n")
    c.print_grouped(
        result,
        [""],
        lambda _g: ["CPU ns/call", "min-max", "x no-op", "no-op ns", "drain ns/record", "bytes/record"],
        lambda r, _g: [
            c.fmt(r["cpu_ns"]["median"]),
            f"{c.fmt(r['cpu_ns']['min'])}-{c.fmt(r['cpu_ns']['max'])}",
            c.fmt(r["x_noop"], "x"),
            c.fmt(r["noop_ns"]),
            c.fmt(r["drain_ns_per_record"]),
            c.fmt(r["bytes_per_record"]),
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    return c.script_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
