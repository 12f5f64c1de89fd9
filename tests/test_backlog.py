"""A stalled or failing sink's backlog is held packed (``_writer``'s "Compacted backlog") and written exactly.

The writer is driven directly in the test's event loop (as in ``test_writer_unit``), or through a
run for the close path. What is pinned: slices behind a stalled or failing sink's head are packed,
a healthy writer never packs, counts never change, and every point comes out bit for bit, in order,
through the async path, the close path and the emergency path.
"""

from __future__ import annotations

import errno
import math
import struct
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import steplog
from _sinks import WAIT, FlakySink, GateSink
from steplog import FlushTimeoutError, RunStatus
from steplog._buffer import Buffer
from steplog._hosting import attach_writer
from steplog._portal import loop_scheduler
from steplog._writer import Writer
from steplog.testing import MemorySink
from steplog.typing import Batch, RunRequest, Sink

REQUEST = RunRequest(experiment_name="unit", run_name="backlog", tags={}, start_time=0, user_id="tester")

NAN_WITH_PAYLOAD = struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_0000_0ABC))[0]
VALUES = [NAN_WITH_PAYLOAD, -0.0, 0.0, math.inf, -math.inf, 1e308, 5e-324, 0.1, -2.5]
STEPS = [2**63 - 1, -(2**63), 0, 7, 1 << 40]
TIMESTAMPS = [None, 0, 2**63 - 1, 1_700_000_000_123]

Point = tuple[int, int, int]  # step, the value's bits, timestamp (None: any)


def _bits(value: float) -> int:
    bits: int = struct.unpack("<Q", struct.pack("<d", value))[0]
    return bits


@pytest.fixture
def quick_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    """A write counts as stalled after 4 flush intervals (not 0.25 s): the tests need not wait."""
    monkeypatch.setattr("steplog._writer._STALL_MIN", 0.0)


@asynccontextmanager
async def running(sinks: Sequence[Sink], *, flush_interval: float = 0.01) -> AsyncIterator[tuple[Buffer, Writer]]:
    """A buffer and a started writer in the current loop, wired as a run wires them; stopped on exit."""
    buffer = Buffer()
    writer = Writer(buffer, sinks, flush_interval=flush_interval)
    async with anyio.create_task_group() as tg:
        attach_writer(buffer, writer, loop_scheduler(), loop_thread=threading.get_ident())
        await writer.open(REQUEST)
        await tg.start(writer.run)
        try:
            yield buffer, writer
        finally:
            with anyio.fail_after(WAIT):
                await writer.stop()


def _log_round(log: Any, round_: int, expected: dict[str, list[tuple[int, int, int | None]]]) -> None:
    """Log every value at every step, some with explicit timestamps, under two keys; note what is expected."""
    for i, step in enumerate(STEPS):
        for j, value in enumerate(VALUES):
            ts = TIMESTAMPS[(i + j + round_) % len(TIMESTAMPS)]
            for key in ("a", f"k/{round_ % 2}"):
                log(key, value, step, ts)
                expected.setdefault(key, []).append((step, _bits(value), ts))
        log("many", float(round_ * 1000 + i), 1000 + round_ * 10 + i, None)  # a fresh float and step each
        expected.setdefault("many", []).append((1000 + round_ * 10 + i, _bits(float(round_ * 1000 + i)), None))


def _assert_written(sink: MemorySink, expected: dict[str, list[tuple[int, int, int | None]]]) -> None:
    assert sorted(sink.metrics) == sorted(expected)
    for key, points in expected.items():
        got = [(p.step, _bits(p.value), p.timestamp) for p in sink.metrics[key]]
        assert [(s, b) for s, b, _t in got] == [(s, b) for s, b, _t in points], key
        assert [t for (_s, _b, t), (_s2, _b2, want) in zip(got, points, strict=True) if want is not None] == [
            want for _s, _b, want in points if want is not None
        ], key


async def _wait_for(condition: Any) -> None:
    with anyio.fail_after(WAIT):
        while not condition():  # noqa: ASYNC110 - the writer sets no event when it packs: poll
            await anyio.sleep(0.005)


async def _stall(buffer: Buffer, sink: GateSink) -> None:
    """Log one point and a step boundary, so that the writer takes a first slice and the sink holds it."""
    buffer.log_metric("first", 1.0, step=-1)
    buffer.log_metric("first", 2.0, step=-2)  # a step boundary wakes the writer
    with anyio.fail_after(WAIT):
        assert await anyio.to_thread.run_sync(sink.entered.wait, WAIT)


