"""Where the writer runs (``_hosting.py``): the thread host and the loop host, the seam to buffer and writer, open_run.

Runs are built from their parts (a Buffer, a Writer, in-memory sinks, a ``finish`` like the
run's) so each host's start/flush/close contract is checked without ``steplog.Run``.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable

import anyio
import pytest

from _sinks import WAIT, GateSink
from steplog import FlushTimeoutError, RunStateError, RunStatus, StepLogError, WriteError
from steplog._buffer import Buffer
from steplog._hosting import (
    LoopHosting,
    ThreadHosting,
    attach_writer,
    bounded,
    check_usable,
    now_ms,
    open_run,
    raise_if_unwritten,
    unwritten_error,
    writer_last_error,
    writer_lost,
    writer_pending,
)
from steplog._records import RunInfo
from steplog._writer import Writer
from steplog.testing import MemorySink
from steplog.typing import Batch, RunRequest, Sink

REQUEST = RunRequest(experiment_name="hosting", run_name="r", tags={}, start_time=0, user_id="tester")


class Parts:
    """A buffer, a writer over ``sinks`` and the run's two close paths, recording where and how they ran."""

    def __init__(self, *sinks: Sink) -> None:
        self.sinks = list(sinks) or [MemorySink()]
        self.buffer = Buffer()
        self.writer = Writer(self.buffer, self.sinks, flush_interval=60.0)
        self.finished: list[tuple[RunStatus, float, threading.Thread]] = []
        self.finished_sync: list[tuple[RunStatus, float]] = []

    @property
    def sink(self) -> MemorySink:
        sink = self.sinks[0]
        assert isinstance(sink, MemorySink)
        return sink

    async def finish(self, status: RunStatus, timeout: float) -> None:
        self.finished.append((status, timeout, threading.current_thread()))
        with anyio.move_on_after(timeout):
            await self.writer.stop()
        await self.writer.close_sinks(status, now_ms())

    def finish_sync(self, status: RunStatus, timeout: float) -> None:
        self.finished_sync.append((status, timeout))
        self.writer.emergency_flush(status, now_ms(), timeout=timeout)


class FlakySink(MemorySink):
    """A MemorySink whose writes fail with ENOSPC."""

    def write_sync(self, batch: Batch) -> None:
        raise OSError(errno.ENOSPC, "No space left on device (injected)")


