"""Fault isolation in the writer: permanent vs transient errors, sinks that hang, close racing a logger.

Faults are injected at the Sink seam (sinks that refuse a key for good, or never return).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import Any

import anyio
import pytest

import steplog
from _sinks import WAIT, GateSink
from steplog import BufferFullError, RunInfo, RunStateError, RunStatus, WriteError
from steplog import _writer as writer_module
from steplog.testing import MemorySink
from steplog.typing import Batch, PermanentWriteError, RunRequest


class RefusingSink(MemorySink):
    """A MemorySink that cannot write metric key ``bad`` (as a file system refusing a 300-byte name would)."""

    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc
        self.attempts = 0

    def write_sync(self, batch: Batch) -> None:
        self.attempts += 1
        for column in batch.metric_columns():
            if column.key == "bad":
                raise self.exc
            self.metrics.setdefault(column.key, []).extend(column.points())
            batch.mark_done("metric", column.key)
        super().write_sync(batch)


def test_a_permanently_refused_key_is_dropped_and_never_blocks_the_loop() -> None:
    """An unwritable key (ENAMETOOLONG) is counted lost and raised once; with on_full='block' the loop never stalls."""
    sink = RefusingSink(OSError(errno.ENAMETOOLONG, "File name too long (injected)"))
    run = steplog.start_run("faults", sinks=[sink], max_buffer=50, on_full="block", flush_interval=0.01)
    finished = threading.Event()

    def train() -> None:
        for step in range(2000):  # 40 times max_buffer: blocks for good if the bad key jams the writer
            run.log_metrics({"good": float(step), "bad": float(step)}, step=step)
        finished.set()

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    assert finished.wait(WAIT), "the training loop blocked behind a record that can never be written"
    with pytest.raises(WriteError, match="refused for good") as caught:
        run.flush()
    assert caught.value.errno == errno.ENAMETOOLONG
    run.log_metric("after", 1.0)
    run.flush()  # the refusal was reported once; the run goes on
    run.close()
    assert sink.values("good") == [float(s) for s in range(2000)]
    assert sink.values("after") == [1.0]
    assert "bad" not in sink.metrics
    stats = run.stats()
    assert stats.lost == 2000
    assert stats.written == 2001
    assert stats.queued == 0
    assert stats.logged == stats.written + stats.lost
    assert run._writer.lost == 2000


def test_a_sinks_permanent_write_error_drops_only_the_entry_it_names() -> None:
    """PermanentWriteError(entry=...) loses that entry; the batch's other entries are written, without a retry wait."""

    class OneParamRefused(MemorySink):
        def write_sync(self, batch: Batch) -> None:
            if not batch.is_marked("param", "p2"):
                raise PermanentWriteError("p2 cannot be stored", entry=("param", "p2"))
            super().write_sync(batch)

    sink = OneParamRefused()
    with steplog.start_run("faults", sinks=[sink], flush_interval=60.0) as run:
        run.log_params({"p1": "a", "p2": "b", "p3": "c"})
        run.log_metric("x", 1.0)
        started = time.monotonic()
        with pytest.raises(WriteError, match="refused for good and dropped: p2 cannot be stored"):
            run.flush()
        assert time.monotonic() - started < 2.0  # no backoff: a permanent error is not retried
    assert sink.params == {"p1": "a", "p3": "c"}
    assert sink.values("x") == [1.0]
    assert run._writer.lost == 1


def test_transient_errors_are_retried_and_permanent_ones_are_not() -> None:
    """ENOSPC, EIO, timeouts are transient; ENAMETOOLONG, EISDIR, ENOTDIR, EINVAL, PermanentWriteError are permanent."""
    assert not writer_module.is_permanent(OSError(errno.ENOSPC, "full"))
    assert not writer_module.is_permanent(OSError(errno.EIO, "io"))
    assert not writer_module.is_permanent(TimeoutError())
    assert not writer_module.is_permanent(ConnectionError())
    for code in (errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.EINVAL):
        assert writer_module.is_permanent(OSError(code, "refused"))
    assert writer_module.is_permanent(PermanentWriteError("no"))
    assert writer_module.is_permanent(ValueError("cannot encode"))


