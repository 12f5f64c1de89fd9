"""The writer (``_writer.py``) driven directly in the test's event loop: no thread, no run.

A Buffer and sinks at the Sink seam, the writer as a task of the test's task group, and the
buffer-writer contract of ``_writer``'s docstring checked from outside: what the sinks got,
``stats()``, ``pending``, ``lost`` and ``raise_if_unwritten()``. Every test runs on asyncio and trio.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import pytest

from _sinks import WAIT, FlakySink, GateSink
from steplog import InvalidValueError, RunStatus, WriteError
from steplog._buffer import Buffer
from steplog._hosting import attach_writer
from steplog._portal import loop_scheduler
from steplog._writer import Writer
from steplog.testing import MemorySink
from steplog.typing import Batch, PermanentWriteError, RunRequest, Sink

pytestmark = pytest.mark.anyio

REQUEST = RunRequest(experiment_name="unit", run_name="writer", tags={}, start_time=0, user_id="tester")


class SignalSink(MemorySink):
    """A MemorySink that sets ``written`` (an anyio event, in the writer's loop) after each write."""

    def __init__(self) -> None:
        super().__init__()
        self.written = anyio.Event()

    async def write(self, batch: Batch) -> None:
        self.write_sync(batch)
        self.written.set()


class ReleasedSink(GateSink):
    """A GateSink that sets ``finished`` (a thread event) once a write it let through has returned."""

    def __init__(self) -> None:
        super().__init__()
        self.finished = threading.Event()

    async def write(self, batch: Batch) -> None:
        await super().write(batch)
        self.finished.set()


class RefusingSink(MemorySink):
    """A MemorySink that refuses the metric ``bad`` for good and writes everything else."""

    def write_sync(self, batch: Batch) -> None:
        if "bad" in {column.key for column in batch.metric_columns()}:
            raise PermanentWriteError("metric 'bad' cannot be written (injected)", entry=("metric", "bad"))
        super().write_sync(batch)


@asynccontextmanager
async def running(
    sinks: Sequence[Sink], *, flush_interval: float = 60.0, sink_timeout: float | None = None
) -> AsyncIterator[tuple[Buffer, Writer]]:
    """A buffer and a started writer in the current loop, wired as a run wires them; stopped on exit."""
    buffer = Buffer()
    writer = Writer(buffer, sinks, flush_interval=flush_interval, sink_timeout=sink_timeout)
    async with anyio.create_task_group() as tg:
        attach_writer(buffer, writer, loop_scheduler(), loop_thread=threading.get_ident())
        await writer.open(REQUEST)
        await tg.start(writer.run)
        try:
            yield buffer, writer
        finally:
            with anyio.fail_after(WAIT):
                await writer.stop()


async def test_records_logged_through_the_buffer_reach_the_sink_at_a_barrier() -> None:
    """After barrier(), the sink holds every point, param and tag logged before it, and nothing is pending."""
    sink = MemorySink()
    async with running([sink]) as (buffer, writer):
        buffer.log_metric("loss", 0.5, step=0)
        buffer.log_metrics({"loss": 0.25, "acc": 0.75}, step=1)
        buffer.log_params({"lr": 0.1})
        buffer.set_tags({"team": "a"})
        await writer.barrier()
        assert sink.values("loss") == [0.5, 0.25]
        assert sink.steps("loss") == [0, 1]
        assert sink.values("acc") == [0.75]
        assert sink.params == {"lr": "0.1"}
        assert sink.tags == {"team": "a"}
        assert not writer.pending
        stats = writer.stats()
        assert (stats.logged, stats.written, stats.queued, stats.lost, stats.errors) == (3, 3, 0, 0, 0)
        assert stats.flushes >= 1
        writer.raise_if_unwritten()  # nothing unwritten: no error


async def test_the_first_sink_names_the_run_and_the_others_join_it() -> None:
    """open() returns the first sink's identity and hands its run id to every other sink."""
    first, second = MemorySink(), MemorySink()
    async with running([first, second]) as (_buffer, writer):
        assert writer.info is not None
        assert first.request is not None
        assert first.request.run_id is None
        assert second.request is not None
        assert second.request.run_id == writer.info.run_id


async def test_a_step_boundary_wakes_the_sleeping_writer_without_a_barrier() -> None:
    """With a long flush_interval, a new step logged while the writer sleeps makes it write at once."""
    sink = SignalSink()
    async with running([sink], flush_interval=60.0) as (buffer, _writer):
        await anyio.wait_all_tasks_blocked()  # the writer has done its first cycle and sleeps
        assert buffer.asleep
        buffer.log_metric("x", 1.0, step=1)  # a step boundary
        with anyio.fail_after(WAIT):
            await sink.written.wait()
        assert sink.values("x") == [1.0]


async def test_a_held_slice_counts_as_queued_until_the_sink_acknowledges_it() -> None:
    """While the sink's write is in flight, stats() counts the points as queued and pending is True."""
    sink = GateSink()
    async with running([sink]) as (buffer, writer):
        buffer.log_metrics({"a": 1.0, "b": 2.0}, step=0)
        buffer.log_metric("a", 3.0, step=1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.barrier)
            with anyio.fail_after(WAIT):
                await anyio.to_thread.run_sync(sink.entered.wait, WAIT)
            assert writer.pending
            stats = writer.stats()
            assert (stats.logged, stats.written, stats.queued) == (3, 0, 3)
            assert buffer.queued() == 3  # the buffer's room counts what the writer holds
            sink.gate.set()
        assert not writer.pending
        stats = writer.stats()
        assert (stats.logged, stats.written, stats.queued) == (3, 3, 0)
        assert buffer.queued() == 0


async def test_a_slow_sink_does_not_hold_back_another_but_its_backlog_still_counts() -> None:
    """One sink writes while another is stuck; the slice stays queued (and pending) until the slow one finishes."""
    slow, fast = GateSink(), SignalSink()
    async with running([slow, fast]) as (buffer, writer):
        buffer.log_metric("x", 1.0, step=0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.barrier)
            with anyio.fail_after(WAIT):
                await fast.written.wait()
            assert fast.values("x") == [1.0]
            assert slow.values("x") == []
            assert writer.pending
            assert writer.stats().queued == 1
            assert writer.stats().written == 0
            slow.gate.set()
        assert slow.values("x") == [1.0]
        assert (writer.stats().written, writer.stats().queued) == (1, 0)


async def test_a_barrier_names_a_sink_stuck_past_sink_timeout() -> None:
    """barrier() raises WriteError naming the sink that did not acknowledge within sink_timeout; the data is kept."""
    sink = ReleasedSink()
    async with running([sink], sink_timeout=0.2) as (buffer, writer):
        buffer.log_metric("x", 1.0, step=0)
        with anyio.fail_after(WAIT), pytest.raises(WriteError, match=r"sink ReleasedSink#0 did not acknowledge"):
            await writer.barrier()
        assert writer.pending
        assert writer.stats().queued == 1
        sink.gate.set()
        await anyio.to_thread.run_sync(sink.finished.wait, WAIT)  # the write goes on and returns
        await writer.barrier()
        assert sink.values("x") == [1.0]
        assert not writer.pending


class ThreadSignalSink(MemorySink):
    """A MemorySink that sets ``wrote`` (a thread event) after each write."""

    def __init__(self) -> None:
        super().__init__()
        self.wrote = threading.Event()

    def write_sync(self, batch: Batch) -> None:
        super().write_sync(batch)
        self.wrote.set()


async def test_stats_count_every_point_once_while_the_writer_drains_concurrently() -> None:
    """A thread logging while the writer drains sees stats().logged equal to exactly what it has logged, every time."""
    sink = ThreadSignalSink()
    n, chunk = 5000, 500
    async with running([sink], flush_interval=0.0) as (buffer, writer):

        def log_and_count() -> list[tuple[int, int]]:
            wrong: list[tuple[int, int]] = []
            for i in range(n):
                buffer.log_metrics({"a": float(i), "b": float(i)}, step=i)  # a step boundary wakes the writer
                if i % 10 == 0:
                    logged = writer.stats().logged
                    if logged != 2 * (i + 1):
                        wrong.append((2 * (i + 1), logged))
                if i % chunk == chunk - 1:  # let the writer take a slice mid-way, whatever the scheduling
                    sink.wrote.clear()
                    assert sink.wrote.wait(WAIT)
            return wrong

        with anyio.fail_after(WAIT):
            wrong = await anyio.to_thread.run_sync(log_and_count)
            await writer.barrier()
        assert wrong == []
        stats = writer.stats()
        assert (stats.logged, stats.written, stats.queued) == (2 * n, 2 * n, 0)
        assert stats.flushes >= n // chunk  # the writer drained while the thread logged
        assert sink.values("a") == [float(i) for i in range(n)]


async def test_a_transient_failure_is_kept_raised_at_the_barrier_and_retried() -> None:
    """A failing write raises WriteError (with its OS error) at the barrier; the data is kept for a later barrier."""
    sink = FlakySink()
    async with running([sink]) as (buffer, writer):
        buffer.log_metric("x", 1.0, step=0)
        with pytest.raises(WriteError, match="No space left") as caught:
            await writer.barrier()
        assert caught.value.errno == errno.ENOSPC
        assert writer.pending
        assert isinstance(writer.last_error, OSError)
        with pytest.raises(WriteError, match="No space left"):
            writer.raise_if_unwritten()
        stats = writer.stats()
        assert (stats.written, stats.queued, stats.lost) == (0, 1, 0)
        assert stats.retries >= 1
        assert stats.errors >= 1
        assert stats.last_error is not None
        assert "No space left" in stats.last_error
        sink.failing = False
        await writer.barrier()  # the barrier retries now, not after the backoff
        assert sink.values("x") == [1.0]
        assert not writer.pending
        writer.raise_if_unwritten()
        assert (writer.stats().written, writer.stats().queued) == (1, 0)
        assert writer.lost == 0


async def test_an_entry_refused_for_good_is_dropped_counted_and_reported_once() -> None:
    """A PermanentWriteError drops only its entry (counted in lost), the rest is written, and it is raised once."""
    sink = RefusingSink()
    async with running([sink]) as (buffer, writer):
        buffer.log_metrics({"good": 1.0, "bad": 2.0}, step=0)
        with pytest.raises(WriteError, match="refused for good"):
            await writer.barrier()
        assert sink.values("good") == [1.0]
        assert "bad" not in sink.metrics
        assert writer.lost == 1
        assert not writer.pending
        stats = writer.stats()
        assert (stats.logged, stats.written, stats.queued, stats.lost) == (2, 1, 0, 1)
        writer.raise_if_unwritten()  # reported once: no second error
        await writer.barrier()


async def test_stop_writes_everything_and_ends_the_writer() -> None:
    """stop() writes what is queued and ends the loop; close_sinks records the status; a later barrier returns."""
    sink = MemorySink()
    async with running([sink]) as (buffer, writer):
        assert writer.alive
        buffer.log_metric("x", 1.0, step=0)
        with anyio.fail_after(WAIT):
            await writer.stop()
        assert not writer.alive
        assert sink.values("x") == [1.0]
        assert not writer.pending
        await writer.barrier()  # the writer has stopped: returns at once, nothing unwritten
        end = int(time.time() * 1000)
        await writer.close_sinks(RunStatus.FINISHED, end)
        assert (sink.status, sink.end_time) == (RunStatus.FINISHED, end)


async def test_emergency_flush_writes_through_the_sync_path_without_the_writer_task() -> None:
    """emergency_flush() drains the buffer and writes it with write_sync/close_sync, while the writer task never ran."""
    buffer = Buffer()
    sink = MemorySink()
    writer = Writer(buffer, [sink], flush_interval=60.0)
    await writer.open(REQUEST)
    buffer.log_metric("x", 1.0, step=0)
    buffer.log_params({"p": "v"})
    assert not writer.started
    writer.emergency_flush(RunStatus.KILLED, 123, timeout=WAIT)
    assert sink.values("x") == [1.0]
    assert sink.params == {"p": "v"}
    assert (sink.status, sink.end_time) == (RunStatus.KILLED, 123)
    assert not writer.pending
    assert (writer.stats().written, writer.stats().queued) == (1, 0)


def test_a_writer_without_sinks_is_refused_clearly() -> None:
    """Writer(buffer, []) raises InvalidValueError saying a run needs a sink (no IndexError later)."""
    with pytest.raises(InvalidValueError, match="at least one sink"):
        Writer(Buffer(), [], flush_interval=1.0)


async def test_a_big_drain_comes_in_parts_and_the_event_loop_runs_between_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A drain larger than one part lets other tasks run between parts; every point still arrives once, in order."""
    from steplog import _writer

    monkeypatch.setattr(_writer, "_DRAIN_PART", 3 * 5)  # five points a part
    parts: list[int] = []
    ticks = 0
    real = Buffer.drain_part

    def spy(self: Buffer, start: int, budget: int | None) -> tuple[object, ...]:
        parts.append(ticks)  # how often the other task had run when this part began
        return real(self, start, budget)

    monkeypatch.setattr(Buffer, "drain_part", spy)

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    sink = MemorySink()
    async with running([sink]) as (buffer, writer), anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        for step in range(12):
            buffer.log_metrics({f"k{i}": step + i / 10 for i in range(8)}, step=step)
        await writer.barrier()
        tg.cancel_scope.cancel()
        for i in range(8):
            assert sink.steps(f"k{i}") == list(range(12))
            assert sink.values(f"k{i}") == [step + i / 10 for step in range(12)]
        stats = writer.stats()
        assert (stats.logged, stats.written, stats.queued) == (96, 96, 0)
    assert len(parts) >= 8  # 96 points at most ~12 a part (one key's column is taken whole)
    assert parts == sorted(parts)
    assert parts[-1] > parts[0]


def test_drain_parts_take_every_key_once_and_count_what_they_took() -> None:
    """drain_part() walks the keys from a cursor; what it took stays counted in queued() until set_pending()."""
    buffer = Buffer()
    for step in range(4):
        buffer.log_metrics({"a": 1.0, "b": 2.0, "c": 3.0}, step=step)
    first, _events, rest = buffer.drain_part(0, 4 * 3)
    assert [key for key, _items in first] == ["a"]
    assert rest == 1
    assert buffer.queued() == 12
    second, _events, rest = buffer.drain_part(rest, None)
    assert [key for key, _items in second] == ["b", "c"]
    assert rest is None
    assert buffer.queued() == 12
    buffer.set_pending(12)  # the writer counts them now (its own source reports 0 here)
    assert buffer.queued() == 0


# --------------------------------------------------------------------------- the switch interval


@pytest.fixture
def user_interval() -> Iterator[float]:
    """The interpreter's switch interval set to Python's default for the test, and put back after."""
    import sys

    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield 0.005
    sys.setswitchinterval(before)


def test_a_write_cycle_lowers_the_switch_interval_and_puts_the_users_back(user_interval: float) -> None:
    """0.5 ms for a writer on its own thread while it writes; the user's value after the last cycle."""
    import sys

    from steplog._writer import _eager_switching

    with _eager_switching(0.0005):
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        with _eager_switching(0.0002):  # a writer in an event loop asks for less: the smallest holds
            assert sys.getswitchinterval() == pytest.approx(0.0002)
        assert sys.getswitchinterval() == pytest.approx(0.0002)
    assert sys.getswitchinterval() == pytest.approx(user_interval)


def test_a_users_own_switch_interval_is_never_overwritten(user_interval: float) -> None:
    """A value the user sets during a cycle stays; a user's interval already short is never touched."""
    import sys

    from steplog._writer import _eager_switching

    with _eager_switching(0.0005):
        sys.setswitchinterval(0.001)
    assert sys.getswitchinterval() == pytest.approx(0.001)
    sys.setswitchinterval(0.0001)
    with _eager_switching(0.0005):
        assert sys.getswitchinterval() == pytest.approx(0.0001)
    assert sys.getswitchinterval() == pytest.approx(0.0001)
    assert user_interval == 0.005


async def test_a_writer_in_the_callers_loop_asks_for_the_shorter_interval() -> None:
    """The writer of an async run (the buffer knows its loop thread) asks for 0.2 ms; a thread-hosted one for 0.5 ms."""
    async with running([MemorySink()]) as (buffer, writer):
        assert buffer.loop_thread is not None
        assert writer._switch_interval() == pytest.approx(0.0002)
        buffer.loop_thread = None
        assert writer._switch_interval() == pytest.approx(0.0005)


async def test_the_emergency_path_writes_a_drain_in_progress_before_newer_points_of_the_same_key() -> None:
    """Parts of a drain the signal interrupted come first, merged with the key's newer points: each once, in order."""
    sink = MemorySink()
    async with running([sink]) as (buffer, writer):
        buffer.log_metric("a", 0.0, step=0)
        buffer.log_metric("a", 1.0, step=1)
        metrics, events, rest = buffer.drain_part(0, None)  # what a drain in progress holds
        assert rest is None
        writer._draining += metrics
        writer._draining_events += events
        buffer.log_metric("a", 2.0, step=2)  # logged after that part was taken
        buffer.log_metric("b", 3.0, step=2)
        writer.emergency_flush(None, 0)  # in the loop's own thread, as a signal handler runs: no task runs meanwhile
        assert sink.steps("a") == [0, 1, 2]
        assert sink.values("a") == [0.0, 1.0, 2.0]
        assert sink.values("b") == [3.0]


async def test_a_signal_landing_while_the_loop_holds_the_count_lock_still_writes_everything() -> None:
    """A handler on a thread holding the count lock (the writer's loop mid-drain) writes in place, not on a thread
    that would wait for that lock until the timeout."""
    sink = MemorySink()
    async with running([sink]) as (buffer, writer):
        buffer.log_metric("a", 1.0, step=0)
        buffer.log_metric("a", 2.0, step=1)
        with buffer.count_lock:  # where the signal interrupted the loop
            writer.emergency_flush(None, 0, timeout=0.5)
        assert sink.values("a") == [1.0, 2.0]
        assert writer.last_error is None
