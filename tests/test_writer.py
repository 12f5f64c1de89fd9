"""The background writer (``_writer.py``): barriers, step-boundary writes, coalescing, retries, backpressure.

Faults are injected at the Sink seam: sinks that fail or hold a write until the test lets it go.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import steplog
from _sinks import WAIT, GateSink
from steplog import BufferFullError, FlushTimeoutError, WriteError
from steplog.testing import MemorySink
from steplog.typing import Batch, Sink


class FailingSink(MemorySink):
    """A MemorySink whose next ``failures`` writes raise OSError before writing anything."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts = 0

    def write_sync(self, batch: Batch) -> None:
        self.attempts += 1
        if self.failures > 0:
            self.failures -= 1
            raise OSError(28, "No space left on device (injected)")
        super().write_sync(batch)


class SignalSink(MemorySink):
    """A MemorySink that sets ``written`` after each write."""

    def __init__(self) -> None:
        super().__init__()
        self.written = threading.Event()

    def write_sync(self, batch: Batch) -> None:
        super().write_sync(batch)
        self.written.set()


def run_with(sink: Sink, **options: object) -> steplog.Run:
    """A sync run writing only to ``sink``."""
    return steplog.start_run("writer", sinks=[sink], **options)  # type: ignore[arg-type]


def test_sinks_satisfy_the_protocol() -> None:
    """MemorySink and the test sinks are Sinks (structural protocol, no base class)."""
    assert isinstance(MemorySink(), Sink)
    assert isinstance(GateSink(), Sink)


def test_flush_is_a_barrier() -> None:
    """After flush() returns, everything logged before it is in the sink, with a long flush_interval too."""
    sink = MemorySink()
    with run_with(sink, flush_interval=60.0) as run:
        for round_ in range(5):
            run.log_metrics({"a": float(round_), "b": -float(round_)})
            run.log_param(f"p{round_}", round_)
            run.flush()
            assert [float(i) for i in range(round_ + 1)] == sink.values("a")
            assert f"{round_}" == sink.params[f"p{round_}"]


def test_a_step_boundary_is_written_without_a_barrier() -> None:
    """A new step wakes the writer: the previous step reaches the sink without any flush() or close()."""
    sink = SignalSink()
    with run_with(sink, flush_interval=0.05) as run:
        run.log_metric("loss", 1.0, step=0)
        run.log_metric("loss", 0.5, step=1)
        assert sink.written.wait(WAIT), "the writer never wrote the finished step"
        assert (0, 1.0) == (sink.metrics["loss"][0].step, sink.metrics["loss"][0].value)


def test_records_without_a_new_step_are_written_every_flush_interval() -> None:
    """Records of one long step are written by the timer too, not only at boundaries or barriers."""
    sink = SignalSink()
    with run_with(sink, flush_interval=0.05) as run:
        run.log_metric("loss", 1.0)
        assert sink.written.wait(WAIT), "the writer never wrote the pending records"
        assert [1.0] == sink.values("loss")


def test_fast_steps_are_coalesced_into_few_writes() -> None:
    """Thousands of fast steps between two barriers are written in a few batches, not one write per step."""
    sink = MemorySink()
    with run_with(sink, flush_interval=60.0) as run:
        run.flush()
        writes_before = sink.writes
        for step in range(5000):
            run.log_metrics({"a": 1.0, "b": 2.0}, step=step)
        run.flush()
        # the first boundary may wake the sleeping writer once; the barrier writes the rest
        assert sink.writes - writes_before <= 2
    assert 5000 == len(sink.values("a"))