@pytest.mark.anyio
@pytest.mark.usefixtures("quick_stall")
@pytest.mark.parametrize("with_healthy", [False, True], ids=["one stalled sink", "stalled and healthy sinks"])
async def test_a_stalled_sinks_backlog_is_packed_and_written_bit_for_bit_once_released(with_healthy: bool) -> None:
    """Slices behind a stalled sink's head are packed, counts stay, and on release every point is written in order."""
    stalled = GateSink()
    healthy = MemorySink()
    sinks: list[Sink] = [stalled, healthy] if with_healthy else [stalled]
    expected: dict[str, list[tuple[int, int, int | None]]] = {"first": [(-1, _bits(1.0), None), (-2, _bits(2.0), None)]}
    async with running(sinks) as (buffer, writer):
        await _stall(buffer, stalled)
        for round_ in range(3):
            _log_round(lambda k, v, s, t: buffer.log_metric(k, v, step=s, timestamp=t), round_, expected)
            await _wait_for(lambda r=round_: writer.packs >= r + 1)
        total = sum(map(len, expected.values()))
        works = list(writer._works)
        assert works[0].packed is None  # the slice the sink is writing is never packed
        assert all(w.packed is not None for w in works[1:])
        assert all(w.metrics == [] for w in works[1:])
        stats = writer.stats()
        assert (stats.logged, stats.queued, stats.written) == (total, total, 0)
        assert writer.unwritten_summary().startswith(f"{total} metric points")
        if with_healthy:
            _assert_written(healthy, expected)  # the healthy sink wrote them before they were packed
        stalled.gate.set()
        await writer.barrier()
        _assert_written(stalled, expected)
        stats = writer.stats()
        assert (stats.logged, stats.queued, stats.written) == (total, 0, total)
        assert not writer.pending


@pytest.mark.anyio
@pytest.mark.usefixtures("quick_stall")
async def test_a_failing_sinks_backlog_is_packed_and_written_bit_for_bit_once_it_recovers() -> None:
    """Behind a sink in backoff after transient errors the backlog is packed; once it recovers all comes in order."""
    sink = FlakySink(errno.EIO)
    expected: dict[str, list[tuple[int, int, int | None]]] = {}
    async with running([sink]) as (buffer, writer):
        buffer.log_metric("first", 1.0, step=-1)
        buffer.log_metric("first", 2.0, step=-2)
        expected["first"] = [(-1, _bits(1.0), None), (-2, _bits(2.0), None)]
        await _wait_for(lambda: sink.attempts >= 1)
        for round_ in range(3):
            _log_round(lambda k, v, s, t: buffer.log_metric(k, v, step=s, timestamp=t), round_, expected)
            await _wait_for(lambda r=round_: writer.packs >= r + 1)
        total = sum(map(len, expected.values()))
        assert writer.stats().queued == total
        sink.failing = False
        await writer.barrier()
        _assert_written(sink, expected)
        assert (writer.stats().written, writer.stats().queued) == (total, 0)


class SlowSyncSink(MemorySink):
    """A sync sink (run on a thread) whose first write waits until the writer holds a backlog behind it."""

    def __init__(self) -> None:
        super().__init__()
        self.writer: Writer | None = None
        self.backlog_seen = 0
        self.entered = threading.Event()

    def write(self, batch: Batch) -> None:  # type: ignore[override]  # a plain write: the writer runs it on a thread
        assert self.writer is not None
        if not self.entered.is_set():  # well within the stall threshold the test sets: a healthy, slowish sink
            self.entered.set()
            deadline = time.monotonic() + 2.0
            while len(self.writer._works) < 3 and time.monotonic() < deadline:
                time.sleep(0.001)
        self.backlog_seen = max(self.backlog_seen, len(self.writer._works))
        self.write_sync(batch)


@pytest.mark.anyio
async def test_a_healthy_writer_never_packs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sink that keeps up, even with slices queued behind the one it writes, never gets its backlog packed."""
    # its first write waits up to 2 s for a backlog: a stall threshold well above that
    monkeypatch.setattr("steplog._writer._STALL_MIN", 10.0)
    sink = SlowSyncSink()
    async with running([sink], flush_interval=0.001) as (buffer, writer):
        sink.writer = writer

        def log_steps(first: int, last: int) -> None:
            for step in range(first, last):
                buffer.log_metrics({"a": step * 0.5, "b": step * 0.25}, step=step)

        with anyio.fail_after(WAIT):
            log_steps(0, 100)
            assert await anyio.to_thread.run_sync(sink.entered.wait, WAIT)  # the first write holds on
            await anyio.to_thread.run_sync(log_steps, 100, 20_000)  # slices queue up behind it meanwhile
            await writer.barrier()
        assert sink.values("a") == [step * 0.5 for step in range(20_000)]
    assert sink.backlog_seen >= 2  # there was a backlog to pack
    assert writer.packs == 0


@pytest.mark.anyio
@pytest.mark.usefixtures("quick_stall")
async def test_a_packed_backlog_takes_well_under_the_list_form_per_record() -> None:
    """Packed, a stalled sink's backlog of fresh floats and steps takes under 32 bytes a record (the list form: ~50)."""
    sink = GateSink()
    keys = [f"key{i}" for i in range(20)]
    steps = 1000
    async with running([sink]) as (buffer, writer):
        await _stall(buffer, sink)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for step in range(1000, 1000 + steps):
                for i, key in enumerate(keys):
                    buffer.log_metric(key, step * 0.001 + i, step)  # fresh floats, fresh step ints
            await _wait_for(lambda: writer.packs >= 1 and not buffer.queued_by_key())
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        per_record = (after - before) / (steps * len(keys))
        assert per_record < 32
        sink.gate.set()
        await writer.barrier()
        assert sink.values("key3") == [step * 0.001 + 3 for step in range(1000, 1000 + steps)]


