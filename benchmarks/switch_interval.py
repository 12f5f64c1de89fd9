"""Experiment: what the writer's process-wide ``sys.setswitchinterval`` buys, measured.

The writer lowers the interpreter's switch interval while a write cycle runs
(``steplog._writer._eager_switching``): to 0.5 ms for a writer on its own thread, 0.2 ms for
a writer in the caller's event loop. This script measures, interleaved round by round in one
process, the same figures with the writer as it is, with 0.2 ms for both, and with that
context manager replaced by a no-op (patched in this process only; the library is not changed):

* the sustained hot path (hot_path.py's sustained mode: x a no-op call, 20 keys per step);
* end-to-end points/s (20 x ``log_metric`` per step, including ``close()``) and the CPU
  of the threads but the caller's per point;
* the asyncio event-loop lag p99 while logging at full speed (event_loop.py's scenario);
* the loop overhead at 20 ``log_metric`` per 200 µs pure-Python step, including close;
* the flush latency p99 with ~1 ms pure-Python steps (flush_latency.py's watcher process):
  the figure the setting was introduced for (a write cycle over 20 files waited a switch
  interval for the lock after each ``os.write``).

    python benchmarks/switch_interval.py [--quick | --smoke]
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import contenders as cs
import event_loop
import flush_latency
import hot_path
import loop_overhead
import steplog._writer as writer_module
import throughput

NAME = "switch_interval"
TITLE = "The writer's sys.setswitchinterval: as shipped, 0.2 ms everywhere, removed (patched in this process)"


@contextlib.contextmanager
def _unchanged(interval: float = 0.0) -> Iterator[None]:
    yield


def _figures(mode: str, root: Path) -> dict[str, float]:
    import anyio

    held = hot_path.sustained(mode, root / "hot")["20 keys per step"]
    steps = c.pick(mode, 50, 10_000, 50_000)
    elapsed, _cpu, others, _lg = throughput._one_round(cs.STEPLOG, root / "tp", steps, False)
    lags, _points = anyio.run(event_loop._scenario, "steplog", root / "ev", c.pick(mode, 0.05, 0.5, 2.0))
    n_busy = c.calibrate_busy(loop_overhead.STEP_S)
    n = c.pick(mode, 5, 300, 1500)
    base, _ = loop_overhead._loop(lambda: c.busy(n_busy), n, None, False)
    logged, _ = loop_overhead._loop(lambda: c.busy(n_busy), n, cs.STEPLOG.open(root / "lo"), False)
    n_ms = c.calibrate_busy(0.001)
    flush = flush_latency._one(cs.STEPLOG, root / "fl", c.pick(mode, 5, 300, 1500), lambda: c.busy(n_ms))
    return {
        "flush_latency_p99_ms": c.percentile([x * 1000 for x in flush], 99),
        "sustained_x_noop": held["total_ratio"],
        "points_per_s": steps * 20 / elapsed,
        "writer_cpu_ns_per_point": others / (steps * 20) * 1e9,
        "asyncio_lag_p99_ms": c.percentile([x * 1000 for x in lags], 99),
        "loop_overhead_pct": 100 * (logged / base - 1),
    }


def run(mode: str = "full", out: Path | None = None, chart: bool = False) -> dict[str, Any]:
    """Measure both variants interleaved; print and write JSON."""
    rounds = c.pick(mode, 1, 3, 5)
    original = writer_module._eager_switching
    shipped = writer_module._SWITCH_INTERVAL
    in_loop = writer_module._LOOP_SWITCH_INTERVAL
    variants = {
        f"as shipped ({shipped * 1000:g} ms thread, {in_loop * 1000:g} ms loop)": (original, shipped),
        f"{in_loop * 1000:g} ms for both": (original, in_loop),
        "removed": (_unchanged, shipped),
    }
    got: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    with tempfile.TemporaryDirectory(prefix="steplog-bench-") as tmp:
        try:
            for r in range(rounds):
                for i, name in enumerate(c.rotate(list(variants), r)):
                    switching, interval = variants[name]
                    writer_module._eager_switching = switching  # type: ignore[assignment]
                    writer_module._SWITCH_INTERVAL = interval
                    figs = _figures(mode, Path(tmp) / f"{r}-{i}")
                    for k, v in figs.items():
                        got[name].setdefault(k, []).append(v)
        finally:
            writer_module._eager_switching = original
            writer_module._SWITCH_INTERVAL = shipped
    rows = [{"name": name, **{k: c.summary(v) for k, v in figs.items()}} for name, figs in got.items()]
    fields = {"rounds": rounds, "switch_interval_s": sys.getswitchinterval(), "rows": rows}
    result = c.result_of(TITLE, mode, fields, targets=[], notes=[], packages=("steplog",))
    return c.report(NAME, result, out, _print, None)


def _print(result: dict[str, Any]) -> None:
    print(f"\n## {result['title']} ({result['mode']}, {result['rounds']} rounds, median (min-max))\n")
    keys = [k for k in result["rows"][0] if k != "name"]
    rows = [
        [r["name"], *(f"{c.fmt(r[k]['median'])} ({c.fmt(r[k]['min'])}-{c.fmt(r[k]['max'])})" for k in keys)]
        for r in result["rows"]
    ]
    print(c.table(["setswitchinterval", *keys], rows))
    print(f"\nwall clock {time.strftime('%H:%M:%S')}; load average {c.load_average():.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    return c.script_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
