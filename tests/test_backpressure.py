"""Backpressure with a stalled sink: memory bounded by max_buffer; block, drop and raise each do what they say.

The sink stalls each write on a gate (in a worker thread, so the writer's event loop stays free)
until the test opens it; meanwhile the buffer fills up to ``max_buffer`` and ``on_full`` applies.
"""

from __future__ import annotations

import threading
import time
import tracemalloc
import warnings

import pytest

import steplog
from _sinks import GateSink
from steplog import BufferFullError

KEYS = ("loss", "acc", "lr", "grad/norm")


def wait_until(condition: object, what: str, timeout: float = 20.0) -> None:
    """Poll ``condition()`` (the producer's progress, not the writer's) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_block_bounds_memory_and_loses_nothing() -> None:
    """on_full='block' with a stalled sink holds at most max_buffer records, blocks the caller, and loses nothing."""
    sink = GateSink()
    run = steplog.start_run("bp", sinks=[sink], max_buffer=1000, flush_interval=0.005, handle_signals=False)
    steps = 3000
    done = threading.Event()

    def produce() -> None:
        for step in range(steps):
            run.log_metrics({key: float(step) for key in KEYS}, step=step)
        done.set()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        wait_until(lambda: sink.entered.is_set() and run.stats().queued >= 1000 - len(KEYS), "the buffer to fill")
        peak = 0
        for _ in range(20):
            peak = max(peak, run.stats().queued)
            time.sleep(0.005)
        assert not done.is_set()  # the producer is blocked, not dropping
        assert peak <= 1000
    finally:
        sink.gate.set()
    producer.join(timeout=60)
    assert done.is_set()
    run.close()
    for key in KEYS:
        assert [float(s) for s in range(steps)] == sink.values(key)
    stats = run.stats()
    assert (steps * len(KEYS), steps * len(KEYS), 0, 0) == (stats.logged, stats.written, stats.queued, stats.dropped)


def test_drop_counts_every_dropped_record_and_warns_once() -> None:
    """on_full='drop' keeps the first max_buffer records, counts each dropped one, and warns exactly once."""
    sink = GateSink()
    run = steplog.start_run("bp", sinks=[sink], max_buffer=100, on_full="drop", handle_signals=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1000):
            run.log_metric("loss", float(step), step=step)
        for step in range(1000, 1500):
            run.log_metrics({"loss": float(step), "acc": 0.5}, step=step)
    full = [w for w in caught if "buffer is full" in str(w.message)]
    assert 1 == len(full)
    assert RuntimeWarning is full[0].category
    stats = run.stats()
    assert stats.queued <= 100
    assert 1000 + 500 * 2 == stats.dropped + stats.queued
    sink.gate.set()
    run.close()
    kept = sink.values("loss") + sink.values("acc")
    assert 2000 - len(kept) == run.stats().dropped
    assert [float(s) for s in range(len(sink.values("loss")))] == sink.values("loss")  # a clean prefix
    assert (2000, 0) == (run.stats().logged, run.stats().queued)


def test_raise_refuses_at_the_call_and_the_run_goes_on() -> None:
    """on_full='raise' raises BufferFullError at the call once max_buffer records wait; later calls work again."""
    sink = GateSink()
    run = steplog.start_run("bp", sinks=[sink], max_buffer=100, on_full="raise", handle_signals=False)
    for step in range(100):
        run.log_metric("loss", float(step), step=step)
    with pytest.raises(BufferFullError, match=r"the buffer is full \(100 records\)"):
        run.log_metric("loss", 100.0, step=100)
    with pytest.raises(BufferFullError):
        run.log_metrics({"loss": 101.0, "acc": 1.0}, step=101)
    sink.gate.set()
    run.flush()
    run.log_metric("loss", -1.0, step=5000)
    run.close()
    assert [float(s) for s in range(100)] + [-1.0] == sink.values("loss")


@pytest.mark.anyio
async def test_block_in_the_writers_own_loop_raises_instead_of_deadlocking() -> None:
    """In async code a full buffer cannot block the loop its writer needs: BufferFullError says to await aflush()."""
    sink = GateSink()
    async with steplog.start_run("bp", sinks=[sink], max_buffer=50, handle_signals=False) as run:
        for step in range(50):
            run.log_metric("loss", float(step), step=step)
        with pytest.raises(BufferFullError, match="aflush"):
            run.log_metric("loss", 50.0, step=50)
        sink.gate.set()
        await run.aflush()
        run.log_metric("loss", 1.0, step=2000)
    assert 51 == len(sink.values("loss"))


def bytes_per_record(keys_per_step: int, records: int = 100_000) -> float:
    """Bytes of memory each buffered record holds (tracemalloc), with a sink that never takes them."""
    sink = GateSink()
    run = steplog.start_run("bp", sinks=[sink], max_buffer=10 * records, handle_signals=False)
    names = [f"metric_{i}" for i in range(keys_per_step)]
    run.log_metrics(dict.fromkeys(names, 0.0), step=0)  # keys known, columns made, writer started
    steps = records // keys_per_step
    try:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for step in range(1, steps + 1):
            run.log_metrics({name: step * 0.001 + i for i, name in enumerate(names)}, step=step)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        sink.gate.set()
        run.close()
    return (after - before) / (steps * keys_per_step)


def test_memory_per_buffered_record_is_at_most_64_bytes() -> None:
    """A buffered record (value, step, timestamp) costs at most 64 bytes when metrics share steps (10 a step).

    With one metric per step each record also holds its own step int (32 bytes): about 81 bytes.
    """
    assert bytes_per_record(10) <= 64
    assert bytes_per_record(1, records=50_000) <= 88


def test_memory_stays_bounded_when_keys_are_logged_at_different_rates() -> None:
    """A busy key and a rare one with a stalled sink: the whole run still holds at most max_buffer records."""
    sink = GateSink()
    run = steplog.start_run("bp", sinks=[sink], max_buffer=1000, on_full="drop", handle_signals=False)
    most = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        run.log_metrics({"busy": 0.0, "rare": 0.0}, step=0)
        for step in range(1, 3000):
            run.log_metric("busy", float(step), step=step)
            if step % 3 == 0:
                run.log_metric("rare", float(step), step=step)
            most = max(most, run.stats().queued)
    assert most <= 1000 + 2  # a record per key may race the bound
    sink.gate.set()
    run.close()
    stats = run.stats()
    assert stats.logged == stats.written + stats.dropped