def test_a_failed_write_is_raised_at_the_barrier_and_retried_in_order() -> None:
    """A sink failure is kept: flush() raises WriteError naming the cause; the retry writes all once, in order."""
    sink = FailingSink(failures=1)
    with run_with(sink, flush_interval=60.0) as run:
        run.log_metric("x", 1.0, step=0)
        run.log_param("p", "v")
        with pytest.raises(WriteError, match="No space left on device") as caught:
            run.flush()
        assert "1 metric points" in str(caught.value)
        run.log_metric("x", 2.0, step=1)
        run.flush()  # the retry succeeds: no error any more
        stats = run.stats()
    assert [1.0, 2.0] == sink.values("x")
    assert {"p": "v"} == sink.params
    assert (1, 2, 0) == (stats.errors, stats.written, stats.queued)
    assert stats.retries >= 1
    assert "No space left on device" in (stats.last_error or "")


def test_close_with_a_sink_that_keeps_failing_is_bounded() -> None:
    """close(timeout=...) with a sink that never recovers returns in bounded time, raising what is unwritten."""
    sink = FailingSink(failures=10**9)
    run = run_with(sink, flush_interval=0.01)
    run.log_metric("x", 1.0)
    raised: list[BaseException] = []

    def close() -> None:
        try:
            run.close(timeout=0.5)
        except BaseException as exc:
            raised.append(exc)

    closer = threading.Thread(target=close)
    closer.start()
    closer.join(WAIT)
    assert not closer.is_alive(), "close(timeout=0.5) did not return"
    assert 1 == len(raised)
    assert isinstance(raised[0], (WriteError, FlushTimeoutError))
    assert "1 metric points" in str(raised[0])
    assert run.closed
    assert sink.attempts >= 1
    assert [] == sink.values("x")


def for_each(items: range, call: Callable[[int], None]) -> None:
    """Call ``call`` on each item (one statement for pytest.warns)."""
    for item in items:
        call(item)


def stall(sink: GateSink, run: steplog.Run) -> None:
    """Log one point and wait until the writer has taken it and is stuck writing it."""
    run.log_metric("x", -1.0)
    assert sink.entered.wait(WAIT), "the writer never started writing"


def test_on_full_raise() -> None:
    """With on_full="raise", the run holds at most max_buffer records (the writer's included); one more raises."""
    sink = GateSink()
    run = run_with(sink, max_buffer=10, on_full="raise", flush_interval=0.01)
    try:
        stall(sink, run)  # the writer holds 1 record
        for i in range(9):
            run.log_metric("x", float(i))
        with pytest.raises(BufferFullError, match="the buffer is full \\(10 records\\)"):
            run.log_metric("x", 9.0)
        assert 10 == run.stats().queued
    finally:
        sink.gate.set()
        run.close()
    assert [-1.0] + [float(i) for i in range(9)] == sink.values("x")


def test_on_full_raise_counts_every_key() -> None:
    """max_buffer bounds the records of all keys together, not of each key."""
    sink = GateSink()
    run = run_with(sink, max_buffer=10, on_full="raise", flush_interval=0.01)
    try:
        stall(sink, run)
        with pytest.raises(BufferFullError):
            for_each(range(100), lambda i: run.log_metric(f"k{i % 20}", float(i)))
        assert 10 == run.stats().queued
    finally:
        sink.gate.set()
        run.close()
    assert 10 == sum(len(points) for points in sink.metrics.values())


def test_on_full_drop_counts_and_warns_once() -> None:
    """With on_full="drop", records logged into a full buffer are dropped, counted in stats(), and warned about once."""
    sink = GateSink()
    run = run_with(sink, max_buffer=10, on_full="drop", flush_interval=0.01)
    try:
        stall(sink, run)
        with pytest.warns(RuntimeWarning, match="on_full='drop'") as warned:
            for_each(range(25), lambda i: run.log_metric("x", float(i)))
        assert 1 == len(warned)
    finally:
        sink.gate.set()
        run.close()
    stats = run.stats()
    assert (26, 10, 0, 16) == (stats.logged, stats.written, stats.queued, stats.dropped)
    assert [-1.0] + [float(i) for i in range(9)] == sink.values("x")


