"""Workload 6, memory: bytes per buffered record with the writer stalled, and RSS of a logging process.

Bytes per record: a run whose only sink blocks on its first batch, so everything logged
after it stays in steplog's hands; ``tracemalloc`` counts what that grows by while N more
points are logged (fresh float values and step ints, as a training loop makes them, in ten
bursts with a pause between, so the writer drains as it does during training), divided by
N. The steady state of a stall is measured: tracemalloc starts once the stall has lasted
past the point where steplog compacts a stalled sink's backlog (``max(0.25 s, 4 *
flush_interval)``), and the last figure is read once the writer has drained and compacted
what was logged (the traced memory stops shrinking). For scale, the same figure for a plain
queue of ``(ts, value, step)`` tuples. RSS: each contender logs the same points in a fresh process; the table shows the
process's peak resident set after start-up (imports and an open run) and after logging
and closing.

    python benchmarks/memory.py [--quick | --smoke] [--out DIR]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import contenders as cs
from _common import KEYS

NAME = "memory"
STALL = 0.5
"""Seconds the stall lasts before tracemalloc starts: past steplog's compaction threshold (0.25 s)."""
TITLE = "Memory: bytes per buffered record (writer stalled), and RSS of a logging process"


class StalledSink:
    """A sink whose writes wait until ``gate`` is set (the writer stalls on its first batch)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()

    async def open(self, request: Any) -> Any:
        from steplog.testing import MemorySink

        return await MemorySink().open(request)

    async def write(self, batch: Any) -> None:
        import anyio

        self.entered.set()
        await anyio.to_thread.run_sync(self.gate.wait)
        self.write_sync(batch)

    def write_sync(self, batch: Any) -> None:
        for key, _items in batch.metrics:
            batch.done.add(("metric", key))
        for key, _text in batch.params:
            batch.done.add(("param", key))
        for key, _text in batch.tags:
            batch.done.add(("tag", key))
        for record in batch.artifacts:
            batch.done.add(("artifact", record.artifact_path))

    async def close(self, status: Any, end_time: int) -> None:
        return None

    def close_sync(self, status: Any, end_time: int) -> None:
        return None


def _log_steps(log_metric: Callable[[str, float, int], Any], keys: list[str], steps: int, first: int) -> None:
    for step in range(first, first + steps):  # ints above 256 are fresh objects, as in training
        for i, key in enumerate(keys):
            log_metric(key, step * 0.001 + i, step)  # a fresh float per point


def bytes_per_record(steps: int, keys: list[str]) -> dict[str, float]:
    """tracemalloc growth per record: steplog's buffer (writer stalled) and a queue of tuples."""
    import steplog

    sink = StalledSink()
    out: dict[str, float] = {}
    run = steplog.start_run("bench", sinks=[sink], handle_signals=False, max_buffer=10 * steps * len(keys) + 100)
    try:
        _log_steps(run.log_metric, keys, 1, 0)
        run.log_metric(keys[0], 0.0, 1)  # a boundary wakes the writer, which takes the first batch and stalls
        if not sink.entered.wait(10):
            raise RuntimeError("the writer never reached the sink")
        time.sleep(STALL)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        bursts = 10
        for i in range(bursts):
            _log_steps(run.log_metric, keys, steps // bursts, 2 + i * (steps // bursts))
            time.sleep(0.05)
        after = _settled_traced_memory()
        tracemalloc.stop()
        out["steplog"] = (after - before) / (bursts * (steps // bursts) * len(keys))
        out["steplog_queued"] = run.stats().queued
    finally:
        sink.gate.set()
        run.close()
    queue: deque[tuple[int, float, int]] = deque()
    ts = time.time_ns() // 1_000_000
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    _log_steps(lambda k, v, s: queue.append((ts, v, s)), keys, steps, 2)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    out["tuple queue"] = (after - before) / (steps * len(keys))
    return out


def _settled_traced_memory(timeout: float = 5.0) -> int:
    """tracemalloc's current figure once it stops shrinking (the writer has drained and compacted)."""
    deadline = time.monotonic() + timeout
    last = tracemalloc.get_traced_memory()[0]
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = tracemalloc.get_traced_memory()[0]
        if now >= last * 0.99:
            return now
        last = now
    return last


def _child(name: str, root: Path, points: int) -> None:
    """In a fresh process: open a run of ``name``, report RSS, log ``points`` points, close, report peak RSS."""
    logger: Any = None
    if name != "python (no logging)":
        logger = {x.name: x for x in cs.ALL}[name].open(root)
    start = _peak_kib()
    if logger is not None:
        values = [0.5 + i / 19 for i in range(len(KEYS))]
        log_metric = logger.log_metric
        for step in range(points // len(KEYS)):
            for key, value in zip(KEYS, values):  # noqa: B905
                log_metric(key, value, step)
        logger.close()
    print(json.dumps({"start_kib": start, "peak_kib": _peak_kib()}))


def _peak_kib() -> float:
    """Peak resident set of this process in KiB (VmHWM: unlike ru_maxrss, it starts afresh at exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    scale = 1024 if sys.platform == "darwin" else 1  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def rss(name: str, root: Path, points: int) -> dict[str, float]:
    """Run :func:`_child` in a fresh interpreter; RSS figures in MiB."""
    env = {**os.environ, "WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", name, str(root), str(points)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: the child failed: {proc.stderr[-2000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"start_mib": got["start_kib"] / 1024, "peak_mib": got["peak_kib"] / 1024}


def run(mode: str = "full", out: Path | None = None, chart: bool = True) -> dict[str, Any]:
    """Measure, print the table, write JSON (and PNG); return the result."""
    steps = c.pick(mode, 50, 5_000, 20_000)
    points = c.pick(mode, 200, 100_000, 400_000)
    budget = c.pick(mode, 0.01, 1.0, 4.0)
    per_record = {
        "20 keys per step": bytes_per_record(steps, KEYS),
        "1 key per step": bytes_per_record(steps * 5, KEYS[:1]),
    }
    usable, notes = cs.available(cs.ALL)
    if mode != "full":
        # each peer's process pays its imports (seconds for MLflow and tensorboardX): full runs only
        notes.append("RSS of the peers' processes: measured by the full run only")
        usable = [x for x in usable if x in (cs.STEPLOG, cs.NAIVE, cs.BUFFERED)]
    rss_rows = []
    with tempfile.TemporaryDirectory(prefix="steplog-bench-") as tmp:
        for i, name in enumerate(["python (no logging)", *(x.name for x in usable)]):
            cost = next((x.cost for x in usable if x.name == name), 0.01)
            n = min(points, c.scaled(cost, budget, lo=len(KEYS), hi=points))
            rss_rows.append({"name": name, "points": n, **rss(name, Path(tmp) / str(i), n)})
    b = per_record["20 keys per step"]["steplog"]
    targets = [c.target("memory per buffered record (20 keys per step)", b, "≤ 32 bytes", b <= 32, f"{b:.1f} bytes")]
    b1 = per_record["1 key per step"]["steplog"]
    targets.append(
        c.target("memory per buffered record (1 key per step)", b1, "≤ 32 bytes", b1 <= 32, f"{b1:.1f} bytes")
    )
    fields = {"bytes_per_record": per_record, "rss": rss_rows}
    result = c.result_of(TITLE, mode, fields, targets=targets, notes=notes)
    return c.report(NAME, result, out, _print, _chart(rss_rows) if chart else None)


def _chart(rows: list[dict[str, Any]]) -> Callable[[Any], None]:
    names = [r["name"] for r in rows]
    return c.bar_chart_drawer(names, [r["peak_mib"] for r in rows], "Peak RSS of a logging process", "MiB", log=False)


def _print(result: dict[str, Any]) -> None:
    print(f"\n## {result['title']} ({result['mode']})\n")
    rows = [
        [shape, c.fmt(v["steplog"]), c.fmt(v["tuple queue"]), f"{v['steplog_queued']:,}"]
        for shape, v in result["bytes_per_record"].items()
    ]
    print(c.table(["bytes per buffered record", "steplog", "queue of tuples (reference)", "records held"], rows))
    print()
    rows = [[r["name"], c.fmt(r["start_mib"]), c.fmt(r["peak_mib"]), f"{r['points']:,}"] for r in result["rss"]]
    print(c.table(["process", "RSS after start-up, MiB", "peak RSS after logging + close, MiB", "points logged"], rows))
    c.print_footer(result)


def main(argv: Sequence[str] | None = None) -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child" and argv is None:
        _child(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
        return 0
    return c.script_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