def test_a_hung_sink_never_delays_another_and_flush_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beside a sink that never returns, the other sink has everything at each flush; flush names the hung sink."""
    monkeypatch.setattr(writer_module, "SINK_TIMEOUT", 0.5)
    gate, memory = GateSink(), MemorySink()
    run = steplog.start_run("faults", sinks=[gate, memory], flush_interval=60.0, close_timeout=1.0)
    try:
        for round_ in range(3):
            for step in range(round_ * 10, round_ * 10 + 10):
                run.log_metric("x", float(step), step=step)
            with pytest.raises(WriteError, match="GateSink#0 did not acknowledge"):
                run.flush()  # no timeout: it still returns
            assert memory.values("x") == [float(s) for s in range(round_ * 10 + 10)]
        assert gate.entered.is_set()
        assert gate.metrics == {}
        stats = run.stats()
        assert stats.written == 0
        assert stats.queued == 30
        with pytest.raises(steplog.StepLogError):
            run.close()  # gives up after close_timeout on the hung write
        # close handed what the hung sink never acknowledged to its emergency path
        assert gate.values("x") == [float(s) for s in range(30)]
        assert gate.status == steplog.RunStatus.FINISHED
        assert memory.status == steplog.RunStatus.FINISHED
        assert run.stats().written == 30
        assert run.stats().queued == 0
    finally:
        gate.gate.set()


def test_a_failing_sink_does_not_hold_up_another() -> None:
    """A sink that keeps failing (ENOSPC) is retried on its own; the other sink is written at once and fully."""

    class Full(MemorySink):
        def write_sync(self, batch: Batch) -> None:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

    full, memory = Full(), MemorySink()
    run = steplog.start_run("faults", sinks=[full, memory], flush_interval=0.01, close_timeout=0.5)
    for step in range(100):
        run.log_metric("x", float(step), step=step)
    with pytest.raises(WriteError, match="No space left"):
        run.flush()
    assert memory.values("x") == [float(s) for s in range(100)]
    with pytest.raises(WriteError):
        run.close()
    assert run.stats().written == 0
    assert run.stats().queued == 100


def test_close_racing_a_logging_thread_loses_no_acknowledged_point() -> None:
    """Every log call that returned without error is written, even when close() races it (bounded stress)."""
    for _attempt in range(12):
        sink = MemorySink()
        run = steplog.start_run("race", sinks=[sink], flush_interval=0.001)
        acknowledged: list[int] = []
        ready = threading.Event()

        def log(run: steplog.Run = run, acknowledged: list[int] = acknowledged, ready: threading.Event = ready) -> None:
            step = 0
            try:
                while True:
                    run.log_metric("x", float(step), step=step)
                    acknowledged.append(step)
                    step += 1
                    if step == 200:
                        ready.set()
            except RunStateError:
                pass

        thread = threading.Thread(target=log)
        thread.start()
        assert ready.wait(WAIT)
        run.close()
        thread.join(WAIT)
        assert sink.steps("x") == acknowledged


def test_log_metrics_under_on_full_raise_is_all_or_nothing() -> None:
    """A log_metrics call meeting a full buffer queues all its keys or none (a retry must not double some)."""
    sink = GateSink()
    run = steplog.start_run("full", sinks=[sink], max_buffer=10, on_full="raise", flush_interval=60.0)
    try:
        for _ in range(9):  # one step, no step boundary: nothing is drained before close
            run.log_metric("b", 0.0, step=0)
        with pytest.raises(BufferFullError):
            run.log_metrics({"a": 1.0, "b": 1.0}, step=0)  # "a" has room, "b" has none: refused whole
        assert run.stats().queued == 9
        try:
            run.log_metrics({"a": 2.0, "b": 2.0}, step=0)  # both keys known now: the fast path
        except BufferFullError:
            pass
    finally:
        sink.gate.set()
        run.close()
    assert len(sink.values("a")) == len(sink.values("b")) - 9
    assert 1.0 not in sink.values("a")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
def test_the_switch_interval_lock_is_fresh_in_a_forked_child() -> None:
    """A fork while a writer holds the switching lock leaves the child a usable lock (it deadlocked before)."""
    lock = writer_module._switching_lock
    lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # child: its writers take the lock at every cycle
            ok = writer_module._switching_lock.acquire(timeout=2.0)
            os._exit(0 if ok else 1)
    finally:
        lock.release()
    _pid, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


class SyncMemorySink(MemorySink):
    """A MemorySink with plain (sync) methods only, as a user's SyncSink has."""

    def open(self, request: RunRequest) -> RunInfo:  # type: ignore[override]
        return anyio.run(MemorySink.open, self, request)

    write = MemorySink.write_sync  # type: ignore[assignment]
    close = MemorySink.close_sync  # type: ignore[assignment]

    def __getattribute__(self, name: str) -> Any:
        if name in ("write_sync", "close_sync"):  # a SyncSink has no emergency twins
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_a_sync_sink_is_written_at_an_emergency_close() -> None:
    """Without write_sync/close_sync, a sync sink's own write/close serve the emergency path (no event loop)."""
    sink = SyncMemorySink()
    run = steplog.start_run("custom", sinks=[sink], flush_interval=60.0)
    run.log_metric("x", 2.0, step=0)
    run._writer.emergency_flush(RunStatus.KILLED, int(time.time() * 1000), timeout=5.0)
    assert sink.values("x") == [2.0]
    assert sink.status == RunStatus.KILLED
    run.close()