class RefusedOpenSink(MemorySink):
    """A MemorySink whose open() raises the given error."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    async def open(self, request: RunRequest) -> RunInfo:
        raise self.error


# ---------------------------------------------------------------------------- ThreadHosting


def test_thread_hosting_opens_writes_and_closes_on_a_thread_of_its_own() -> None:
    """start() opens the run on the host thread; flush() writes; close() runs finish there and ends the thread."""
    parts = Parts()
    hosting, info = ThreadHosting.start(parts.writer, parts.buffer, REQUEST, parts.finish)
    assert parts.writer.info is not None
    assert info.run_id == parts.writer.info.run_id
    assert parts.buffer.loop_thread is None  # no caller shares the writer's thread: waiting for room is safe
    hosting.check_blocking("flush()", "await run.aflush()")  # never refuses: the writer has its own loop
    parts.buffer.log_metric("x", 1.0, step=0)
    hosting.flush(None)
    assert parts.sink.values("x") == [1.0]
    parts.buffer.log_metric("x", 2.0, step=1)
    hosting.close(RunStatus.FINISHED, 5.0)
    [(status, timeout, thread)] = parts.finished
    assert (status, timeout) == (RunStatus.FINISHED, 5.0)
    assert thread is not threading.current_thread()
    assert not thread.is_alive()  # close() stopped the host and joined its thread
    assert parts.sink.values("x") == [1.0, 2.0]
    assert parts.sink.status == RunStatus.FINISHED


def test_thread_hosting_flush_with_a_timeout_names_what_is_unwritten() -> None:
    """flush(timeout) with a sink stuck in a write raises FlushTimeoutError naming the unwritten points."""
    sink = GateSink()
    parts = Parts(sink)
    hosting, _info = ThreadHosting.start(parts.writer, parts.buffer, REQUEST, parts.finish)
    try:
        parts.buffer.log_metric("x", 1.0, step=0)
        with pytest.raises(FlushTimeoutError, match=r"flush\(\) timed out after 0.2 s with 1 metric points \('x': 1\)"):
            hosting.flush(0.2)
    finally:
        sink.gate.set()
        hosting.close(RunStatus.FINISHED, WAIT)
    assert sink.values("x") == [1.0]


def test_thread_hosting_start_stops_the_thread_when_opening_fails() -> None:
    """An opener that fails makes start() raise its error, and the host thread it started is stopped."""
    parts = Parts()
    seen: list[threading.Thread] = []

    async def opener(writer: Writer, request: RunRequest) -> RunInfo:
        seen.append(threading.current_thread())
        raise ValueError("injected open failure")

    with pytest.raises(ValueError, match="injected open failure"):
        ThreadHosting.start(parts.writer, parts.buffer, REQUEST, parts.finish, opener)
    [thread] = seen
    assert not thread.is_alive()
    assert not parts.writer.started


@pytest.mark.anyio
async def test_thread_hosting_serves_async_callers_without_blocking_their_loop() -> None:
    """aflush() and aclose() from an event loop (any backend) wait in a worker thread for the host thread."""
    parts = Parts()
    hosting, _info = ThreadHosting.start(parts.writer, parts.buffer, REQUEST, parts.finish)
    parts.buffer.log_metric("x", 1.0, step=0)
    await hosting.aflush(WAIT)
    assert parts.sink.values("x") == [1.0]
    await hosting.aclose(RunStatus.KILLED, WAIT)
    assert parts.sink.status == RunStatus.KILLED
    await hosting.aleave()  # nothing left to leave for a thread host


# ---------------------------------------------------------------------------- LoopHosting


@pytest.mark.anyio
async def test_loop_hosting_runs_the_writer_in_the_callers_loop() -> None:
    """start() opens the run and starts the writer in this loop; aflush() writes; aclose() runs finish here."""
    parts = Parts()
    hosting, info = await LoopHosting.start(parts.writer, parts.buffer, REQUEST, parts.finish, parts.finish_sync)
    assert parts.writer.info is not None
    assert info.run_id == parts.writer.info.run_id
    assert parts.buffer.loop_thread == threading.get_ident()  # a caller here must not wait for room
    assert parts.writer.alive
    parts.buffer.log_metric("x", 1.0, step=0)
    await hosting.aflush(None)
    assert parts.sink.values("x") == [1.0]
    parts.buffer.log_metric("x", 2.0, step=1)
    await hosting.aclose(RunStatus.FINISHED, WAIT)
    [(status, _timeout, thread)] = parts.finished
    assert status == RunStatus.FINISHED
    assert thread is threading.current_thread()
    assert parts.finished_sync == []
    assert not parts.writer.alive
    assert parts.sink.values("x") == [1.0, 2.0]
    assert parts.sink.status == RunStatus.FINISHED


@pytest.mark.anyio
async def test_loop_hosting_refuses_a_blocking_flush_in_its_own_loop_and_serves_other_threads() -> None:
    """flush() from the writer's loop thread raises RunStateError (it would deadlock); from another thread it writes."""
    parts = Parts()
    hosting, _info = await LoopHosting.start(parts.writer, parts.buffer, REQUEST, parts.finish, parts.finish_sync)
    try:
        with pytest.raises(RunStateError, match=r"would block the event loop .* use `await run.aflush\(\)`"):
            hosting.check_blocking("flush()", "await run.aflush()")
        with pytest.raises(RunStateError, match="would block the event loop"):
            hosting.flush(None)
        parts.buffer.log_metric("x", 1.0, step=0)
        await anyio.to_thread.run_sync(hosting.flush, WAIT)
        assert parts.sink.values("x") == [1.0]
    finally:
        await hosting.aclose(RunStatus.FINISHED, WAIT)


@pytest.mark.anyio
async def test_loop_hosting_aflush_with_a_timeout_names_what_is_unwritten() -> None:
    """aflush(timeout) with a sink stuck in a write raises FlushTimeoutError naming the unwritten points."""
    sink = GateSink()
    parts = Parts(sink)
    hosting, _info = await LoopHosting.start(parts.writer, parts.buffer, REQUEST, parts.finish, parts.finish_sync)
    try:
        parts.buffer.log_metric("x", 1.0, step=0)
        with pytest.raises(FlushTimeoutError, match=r"flush\(\) timed out after 0.2 s with 1 metric points"):
            await hosting.aflush(0.2)
    finally:
        sink.gate.set()
        await hosting.aclose(RunStatus.FINISHED, WAIT)
    assert sink.values("x") == [1.0]


