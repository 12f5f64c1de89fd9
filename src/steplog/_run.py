"""Run: lifecycle (sync and async contexts), identity, barriers, and the hot-path methods.

A :class:`Run` owns a :class:`~steplog._buffer.Buffer` (where log calls put
records) and a :class:`~steplog._writer.Writer` (the one task that moves them to
the sinks). Only where the writer task runs differs between the two faces:

* sync (``with``, or ``start_run()`` outside an event loop): on a daemon thread
  with its own event loop, driven through anyio's blocking portal;
* async (``async with`` / ``await run.astart()``): as a task in the caller's
  loop, asyncio or trio; file I/O goes to worker threads so the loop never blocks.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

from . import _exit
from ._buffer import Buffer, OnFull
from ._errors import InvalidValueError, RunStateError, StepLogError, WriteError
from ._layout import random_run_name
from ._portal import ThreadHost, loop_scheduler
from ._records import ArtifactRecord, RunInfo, RunStatus, Stats
from ._tensors import DeviceValues
from ._validation import check_artifact_path, check_experiment_name, check_key, check_tag_value
from ._writer import Writer
from .typing import RunRequest, Sink

if TYPE_CHECKING:
    from typing import Self

__all__ = ["Run", "start_run"]

T = TypeVar("T")

Durability = Literal["os", "fsync"]
_STATUS_NAMES = {s.name: s for s in RunStatus}


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    """A run's options (keyword arguments of :func:`start_run`), checked once."""

    flush_interval: float = 0.05
    max_buffer: int = 1_000_000
    on_full: OnFull = "block"
    durability: Durability = "os"
    handle_signals: bool | None = None
    close_timeout: float = 30.0
    start_timeout: float = 10.0
    """Seconds to reach a tracking server when the run starts (then a StepLogError)."""
    journal_dir: str | None = None
    """Where a tracking server's outage journal goes (default STEPLOG_JOURNAL_DIR or ./steplog-journal)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.flush_interval, (int, float)) and self.flush_interval > 0):
            raise InvalidValueError(f"flush_interval must be a positive number of seconds, not {self.flush_interval!r}")
        if not (isinstance(self.max_buffer, int) and self.max_buffer > 0):
            raise InvalidValueError(f"max_buffer must be a positive int, not {self.max_buffer!r}")
        if self.on_full not in ("block", "drop", "raise"):
            raise InvalidValueError(f"on_full must be 'block', 'drop' or 'raise', not {self.on_full!r}")
        if self.durability not in ("os", "fsync"):
            raise InvalidValueError(f"durability must be 'os' or 'fsync', not {self.durability!r}")
        if not (isinstance(self.close_timeout, (int, float)) and self.close_timeout > 0):
            raise InvalidValueError(f"close_timeout must be a positive number of seconds, not {self.close_timeout!r}")
        if not (isinstance(self.start_timeout, (int, float)) and self.start_timeout > 0):
            raise InvalidValueError(f"start_timeout must be a positive number of seconds, not {self.start_timeout!r}")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _in_event_loop() -> bool:
    import sys

    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
            return True
        except RuntimeError:
            pass
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Run:
    """One MLflow run being logged. Create it with :func:`steplog.start_run`.

    The log methods never block and never do I/O; use the run as a context
    manager (``with`` or ``async with``) or call :meth:`close` / :meth:`aclose`.
    """

    def __init__(
        self,
        request: RunRequest,
        sinks: Sequence[Sink],
        options: Options,
        *,
        tracking_uri: str,
    ) -> None:
        self._request = request
        self._options = options
        self._tracking_uri = tracking_uri
        # device tensors (CUDA, JAX) become floats in the writer, without stalling the device
        self._tensors = DeviceValues(flush_interval=options.flush_interval)
        self._buffer = Buffer(max_buffer=options.max_buffer, on_full=options.on_full, value_hook=self._tensors.convert)
        self._writer = Writer(self._buffer, sinks, flush_interval=options.flush_interval)
        self._writer.deferred = self._tensors
        self._sinks = list(sinks)
        self._state: Literal["new", "running", "closing", "closed"] = "new"
        self._host: ThreadHost | None = None
        self._writer_future: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._task_group_left_open = False  # set by a close() from another thread (see aclose)
        self._token: Any = None
        self._info: RunInfo | None = None
        self._pid = os.getpid()
        self._close_lock = threading.Lock()
        self._close_done = threading.Event()  # set when _finish has recorded the end (any thread)
        self._finish_started = False
        self._signalled = False  # set by steplog's SIGTERM/SIGINT handler while this run was open
        # The hot path: bind the buffer's methods on the instance, so run.log_metric(...) is
        # one call with no delegation (the class methods below carry the docs and types).
        self.__dict__["log_metric"] = self._buffer.log_metric
        self.__dict__["log_metrics"] = self._buffer.log_metrics

    # ------------------------------------------------------------------ hot path

    def log_metric(self, key: str, value: Any, step: int | None = None, timestamp: int | None = None) -> None:
        """Log one metric point; returns at once (no I/O, no lock, no wait).

        Args:
            key: metric name (MLflow's rules: letters, digits, ``_-. :/``, at most 250 chars).
            value: a real number: int, float, numpy scalar, 0-d or one-element array/tensor.
            step: integer step; ``None`` means the run's current step (the last step given).
                A new step ends the previous one.
            timestamp: integer ms since the epoch; default: the time of the call (records of
                one step may share one stamp).

        Raises:
            InvalidKeyError: the key breaks MLflow's rules or clashes with another key.
            InvalidValueError: the value, step or timestamp is not storable.
            BufferFullError: the buffer is full and ``on_full="raise"``.
            RunStateError: the run is closed.
        """
        self._buffer.log_metric(key, value, step, timestamp)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, timestamp: int | None = None) -> None:
        """Log several metrics of one step; all are checked before any is queued."""
        self._buffer.log_metrics(metrics, step, timestamp)

    # ------------------------------------------------------------------ params, tags, artifacts

    def log_param(self, key: str, value: Any) -> None:
        """Log a param (stored as ``str(value)``); raises ParamChangedError if it differs from before."""
        self._buffer.log_params({key: value})

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log several params at once (all checked before any is queued)."""
        self._buffer.log_params(params)

    def set_tag(self, key: str, value: Any) -> None:
        """Set a tag (stored as ``str(value)``; setting it again overwrites)."""
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set several tags at once. Setting ``mlflow.runName`` renames the run, as in MLflow."""
        self._buffer.set_tags(tags)
        name = tags.get("mlflow.runName") if isinstance(tags, Mapping) else None
        if name is not None and self._info is not None:
            self._info = dataclasses.replace(self._info, run_name=str(name))

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy a file or directory into the run's artifacts (the writer copies it, not the caller).

        Args:
            local_path: an existing file or directory.
            artifact_path: folder inside the run's artifacts to put it in (default: the root).
        """
        source = Path(local_path)
        if not source.exists():
            raise InvalidValueError(f"artifact {os.fspath(local_path)!r} is not allowed: the path does not exist")
        name = source.resolve().name
        dest = name if artifact_path is None else f"{check_artifact_path(artifact_path)}/{name}"
        self._buffer.log_artifact(ArtifactRecord(artifact_path=check_artifact_path(dest), source=str(source.resolve())))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` (UTF-8) to ``artifact_file`` inside the run's artifacts."""
        if not isinstance(text, str):
            raise InvalidValueError(f"log_text() takes str, not {type(text).__name__}")
        path = check_artifact_path(artifact_file, "artifact file")
        self._buffer.log_artifact(ArtifactRecord(artifact_path=path, data=text.encode("utf-8")))

    def log_dict(self, dictionary: Any, artifact_file: str) -> None:
        """Write a JSON (or, for ``.yaml``/``.yml`` with PyYAML installed, YAML) artifact.

        The object is serialized at the call, so later changes to it are not logged.
        """
        path = check_artifact_path(artifact_file, "artifact file")
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:
                raise InvalidValueError(
                    f"artifact file {path!r}: writing YAML needs PyYAML (pip install pyyaml), or use .json"
                ) from None
            try:
                text = yaml.safe_dump(dictionary, default_flow_style=False, sort_keys=False)
            except yaml.YAMLError as exc:  # e.g. a numpy scalar or another object safe_dump cannot represent
                raise InvalidValueError(f"artifact file {path!r}: the object is not YAML-serializable: {exc}") from exc
        else:
            try:
                text = json.dumps(dictionary, indent=2)
            except (TypeError, ValueError) as exc:
                raise InvalidValueError(f"artifact file {path!r}: the object is not JSON-serializable: {exc}") from exc
        self._buffer.log_artifact(ArtifactRecord(artifact_path=path, data=text.encode("utf-8")))

    # ------------------------------------------------------------------ identity and stats

    @property
    def info(self) -> RunInfo:
        """The run's identity and lifecycle (a frozen snapshot)."""
        if self._info is None:
            raise RunStateError(
                "the run has not started yet: in async code it starts when entered with "
                "`async with run` or `await run.astart()`"
            )
        return self._info

    @property
    def run_id(self) -> str:
        """The run's id (32 hex digits on a local store)."""
        return self.info.run_id

    @property
    def experiment_id(self) -> str:
        """The id of the run's experiment."""
        return self.info.experiment_id

    @property
    def tracking_uri(self) -> str:
        """Where the run is written (the local store's ``file:`` URI or the server's URL)."""
        if self._info is not None:  # as the destination resolved it: absolute, whatever the cwd
            return self._info.tracking_uri
        return self._tracking_uri

    def stats(self) -> Stats:
        """Counts and timings: records logged, written, queued, dropped, flushes, bytes, latencies, errors."""
        return self._writer.stats()

    # ------------------------------------------------------------------ starting

    def _start_threaded(self) -> None:
        """Start the writer on a background thread with its own event loop (sync hosting)."""
        host = ThreadHost()
        writer = self._writer
        schedule = host.schedule
        wake = writer.wake
        self._buffer.wake = lambda: schedule(wake)
        self._buffer.writer_alive = lambda: writer.alive or not writer.started
        try:
            self._info = host.call(writer.open, self._request)
        except BaseException:
            host.close()
            raise
        self._host = host
        self._writer_future = host.start_soon(writer.run)
        self._state = "running"
        _exit.register(self)

    async def astart(self) -> Self:
        """Start the writer as a task in the current event loop (asyncio or trio).

        Called by ``async with``; call it yourself when not using a context manager, and
        then :meth:`aclose` from the same task.
        """
        if self._state != "new":
            if self._state == "running":
                return self
            raise RunStateError(f"the run is {self._state}; start a new run with steplog.start_run()")
        writer = self._writer
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
            schedule = loop_scheduler()
            wake = writer.wake
            self._buffer.wake = lambda: schedule(wake)
            self._buffer.loop_thread = threading.get_ident()
            self._buffer.writer_alive = lambda: writer.alive or not writer.started
            self._token = anyio.lowlevel.current_token()
            self._info = await writer.open(self._request)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        await self._task_group.start(writer.run)  # running before we return (see Writer.run)
        self._state = "running"
        _exit.register(self)
        return self

    # ------------------------------------------------------------------ barriers

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything logged before the call is written (to the OS, or fsynced).

        Raises:
            WriteError: something could not be written (it stays queued and is retried).
            FlushTimeoutError: ``timeout`` seconds passed first (says what is unwritten).
            RunStateError: called from inside the event loop the run's writer runs in
                (use ``await run.aflush()`` there).
            StepLogError: called in a forked child (the writer lives in the parent).
        """
        if os.getpid() != self._pid:
            self._buffer._check_usable()  # raises: the writer's thread does not exist in a forked child
        if self._state in ("closing", "closed"):
            self._writer._raise_if_unwritten()
            return
        if self._host is not None:
            host = self._host
            try:
                if timeout is None:
                    host.call(self._writer.barrier)
                else:
                    _bounded(lambda: host.call(self._writer.barrier, timeout=timeout), timeout + 1.0)
            except TimeoutError:
                raise self._writer.timeout_error("flush()", timeout) from None
            return
        if self._state == "new":
            raise RunStateError("the run has not started yet: enter it with `async with run` first")
        if self._buffer.loop_thread == threading.get_ident():
            raise RunStateError(
                "flush() would block the event loop that this run's writer runs in: use `await run.aflush()`"
            )
        anyio.from_thread.run(self._abarrier, timeout, token=self._token)

    async def aflush(self, timeout: float | None = None) -> None:
        """Wait, without blocking the event loop, until everything logged before the call is written."""
        if os.getpid() != self._pid:
            self._buffer._check_usable()  # raises: the writer does not exist in a forked child
        if self._state in ("closing", "closed"):
            self._writer._raise_if_unwritten()
            return
        if self._host is not None:
            await anyio.to_thread.run_sync(self.flush, timeout)
            return
        if self._state == "new":
            raise RunStateError("the run has not started yet: enter it with `async with run` first")
        await self._abarrier(timeout)

    async def _abarrier(self, timeout: float | None) -> None:
        with anyio.move_on_after(timeout) as scope:
            await self._writer.barrier()
        if scope.cancelled_caught:
            raise self._writer.timeout_error("flush()", timeout)

    # ------------------------------------------------------------------ closing

    def close(self, status: str | RunStatus = "FINISHED", timeout: float | None = None) -> None:
        """Write everything, record the end time and status, and stop the writer.

        Bounded: gives up after ``timeout`` seconds (default: the ``close_timeout`` option)
        and raises FlushTimeoutError naming what was not written. Closing twice is a no-op.
        For an async run, called from another thread: everything is written and the run ends,
        and the task that started the run still leaves it (``async with`` or ``await run.aclose()``).
        """
        final = _status(status)
        timeout = self._options.close_timeout if timeout is None else timeout
        if self._state == "new" and os.getpid() == self._pid:
            # created inside an event loop (a notebook, say) and never entered: write what was
            # logged through a writer thread, as outside a loop, rather than drop it
            self._start_threaded()
        if not self._begin_close():
            return
        if self._host is not None:
            self._close_threaded(final, timeout)
            return
        if self._stack is None:  # never started: nothing to write
            self._end_state(final)
            return
        if self._buffer.loop_thread == threading.get_ident():
            self._state = "running"
            raise RunStateError(
                "close() would block the event loop that this run's writer runs in: use `await run.aclose()`"
            )
        anyio.from_thread.run(self._finish_from_other_thread, final, timeout, token=self._token)

    async def _finish_from_other_thread(self, status: RunStatus, timeout: float) -> None:
        """close() from a thread other than the loop's: write everything and stop the writer in its loop.

        The writer's task group stays open: exiting it from any task but the one that entered it
        corrupts asyncio's and trio's cancel scopes. That task's ``aclose()`` (or the end of its
        ``async with``) exits it.
        """
        self._task_group_left_open = True
        try:
            await self._finish(status, timeout)
        finally:
            self._end_state(status)

    async def aclose(self, status: str | RunStatus = "FINISHED", timeout: float | None = None) -> None:
        """Like :meth:`close`, without blocking the event loop."""
        final = _status(status)
        timeout = self._options.close_timeout if timeout is None else timeout
        if self._state == "new" and os.getpid() == self._pid:
            await self.astart()  # never entered: start the writer here so that what was logged is written
        if not self._begin_close():
            if self._task_group_left_open and self._state == "closed" and self._stack is not None:
                self._task_group_left_open = False  # closed from another thread: exit the task group here
                await self._stack.aclose()
            return
        if self._host is not None:
            await anyio.to_thread.run_sync(self._close_threaded, final, timeout)
            return
        if self._stack is None:
            self._end_state(final)
            return
        await self._aclose_in_loop(final, timeout)

    def _begin_close(self) -> bool:
        with self._close_lock:
            if self._state in ("closing", "closed") or os.getpid() != self._pid:
                return False
            self._state = "closing"
            return True

    def _close_threaded(self, status: RunStatus, timeout: float) -> None:
        host = self._host
        assert host is not None
        stuck = False
        try:
            _bounded(lambda: host.call(self._finish, status, timeout, timeout=timeout + 5.0), timeout + 2.0)
        except TimeoutError:
            stuck = True
            raise self._writer.timeout_error("close()", timeout) from None
        finally:
            try:
                _bounded(lambda: host.close(timeout=2.0), 0.2 if stuck else 3.0)
            except TimeoutError:
                pass  # the loop is stuck in a sink: its daemon thread is abandoned, never joined
            self._end_state(status)

    async def _aclose_in_loop(self, status: RunStatus, timeout: float) -> None:
        stack = self._stack
        assert stack is not None
        assert self._task_group is not None
        finished = False
        try:
            await self._finish(status, timeout)
            finished = True
        except StepLogError:
            finished = True  # the close ran and reports what it could not write
            raise
        finally:
            self._task_group.cancel_scope.cancel()
            try:
                await stack.aclose()
            finally:
                if not finished:
                    # cancelled or interrupted mid-close (e.g. trio delivering KeyboardInterrupt into
                    # the writer task): write what is left and the end through the sync path, bounded
                    self._writer.emergency_flush(status, _now_ms(), timeout=timeout)
                self._end_state(status)

    async def _finish(self, status: RunStatus, timeout: float) -> None:
        """Drain, write, record the end: the common close path (runs in the writer's loop)."""
        self._finish_started = True
        try:
            await self._finish_once(status, timeout)
        finally:
            self._close_done.set()

    async def _finish_once(self, status: RunStatus, timeout: float) -> None:
        end_time = _now_ms()
        error: BaseException | None = None
        deadline = anyio.current_time() + timeout
        with anyio.move_on_after(timeout) as scope:
            await self._writer.stop()
        self._buffer.close(f"the run {self._info.run_id if self._info else ''} is closed: start a new run to log more")
        failing = self._writer._last_error if self._writer._pending else None
        if scope.cancelled_caught and failing is None:
            error = self._writer.timeout_error("close()", timeout)
        elif failing is not None:
            # still failing when close gave up: name the file and the OS error, not just the timeout
            error = WriteError(
                f"steplog could not write {self._writer.unwritten_summary()}"
                f"{f' (gave up after {timeout} s)' if scope.cancelled_caught else ''}: {failing}"
            )
            error.__cause__ = failing
            if isinstance(failing, OSError):
                error.errno, error.filename = failing.errno, failing.filename
        with anyio.move_on_after(max(0.5, deadline - anyio.current_time())):
            try:
                await self._writer.close_sinks(status, end_time)
            except WriteError as exc:
                # keep both: a sink's close may say where the unwritten data went (the REST journal)
                error = exc if error is None else type(error)(f"{error}; {exc}")
        if self._info is not None:
            self._info = dataclasses.replace(self._info, end_time=end_time, status=status)
        if error is not None:
            raise error

    def _end_state(self, status: RunStatus) -> None:
        self._state = "closed"
        self._buffer.close("the run is closed: start a new run to log more")
        self._buffer.detach()
        if self._info is not None and self._info.end_time is None:
            self._info = dataclasses.replace(self._info, end_time=_now_ms(), status=status)
        _exit.unregister(self)

    def _emergency_close(self, status: RunStatus) -> None:
        """Close from a signal handler or at exit: bounded, never raises."""
        if self._state == "closing" and self._host is not None:
            # a close is under way (the signal may have interrupted the very thread waiting for it):
            # let it write everything and record the end before we go on; if the signal landed
            # before that close reached the writer's thread, run it from here
            timeout = self._options.close_timeout
            if not self._finish_started:
                try:
                    self._host.call(self._finish, status, timeout, timeout=timeout + 5.0)
                except Exception as exc:  # nobody is left to catch it: say it on stderr
                    logging.getLogger("steplog").error("steplog: closing run %s: %s", self._request.run_name, exc)
            self._close_done.wait(timeout)
            return
        if self._host is not None or self._state == "new":
            try:
                self.close(status, timeout=self._options.close_timeout)
            except (StepLogError, OSError) as exc:  # nobody is left to catch it: say it on stderr
                logging.getLogger("steplog").error("steplog: closing run %s at exit: %s", self._request.run_name, exc)
            return
        # async-hosted: the loop may be the very thread we are interrupting; write synchronously
        if not self._begin_close():
            return
        self._buffer.close("the run is closed: start a new run to log more")
        self._writer.emergency_flush(status, _now_ms(), timeout=self._options.close_timeout)
        self._end_state(status)

    def _emergency_flush(self, timeout: float) -> None:
        """Write pending data from a signal handler without closing the run: bounded, never raises.

        Only for a run whose writer has its own thread; an async-hosted writer shares the
        interrupted thread, and its run is closed by ``async with`` or at exit instead.
        """
        if self._host is None or self._state != "running" or os.getpid() != self._pid:
            return
        try:
            self.flush(timeout)
        except (StepLogError, OSError):
            pass

    @property
    def closed(self) -> bool:
        """True once the run is closed."""
        return self._state == "closed"

    # ------------------------------------------------------------------ context managers

    def __enter__(self) -> Self:
        if self._state == "new":
            self._start_threaded()
        elif self._state != "running":
            raise RunStateError(f"the run is {self._state}; start a new run with steplog.start_run()")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        status = _exit_status(exc_type, exc, signalled=self._signalled)
        try:
            self.close(status)
        except StepLogError as error:
            if exc is None:
                raise
            exc.add_note(f"steplog: closing the run also failed: {error}")

    async def __aenter__(self) -> Self:
        if self._state == "running" and self._host is not None:
            return self
        return await self.astart()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        status = _exit_status(exc_type, exc, signalled=self._signalled)
        try:
            await self.aclose(status)
        except StepLogError as error:
            if exc is None:
                raise
            exc.add_note(f"steplog: closing the run also failed: {error}")

    def __repr__(self) -> str:
        ident = self._info.run_id if self._info else "not started"
        return f"<steplog.Run {ident} {self._state} at {self._tracking_uri}>"


def _bounded(fn: Callable[[], T], timeout: float) -> T:
    """Run ``fn()`` on a daemon thread and wait at most ``timeout`` seconds for it (TimeoutError after).

    The blocking portal's calls wait for the writer's event loop to pick them up, so a
    sink that blocks that loop (a sync call inside ``async def write``) would hang the
    caller forever; a barrier with a timeout and ``close()`` must stay bounded anyway.
    """
    box: concurrent.futures.Future[T] = concurrent.futures.Future()

    def target() -> None:
        try:
            box.set_result(fn())
        except BaseException as exc:  # handed to the caller, whatever it is
            box.set_exception(exc)

    threading.Thread(target=target, name="steplog-call", daemon=True).start()
    try:
        return box.result(timeout)
    except concurrent.futures.TimeoutError:
        raise TimeoutError from None


def _status(status: str | RunStatus) -> RunStatus:
    if isinstance(status, RunStatus):
        return status
    try:
        return _STATUS_NAMES[str(status).upper()]
    except KeyError:
        raise InvalidValueError(f"status {status!r} is not allowed: use one of FINISHED, FAILED, KILLED") from None


def _exit_status(
    exc_type: type[BaseException] | None, exc: BaseException | None = None, *, signalled: bool = False
) -> RunStatus:
    """The status a run gets when its context exits with ``exc`` (None: a normal exit)."""
    if signalled:
        return RunStatus.KILLED  # a handled SIGTERM/SIGINT ended the run, however the code unwound
    if exc_type is None:
        return RunStatus.FINISHED
    if issubclass(exc_type, SystemExit):
        code = getattr(exc, "code", None)
        return RunStatus.FINISHED if code is None or code == 0 else RunStatus.FAILED
    if issubclass(exc_type, Exception):
        return RunStatus.FAILED
    # KeyboardInterrupt, and cancellation (asyncio.CancelledError, trio.Cancelled): stopped from outside
    return RunStatus.KILLED


# ---------------------------------------------------------------------------- start_run


def resolve_tracking_uri(tracking_uri: str | os.PathLike[str] | None) -> str:
    """The destination a run writes to: the argument, else STEPLOG_TRACKING_URI, MLFLOW_TRACKING_URI, ./mlruns."""
    if tracking_uri is None:
        tracking_uri = os.environ.get("STEPLOG_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI") or "./mlruns"
    return os.fspath(tracking_uri)


def make_sink(uri: str, options: Options) -> Sink:
    """The sink for one tracking URI (a local path or ``file:`` URI, or ``http(s)://``)."""
    lowered = uri.lower()
    if lowered.startswith(("http://", "https://")):
        try:
            from .sinks.mlflow_rest import MlflowRestSink
        except ImportError as exc:
            raise StepLogError(
                f"tracking_uri {uri!r} needs the REST sink's dependencies: pip install 'steplog[rest]' ({exc})"
            ) from exc
        sink: Sink = MlflowRestSink(
            uri,
            max_buffer=options.max_buffer,
            journal_dir=options.journal_dir,
            start_timeout=options.start_timeout,
        )
        return sink
    if lowered.startswith("sqlite:"):  # MLflow's own database (sinks/sqlite.py)
        from .sinks.sqlite import SqliteSink

        return SqliteSink(uri, durability=options.durability)
    scheme, sep, _rest = uri.partition(":")
    if sep and scheme.lower() != "file" and len(scheme) > 1:
        source = next(
            (
                f" (from ${name})"
                for name in ("STEPLOG_TRACKING_URI", "MLFLOW_TRACKING_URI")
                if os.environ.get(name) == uri
            ),
            "",
        )
        raise InvalidValueError(
            f"tracking_uri {uri!r}{source} is not supported: use a directory path, a file: URI, or "
            "http(s)://host:port (an MLflow tracking server)"
        )
    from .sinks.mlruns import MlrunsSink

    return MlrunsSink(uri, durability=options.durability)


def start_run(
    experiment: str = "Default",
    *,
    run_name: str | None = None,
    tracking_uri: str | os.PathLike[str] | Sequence[str] | None = None,
    tags: Mapping[str, Any] | None = None,
    sinks: Sequence[Sink] | None = None,
    **options: Any,
) -> Run:
    """Start a run in ``experiment`` (created if missing, reused by name).

    Outside an event loop the run is already writing when this returns (its writer on a
    background thread); inside one, it starts at ``async with run`` / ``await run.astart()``.

    Args:
        experiment: experiment name.
        run_name: run name (default: a generated ``adjective-noun-N``).
        tracking_uri: a directory or ``file:`` URI (default ``./mlruns``), or
            ``http(s)://host:port`` for an MLflow tracking server; a list writes to each.
            Default: ``STEPLOG_TRACKING_URI``, then ``MLFLOW_TRACKING_URI``, then ``./mlruns``.
        tags: run tags set at creation.
        sinks: extra destinations (objects implementing :class:`steplog.typing.Sink`).
        **options: ``flush_interval``, ``max_buffer``, ``on_full``, ``durability``,
            ``handle_signals``, ``close_timeout`` (see the README).
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(Options)}
    if unknown:
        raise TypeError(f"start_run() got unknown options: {', '.join(sorted(unknown))}")
    opts = Options(**options)
    check_experiment_name(experiment)
    if run_name is None:
        run_name = random_run_name()
    elif not isinstance(run_name, str) or not run_name or len(run_name) > 250:
        raise InvalidValueError(f"run_name {run_name!r} is not allowed: a non-empty str of at most 250 characters")
    clean_tags: dict[str, str] = {}
    for key, value in (tags or {}).items():
        clean_tags[check_key(key, "tag")] = check_tag_value(key, value)
    if isinstance(tracking_uri, (list, tuple)):
        uris = [resolve_tracking_uri(u) for u in tracking_uri]
    else:
        uris = [resolve_tracking_uri(tracking_uri)]  # type: ignore[arg-type]
    # a server first: it assigns the run id, and the local store joins the run under that id
    uris.sort(key=lambda u: not u.lower().startswith(("http://", "https://")))
    all_sinks: list[Sink] = [make_sink(uri, opts) for uri in uris] if sinks is None or tracking_uri else []
    all_sinks += list(sinks or ())
    from .sinks.mlruns import default_user

    request = RunRequest(
        experiment_name=experiment,
        run_name=run_name,
        tags=clean_tags,
        start_time=_now_ms(),
        user_id=default_user(),
    )
    run = Run(request, all_sinks, opts, tracking_uri=uris[0] if all_sinks[:1] and uris else "memory")
    if not _in_event_loop():
        run._start_threaded()
    else:
        _exit.register(run)  # not started yet: the exit hook still writes what it buffered
    if opts.handle_signals is not False:
        _exit.install_signal_handlers(explicit=opts.handle_signals is True)
    return run