def test_the_writer_and_buffer_interface_the_run_uses() -> None:
    """pending, last_error, raise_if_unwritten, lost; attach_writer sets what the buffer reads; check_usable."""
    from steplog._buffer import Buffer
    from steplog._writer import Writer

    buffer = Buffer()
    woken: list[int] = []
    buffer.attach_writer(wake=lambda: woken.append(1), alive=lambda: False, loop_thread=1234)
    assert buffer.loop_thread == 1234
    assert buffer.writer_alive() is False
    buffer.wake()
    assert woken == [1]
    buffer.check_usable()
    buffer.close("closed for the test")
    with pytest.raises(RunStateError, match="closed for the test"):
        buffer.check_usable()

    class Full(MemorySink):
        def write_sync(self, batch: Batch) -> None:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

    run = steplog.start_run("iface", sinks=[Full()], flush_interval=60.0, close_timeout=0.2)
    writer: Writer = run._writer
    assert not writer.pending
    assert writer.last_error is None
    run.log_metric("x", 1.0)
    with pytest.raises(WriteError):
        run.flush()
    assert writer.pending
    assert isinstance(writer.last_error, OSError)
    with pytest.raises(WriteError, match="No space left") as caught:
        writer.raise_if_unwritten()
    assert caught.value.errno == errno.ENOSPC
    assert writer.lost == 0
    with pytest.raises(WriteError):
        run.close()


def test_a_run_that_lost_records_ends_failed_and_close_says_so_once() -> None:
    """Records refused for good that no barrier reported: close() raises WriteError once, and the run is FAILED."""
    sink = RefusingSink(OSError(errno.ENAMETOOLONG, "File name too long (injected)"))
    run = steplog.start_run("faults", sinks=[sink], flush_interval=0.01, handle_signals=False)
    run.log_metrics({"good": 1.0, "bad": 2.0}, step=0)
    with pytest.raises(steplog.WriteError, match="refused for good") as caught:
        run.close()  # FINISHED asked for
    assert errno.ENAMETOOLONG == caught.value.errno
    assert steplog.RunStatus.FAILED == run.info.status
    assert steplog.RunStatus.FAILED == sink.status
    assert [1.0] == [p.value for p in sink.metrics["good"]]
    assert 1 == run.stats().lost
    run.close()  # closing again is a no-op: the error was reported once


def test_a_lost_record_reported_by_a_barrier_is_not_raised_again_at_close() -> None:
    """flush() reports the refusal; close() then returns, and the run still ends FAILED (it did not log everything)."""
    sink = RefusingSink(OSError(errno.ENAMETOOLONG, "File name too long (injected)"))
    run = steplog.start_run("faults", sinks=[sink], flush_interval=0.01, handle_signals=False)
    run.log_metrics({"good": 1.0, "bad": 2.0}, step=0)
    with pytest.raises(steplog.WriteError, match="refused for good"):
        run.flush()
    run.close()
    assert steplog.RunStatus.FAILED == run.info.status