@pytest.mark.anyio
async def test_loop_hosting_close_from_another_thread_finishes_in_the_loop_and_aleave_exits() -> None:
    """close() from another thread runs finish in the run's loop; aleave() in that loop then exits its task group."""
    parts = Parts()
    hosting, _info = await LoopHosting.start(parts.writer, parts.buffer, REQUEST, parts.finish, parts.finish_sync)
    parts.buffer.log_metric("x", 1.0, step=0)
    loop_thread = threading.current_thread()
    await anyio.to_thread.run_sync(hosting.close, RunStatus.FINISHED, WAIT)
    [(status, _timeout, thread)] = parts.finished
    assert (status, thread) == (RunStatus.FINISHED, loop_thread)
    assert parts.sink.values("x") == [1.0]
    assert not parts.writer.alive
    await hosting.aleave()
    await hosting.aleave()  # once only: a second call has nothing left to leave


@pytest.mark.anyio
async def test_loop_hosting_closes_through_the_sync_path_once_its_writer_ended() -> None:
    """With the writer task ended, flush() says the writer is not running and aclose() uses finish_sync."""
    parts = Parts()
    hosting, _info = await LoopHosting.start(parts.writer, parts.buffer, REQUEST, parts.finish, parts.finish_sync)
    with anyio.fail_after(WAIT):
        await parts.writer.stop()
    with pytest.raises(RunStateError, match="writer is not running"):
        hosting.flush(None)
    with pytest.raises(RunStateError, match="writer is not running"):
        await hosting.aflush(None)
    await hosting.aclose(RunStatus.KILLED, WAIT)
    assert parts.finished == []
    assert parts.finished_sync == [(RunStatus.KILLED, WAIT)]
    assert parts.sink.status == RunStatus.KILLED


@pytest.mark.anyio
async def test_loop_hosting_start_leaves_nothing_running_when_opening_fails() -> None:
    """An opener that fails makes start() raise its error; the writer never starts."""
    parts = Parts()

    async def opener(writer: Writer, request: RunRequest) -> RunInfo:
        raise ValueError("injected open failure")

    with pytest.raises(ValueError, match="injected open failure"):
        await LoopHosting.start(parts.writer, parts.buffer, REQUEST, parts.finish, parts.finish_sync, opener)
    assert not parts.writer.started


# ---------------------------------------------------------------------------- open_run


@pytest.mark.anyio
async def test_open_run_explains_a_refused_permission() -> None:
    """A PermissionError while creating the run becomes a StepLogError naming the path, the folder and the fix."""
    denied = PermissionError(errno.EACCES, "Permission denied", "/srv/shared/mlruns/0")
    parts = Parts(RefusedOpenSink(denied))
    with pytest.raises(StepLogError) as caught:
        await open_run(parts.writer, REQUEST)
    message = str(caught.value)
    assert "permission denied writing '/srv/shared/mlruns/0'" in message
    assert "'/srv/shared/mlruns'" in message
    assert "chmod u+wx" in message
    assert caught.value.__cause__ is denied


