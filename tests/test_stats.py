"""``run.stats()``: records logged, written, queued, dropped; flushes, bytes, flush latency, retries, last error."""

from __future__ import annotations

import errno
import threading
import time
import warnings
from pathlib import Path

import anyio
import pytest

import steplog
from steplog import Stats, WriteError
from steplog.testing import MemorySink
from steplog.typing import Batch


def test_counts_and_bytes_match_what_is_on_disk(store: Path) -> None:
    """After close, logged == written, nothing queued or dropped, and bytes_written is the size of what was written."""
    with steplog.start_run("stats", tracking_uri=store, handle_signals=False) as run:
        assert isinstance(run.stats(), Stats)
        for step in range(500):
            run.log_metrics({"loss": 1 / (step + 1), "acc": step / 500}, step=step)
        run.log_params({"lr": 0.001, "layers": 4})
        run.set_tag("model", "mlp")
        run.log_text("hello", "notes/readme.txt")
        run.flush()
        mid = run.stats()
        assert (1000, 1000, 0, 0) == (mid.logged, mid.written, mid.queued, mid.dropped)
        assert mid.flushes >= 1
    stats = run.stats()
    assert (1000, 1000, 0, 0, 0, 0, None) == (
        stats.logged,
        stats.written,
        stats.queued,
        stats.dropped,
        stats.errors,
        stats.retries,
        stats.last_error,
    )
    run_dir = store / run.experiment_id / run.run_id
    on_disk = sum(
        p.stat().st_size
        for folder in ("metrics", "params", "tags", "artifacts")
        for p in (run_dir / folder).rglob("*")
        if p.is_file()
    )
    assert on_disk == stats.bytes_written
    assert 0 <= stats.last_flush_latency <= stats.max_flush_latency


class SlowSink(MemorySink):
    """Each write takes at least ``delay`` seconds (in a worker thread, as a slow disk would)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def write(self, batch: Batch) -> None:
        await anyio.sleep(self.delay)
        self.write_sync(batch)


def test_flush_latency_covers_a_slow_write() -> None:
    """A write that takes 50 ms shows as a last and max flush latency of at least 50 ms."""
    with steplog.start_run("stats", sinks=[SlowSink(0.05)], handle_signals=False) as run:
        run.log_metric("loss", 1.0, step=0)
        run.flush()
        first = run.stats()
    assert first.last_flush_latency >= 0.05
    assert first.max_flush_latency >= first.last_flush_latency
    assert 1 == first.flushes


class FailOnceSink(MemorySink):
    """Fails its first write with EIO, then works."""

    failed = False

    async def write(self, batch: Batch) -> None:
        if not self.failed:
            self.failed = True
            raise OSError(errno.EIO, "injected EIO")
        self.write_sync(batch)


@pytest.mark.anyio
async def test_retries_errors_and_last_error_are_reported() -> None:
    """A failed write shows in errors, retries and last_error, and the retry then writes everything."""
    sink = FailOnceSink()
    async with steplog.start_run("stats", sinks=[sink], handle_signals=False) as run:
        run.log_metric("loss", 1.0, step=0)
        with pytest.raises(WriteError, match="injected EIO"):
            await run.aflush()
        failing = run.stats()
        assert (1, 0, 1, 1) == (failing.logged, failing.written, failing.queued, failing.errors)
        assert failing.retries >= 1
        assert "injected EIO" in str(failing.last_error)
        await run.aflush()
    stats = run.stats()
    assert (1, 1, 0) == (stats.logged, stats.written, stats.queued)
    assert [1.0] == sink.values("loss")
    assert "injected EIO" in str(stats.last_error)  # the last error stays visible after recovery


def test_dropped_and_queued_while_stalled() -> None:
    """With a stalled sink and on_full='drop', queued stays at max_buffer and dropped counts the rest."""
    gate = threading.Event()

    class Stalled(MemorySink):
        async def write(self, batch: Batch) -> None:
            await anyio.to_thread.run_sync(gate.wait, abandon_on_cancel=True)
            self.write_sync(batch)

    sink = Stalled()
    run = steplog.start_run("stats", sinks=[sink], max_buffer=64, on_full="drop", handle_signals=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for step in range(1000):
            run.log_metric("loss", float(step), step=step)
    stats = run.stats()
    assert (1000, 0, 64, 936) == (stats.logged, stats.written, stats.queued, stats.dropped)
    gate.set()
    run.close()
    final = run.stats()
    assert (1000, 64, 0, 936) == (final.logged, final.written, final.queued, final.dropped)
    assert 64 == len(sink.values("loss"))


def test_stats_is_cheap_and_safe_from_other_threads() -> None:
    """stats() polled from another thread while logging sees each record once: logged never runs ahead of the calls."""
    snapshots: list[tuple[int, Stats, int]] = []
    stop = threading.Event()
    calls = 0
    with steplog.start_run("stats", sinks=[MemorySink()], handle_signals=False, flush_interval=0.001) as run:

        def poll() -> None:
            while not stop.is_set():
                before = calls
                snap = run.stats()
                snapshots.append((before, snap, calls))
                time.sleep(0.0005)

        poller = threading.Thread(target=poll)
        poller.start()
        for step in range(20_000):
            run.log_metric("loss", float(step), step=step)
            calls += 1
        run.flush()
        stop.set()
        poller.join()
    assert snapshots
    previous = 0
    for before, snap, after in snapshots:
        # a call may be halfway done when the snapshot is taken: at most one record beyond ``after``
        assert before <= snap.logged <= after + 1, (before, snap, after)
        assert snap.logged == snap.written + snap.queued + snap.dropped
        assert previous <= snap.logged
        previous = snap.logged
    assert (20_000, 20_000) == (run.stats().logged, run.stats().written)


def test_flush_latency_ignores_caller_given_timestamps() -> None:
    """A point logged with an old explicit timestamp does not make the flush latency years long."""
    with steplog.start_run("lat", sinks=[MemorySink()], handle_signals=False) as run:
        run.log_metric("loss", 1.0, step=0, timestamp=1000)
        run.flush()
        assert run.stats().max_flush_latency < 60.0
