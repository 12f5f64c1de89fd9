"""Workload 4, flush latency: time from a step boundary until that step's lines are in the file.

The training loop records when each step ends (the moment the next step's first log call
is made); a separate watcher *process* (so it never waits for this process's interpreter
lock) polls the metric file of one key every 0.5 ms and records when each step's line
appears. Both use the system's monotonic clock. Latency = appearance - boundary (0 when
the line was already there, as with a sync logger). Two loops: fast steps (about 1 ms
of Python work each) and slow ones (a 20 ms sleep each, the writer asleep in between).

    python benchmarks/flush_latency.py [--quick | --smoke] [--out DIR]
"""

from __future__ import annotations

import json
import subprocess
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

NAME = "flush_latency"
TITLE = "Flush latency: step boundary -> the step's line is in the file"
FLUSH_INTERVAL = 0.05

# The watcher: finds the key's metric file under the root, polls it, prints {step: first seen}.
_WATCHER = r"""
import glob, json, os, select, sys, time
root, key = sys.argv[1], sys.argv[2]
seen, path, fd, tail = {}, None, None, b""
while True:
    ready, _, _ = select.select([sys.stdin], [], [], 0.0005)
    stop = bool(ready)
    now = time.monotonic()
    if fd is None:
        found = glob.glob(os.path.join(root, "**", "metrics", key), recursive=True)
        if found:
            fd = os.open(found[0], os.O_RDONLY)
    if fd is not None:
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            tail += chunk
        *lines, tail = tail.split(b"\n")
        for line in lines:
            parts = line.split()
            if len(parts) >= 3:
                seen.setdefault(parts[2].decode(), now)
    if stop:
        break
print(json.dumps(seen))
"""


def _watch(root: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(root), KEYS[0]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _one(x: cs.Contender, root: Path, steps: int, work: Callable[[], object]) -> list[float]:
    """Latencies (seconds) of every step but the last, for one run of ``x``."""
    root.mkdir(parents=True)
    watcher = _watch(root)
    values = [0.5 + i / 13 for i in range(len(KEYS))]
    boundary: list[float] = []
    try:
        logger = x.open(root)
        time.sleep(0.05)  # let the watcher find the first line's file before timing starts
        log_metric = logger.log_metric
        for step in range(steps):
            boundary.append(time.monotonic())  # step - 1 ends here
            for key, value in zip(KEYS, values):  # noqa: B905
                log_metric(key, value, step)
            work()
        logger.close()
        time.sleep(0.01)
    finally:
        out, _ = watcher.communicate("stop\n", timeout=30)
    seen = {int(k): v for k, v in json.loads(out).items()}
    latencies = []
    for step in range(steps - 1):
        if step in seen:
            latencies.append(max(0.0, seen[step] - boundary[step + 1]))
        else:
            latencies.append(float("inf"))  # never seen: counted, and shown as a miss
    return latencies


def run(mode: str = "full", out: Path | None = None, chart: bool = True) -> dict[str, Any]:
    """Measure, print the table, write JSON (and PNG); return the result."""
    rounds = c.pick(mode, 1, 1, 3)
    seconds = c.pick(mode, 0.1, 0.3, 2.0)
    n_busy = c.calibrate_busy(0.001)
    regimes: dict[str, tuple[Callable[[], object], int]] = {
        "fast steps (~1 ms Python each)": (lambda: c.busy(n_busy), max(3, int(seconds / 0.0012))),
        "slow steps (20 ms sleep each)": (lambda: time.sleep(0.02), max(3, int(seconds / 0.021))),
    }
    steplog_x = cs.Contender(
        "steplog",
        f"flush_interval={FLUSH_INTERVAL}",
        lambda root: cs._open_steplog(root, flush_interval=FLUSH_INTERVAL),
    )
    chosen = (steplog_x, cs.NAIVE, cs.BUFFERED, cs.MLFLOW_ASYNC, cs.MLFLOW_ASYNC_BUFFERED)
    usable, notes = cs.available(chosen)
    notes.append(
        "tensorboardX is left out: its event files are binary and it flushes every flush_secs (120 s by default)"
    )
    lat: dict[str, dict[str, list[float]]] = {r: {x.name: [] for x in usable} for r in regimes}
    with tempfile.TemporaryDirectory(prefix="steplog-bench-") as tmp:
        for r in range(rounds):
            for regime, (work, steps) in regimes.items():
                for i, x in enumerate(c.rotate(usable, r)):
                    lat[regime][x.name] += _one(x, Path(tmp) / f"r{r}-{regime[:4]}-{i}", steps, work)
    rows = []
    for x in usable:
        row: dict[str, Any] = {"name": x.name, "description": x.description}
        for regime in regimes:
            ms = [v * 1000 for v in lat[regime][x.name]]
            finite = [v for v in ms if v != float("inf")]
            row[regime] = {
                "p50_ms": c.percentile(ms, 50),
                "p99_ms": c.percentile(ms, 99),
                "max_ms": max(ms) if ms else float("nan"),
                "steps": len(ms),
                "never_seen": len(ms) - len(finite),
            }
        rows.append(row)
    targets = []
    limit = FLUSH_INTERVAL * 1000 + 20
    for row in rows:
        if row["name"] == "steplog":
            for regime in regimes:
                p99 = row[regime]["p99_ms"]
                targets.append(
                    c.target(
                        f"flush latency p99, {regime}",
                        p99,
                        f"≤ {limit:.0f} ms (flush_interval + 20 ms)",
                        p99 <= limit,
                        f"{p99:.1f} ms",
                    )
                )
    fields = {"rounds": rounds, "flush_interval_s": FLUSH_INTERVAL, "regimes": list(regimes), "rows": rows}
    result = c.result_of(TITLE, mode, fields, targets=targets, notes=notes, packages=("steplog", "mlflow"))
    return c.report(NAME, result, out, _print, _chart(rows, list(regimes)) if chart else None)


def _chart(rows: list[dict[str, Any]], regimes: list[str]) -> Callable[[Any], None]:
    return c.grouped_bar_chart_drawer(
        [r["name"] for r in rows],
        regimes,
        lambda regime: [min(r[regime]["p99_ms"], 1e6) for r in rows],
        lambda regime: f"p99, {regime}",
        width=0.38,
        target=(FLUSH_INTERVAL * 1000 + 20, "steplog target"),
        title=TITLE,
        xlabel="ms from step boundary to line in file (p99)",
    )


def _print(result: dict[str, Any]) -> None:
    print(f"\n## {result['title']} ({result['mode']}, {result['rounds']} rounds, all steps pooled)\n")
    c.print_grouped(
        result,
        result["regimes"],
        lambda regime: [f"{regime}: p50 ms", "p99 ms", "max ms"],
        lambda r, regime: [c.fmt(r[regime][k]) for k in ("p50_ms", "p99_ms", "max_ms")],
    )


def main(argv: Sequence[str] | None = None) -> int:
    return c.script_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