@pytest.mark.anyio
async def test_open_run_without_a_path_does_not_quote_prose_as_a_path() -> None:
    """A PermissionError with no filename still explains the fix, naming no made-up path in quotes."""
    parts = Parts(RefusedOpenSink(PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(StepLogError, match="steplog cannot create the run: permission denied;") as caught:
        await open_run(parts.writer, REQUEST)
    assert "chmod u+wx" in str(caught.value)
    assert '"the store\'s folder"' not in str(caught.value)


@pytest.mark.anyio
async def test_open_run_explains_a_read_only_file_system() -> None:
    """EROFS while creating the run becomes a StepLogError saying the file system is read-only."""
    parts = Parts(RefusedOpenSink(OSError(errno.EROFS, "Read-only file system", "/ro/mlruns")))
    with pytest.raises(StepLogError, match=r"'/ro/mlruns' is on a read-only file system; choose a tracking_uri"):
        await open_run(parts.writer, REQUEST)


@pytest.mark.anyio
async def test_open_run_finds_a_permission_error_a_sink_wrapped() -> None:
    """A sink's WriteError caused by a PermissionError is translated like the PermissionError itself."""
    wrapped = WriteError("could not create the run")
    wrapped.__cause__ = PermissionError(errno.EPERM, "Operation not permitted", "/x/mlruns")
    parts = Parts(RefusedOpenSink(wrapped))
    with pytest.raises(StepLogError, match="steplog cannot create the run: permission denied writing '/x/mlruns'"):
        await open_run(parts.writer, REQUEST)


@pytest.mark.anyio
async def test_open_run_passes_other_errors_through_unchanged() -> None:
    """An OS error that is not about permissions (a full disk) is raised as it is."""
    full = OSError(errno.ENOSPC, "No space left on device")
    parts = Parts(RefusedOpenSink(full))
    with pytest.raises(OSError) as caught:
        await open_run(parts.writer, REQUEST)
    assert caught.value is full


# ---------------------------------------------------------------------------- the seam functions


def test_attach_writer_wires_the_buffer_to_the_writer() -> None:
    """The buffer wakes the writer via the host's schedule, sees an unstarted writer alive, knows the loop thread."""
    buffer = Buffer()
    writer = Writer(buffer, [MemorySink()], flush_interval=60.0)
    scheduled: list[Callable[[], object]] = []
    attach_writer(buffer, writer, scheduled.append, loop_thread=42)
    assert buffer.loop_thread == 42
    assert buffer.writer_alive()  # not started yet: a blocked caller keeps waiting for it
    buffer.wake()
    assert len(scheduled) == 1
    scheduled[0]()  # the writer's own wake (a no-op before open)
    check_usable(buffer)
    buffer.close("closed for the test")
    with pytest.raises(RunStateError, match="closed for the test"):
        check_usable(buffer)


def test_the_seam_reports_what_a_failing_sink_left_unwritten() -> None:
    """After a failed write, pending/last_error say so, raise_if_unwritten and unwritten_error give the WriteError."""
    buffer = Buffer()
    writer = Writer(buffer, [FlakySink()], flush_interval=60.0)
    assert unwritten_error(writer) is None
    assert (writer_pending(writer), writer_last_error(writer), writer_lost(writer)) == (False, None, 0)
    buffer.log_metric("x", 1.0, step=0)
    writer.emergency_flush(None, now_ms(), timeout=WAIT)  # no event loop: the sync path, which fails
    assert writer_pending(writer)
    assert isinstance(writer_last_error(writer), OSError)
    assert writer_lost(writer) == 0
    with pytest.raises(WriteError, match="No space left") as caught:
        raise_if_unwritten(writer)
    assert caught.value.errno == errno.ENOSPC
    error = unwritten_error(writer)
    assert isinstance(error, WriteError)
    assert "1 metric points ('x': 1)" in str(error)
    assert "No space left" in str(error)


def test_now_ms_is_the_wall_clock_in_milliseconds() -> None:
    """now_ms() is time.time() in whole milliseconds."""
    before = int(time.time() * 1000)
    stamp = now_ms()
    after = int(time.time() * 1000) + 1
    assert before <= stamp <= after


# ---------------------------------------------------------------------------- bounded


def test_bounded_returns_the_result() -> None:
    """bounded(fn, t) returns fn()'s result, computed on another thread."""
    assert bounded(lambda: threading.current_thread().name, WAIT) == "steplog-call"


def test_bounded_raises_the_functions_exception() -> None:
    """An exception raised by fn is raised by bounded() in the caller."""

    def fail() -> None:
        raise KeyError("injected")

    with pytest.raises(KeyError, match="injected"):
        bounded(fail, WAIT)


def test_bounded_gives_up_on_a_blocked_function_with_timeout_error() -> None:
    """A fn that blocks past the timeout makes bounded() raise TimeoutError; fn is left on its daemon thread."""
    release, returned = threading.Event(), threading.Event()

    def blocked() -> None:
        release.wait(WAIT)
        returned.set()

    with pytest.raises(TimeoutError):
        bounded(blocked, 0.05)
    assert not returned.is_set()
    release.set()
    assert returned.wait(WAIT)