def test_on_full_block_waits_and_loses_nothing() -> None:
    """With on_full="block", a logging thread waits for the writer when the buffer is full and nothing is lost."""
    sink = GateSink()
    run = run_with(sink, max_buffer=10, on_full="block", flush_interval=0.01)
    done = threading.Event()

    def log() -> None:
        for i in range(50):
            run.log_metric("x", float(i), step=i)
        done.set()

    with run:
        logger = threading.Thread(target=log)
        logger.start()
        assert sink.entered.wait(WAIT)
        assert not done.wait(0.2), "the logging thread did not wait for the stalled writer"
        sink.gate.set()
        assert done.wait(WAIT)
        logger.join()
    assert [float(i) for i in range(50)] == sink.values("x")
    assert 0 == run.stats().dropped


def test_flush_timeout_names_what_is_unwritten_and_the_run_goes_on() -> None:
    """flush(timeout=...) on a stalled writer raises FlushTimeoutError naming what is unwritten; later flushes work."""
    sink = GateSink()
    with run_with(sink, flush_interval=0.01) as run:
        stall(sink, run)
        run.log_metric("x", 1.0)
        with pytest.raises(FlushTimeoutError, match=re.escape("flush() timed out after 0.2 s with 2 metric points")):
            run.flush(timeout=0.2)
        sink.gate.set()
        run.log_metric("x", 2.0)
        run.flush(timeout=WAIT)
        assert [-1.0, 1.0, 2.0] == sink.values("x")


@pytest.mark.anyio
async def test_aflush_timeout(anyio_backend: str) -> None:
    """await aflush(timeout=...) on a stalled writer raises FlushTimeoutError without blocking the loop."""
    sink = GateSink()
    async with steplog.start_run("async", sinks=[sink], flush_interval=0.01) as run:
        run.log_metric("x", -1.0)
        with pytest.raises(FlushTimeoutError, match=re.escape("timed out after 0.2 s")):
            await run.aflush(timeout=0.2)
        sink.gate.set()
        await run.aflush()
        assert [-1.0] == sink.values("x")


@pytest.mark.anyio
async def test_records_logged_before_astart_wait_in_the_buffer(anyio_backend: str) -> None:
    """In async code, records logged before the writer starts wait in the buffer and are written after astart()."""
    sink = MemorySink()
    run = steplog.start_run("early", sinks=[sink])
    run.log_metric("x", 1.0, step=0)
    run.log_param("p", 1)
    assert 1 == run.stats().queued
    await run.astart()
    await run.aflush()
    assert [1.0] == sink.values("x")
    assert {"p": "1"} == sink.params
    run.log_metric("x", 2.0, step=1)
    await run.aclose()
    assert [1.0, 2.0] == sink.values("x")
    assert steplog.RunStatus.FINISHED == sink.status


@pytest.mark.anyio
async def test_async_writer_coalesces_and_never_blocks_the_loop(anyio_backend: str) -> None:
    """In async hosting, a loop that never awaits still gets its steps written at the next barrier, in order."""
    sink = MemorySink()
    async with steplog.start_run("async", sinks=[sink], flush_interval=60.0) as run:
        for step in range(2000):
            run.log_metric("x", float(step), step=step)
        await run.aflush()
        assert 2000 == len(sink.values("x"))
        assert sink.writes <= 2
    assert [float(s) for s in range(2000)] == sink.values("x")


def test_every_sink_gets_the_same_data(tmp_path: Path) -> None:
    """With a local store and an extra sink, both receive every point, param and tag."""
    extra = MemorySink()
    with steplog.start_run("two", tracking_uri=tmp_path / "mlruns", sinks=[extra]) as run:
        run.log_metric("x", 1.5, step=2)
        run.log_param("p", "v")
        run.set_tag("t", "w")
    store = steplog.Store(tmp_path / "mlruns")
    assert [1.5] == list(store.metric_history(run.run_id, "x").values)
    assert [1.5] == extra.values("x")
    assert {"p": "v"} == extra.params
    assert "w" == extra.tags["t"]
    assert extra.request is not None
    assert run.run_id == extra.request.run_id