@pytest.mark.usefixtures("quick_stall")
def test_close_writes_a_packed_backlog_through_the_sinks_sync_path() -> None:
    """close() giving up on a stalled sink writes its whole backlog, packed slices included, through write_sync."""
    sink = GateSink()
    run = steplog.start_run("backlog", sinks=[sink], handle_signals=False, flush_interval=0.01)
    writer: Writer = run._writer
    expected: dict[str, list[tuple[int, int, int | None]]] = {"first": [(-1, _bits(1.0), None), (-2, _bits(2.0), None)]}
    try:
        run.log_metric("first", 1.0, step=-1)
        run.log_metric("first", 2.0, step=-2)
        assert sink.entered.wait(WAIT)
        for round_ in range(2):
            _log_round(lambda k, v, s, t: run.log_metric(k, v, step=s, timestamp=t), round_, expected)
            deadline = time.monotonic() + WAIT
            while writer.packs < round_ + 1 and time.monotonic() < deadline:
                time.sleep(0.005)
        assert writer.packs >= 2
        with pytest.raises(FlushTimeoutError):  # the stalled write never returned
            run.close(timeout=0.5)
        _assert_written(sink, expected)
        assert sink.status is RunStatus.FINISHED
    finally:
        sink.gate.set()


@pytest.mark.anyio
@pytest.mark.usefixtures("quick_stall")
async def test_the_emergency_path_writes_a_packed_backlog() -> None:
    """emergency_flush() (no event loop can run) restores packed slices and writes every point through write_sync."""
    sink = GateSink()
    expected: dict[str, list[tuple[int, int, int | None]]] = {"first": [(-1, _bits(1.0), None), (-2, _bits(2.0), None)]}
    async with running([sink]) as (buffer, writer):
        await _stall(buffer, sink)
        _log_round(lambda k, v, s, t: buffer.log_metric(k, v, step=s, timestamp=t), 0, expected)
        await _wait_for(lambda: writer.packs >= 1)
        _log_round(lambda k, v, s, t: buffer.log_metric(k, v, step=s, timestamp=t), 1, expected)  # still in the buffer
        writer.emergency_flush(RunStatus.KILLED, 123, timeout=WAIT)  # blocks this loop: the writer cannot run
        _assert_written(sink, expected)
        assert (sink.status, sink.end_time) == (RunStatus.KILLED, 123)
        assert not writer.pending


class KeepingSink(MemorySink):
    """Acknowledges a batch at once and reads it later (a sink handing batches to an uploader of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[Batch] = []

    async def write(self, batch: Batch) -> None:
        self.kept.append(batch)

    def kept_points(self) -> int:
        return sum(len(column.steps) for batch in self.kept for column in batch.metric_columns())


@pytest.mark.anyio
@pytest.mark.usefixtures("quick_stall")
async def test_packing_a_stalled_sinks_backlog_leaves_the_batch_another_sink_kept_intact() -> None:
    """A sink that kept a Batch it acknowledged still reads every point of it while another sink's backlog is packed."""
    stalled = GateSink()
    keeping = KeepingSink()
    async with running([stalled, keeping]) as (buffer, writer):
        try:
            buffer.log_metric("first", 1.0, step=-1)
            buffer.log_metric("first", 2.0, step=-2)
            assert await anyio.to_thread.run_sync(stalled.entered.wait, WAIT)
            for step in range(100):
                buffer.log_metric("loss", float(step), step=step)
            await _wait_for(lambda: len(keeping.kept) >= 2 and writer.packs >= 1)
            assert keeping.kept_points() == 102  # the packed slice's list was once emptied under the sink
        finally:
            stalled.gate.set()
