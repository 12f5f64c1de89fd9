"""Run: what a user holds. Identity, the hot-path and slow-path log calls, barriers and closing.

A :class:`Run` owns a :class:`~steplog._buffer.Buffer` (where log calls put records)
and a :class:`~steplog._writer.Writer` (one task, and one lane per sink, moving them to the sinks).
Where the writer runs is decided once, when the run starts, by a host from
:mod:`steplog._hosting`: a thread of its own for sync code, the caller's event loop
for ``async with``. The run's state changes in one place (:meth:`Run._set_state`).
Options and destinations are chosen in :mod:`steplog._destinations`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, SupportsIndex

import anyio
import anyio.to_thread

from . import _exit
from ._buffer import Buffer
from ._destinations import Options, make_sinks
from ._destinations import resolve_tracking_uri as resolve_tracking_uri  # where _fsck and _demo import it from
from ._errors import InvalidValueError, RunStateError, StepLogError, WriteError
from ._hosting import (
    Host,
    LoopHosting,
    ThreadHosting,
    check_usable,
    now_ms,
    open_run,
    unwritten_error,
    writer_last_error,
    writer_lost,
    writer_pending,
)
from ._jobs import PARENT_TAG, RANK_TAG, JobPlan, NullSink, job_key, resolve_ranks
from ._layout import random_run_name
from ._lifecycle import END_STATUSES, RunState, exit_status, parse_status
from ._portal import current_loop
from ._ranks import Ranks
from ._records import ArtifactRecord, RunInfo, RunStatus, Stats
from ._resume import REWIND_TAG, ResumeSpec, check_run_id, resume_in, rewind_tag, run_id_from_env
from ._system_metrics import enabled_by_env
from ._tensors import DeviceValues
from ._validation import check_artifact_path, check_experiment_name, check_key, check_tag_value
from ._writer import Writer
from .typing import RunRequest, Sink

if TYPE_CHECKING:
    from typing import Self

__all__ = ["Run", "start_run"]

log = logging.getLogger("steplog")


def _mlflow_text(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """``values`` with None as ``'None'``, as MLflow stores ``str(value)`` for a param or a tag."""
    if isinstance(values, Mapping) and any(v is None for v in values.values()):
        return {k: "None" if v is None else v for k, v in values.items()}
    return values


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
        where: str | None = None,
        job: JobPlan | None = None,
        resume: ResumeSpec | None = None,
        system_metrics: bool = False,
    ) -> None:
        self._request = request
        self._sinks = list(sinks)  # resume reads them; artifacts are snapshotted into a local store's run folder
        self._job = job if job is not None else JobPlan(mode="off", ranks=Ranks(), writes=True)
        self._resume = resume
        self._system_metrics = system_metrics
        self._sampler: Any = None  # the system-metrics sampler, while it runs
        self._system_first_step = 0
        self._extras: list[Callable[[RunStatus, int], None]] = []  # stopped (in reverse) when the run ends
        self._options = options
        self._tracking_uri = tracking_uri
        self._where = tracking_uri if where is None else where
        # device tensors (CUDA, JAX) become floats in the writer, without stalling the device
        self._tensors = DeviceValues(flush_interval=options.flush_interval)
        self._buffer = Buffer(max_buffer=options.max_buffer, on_full=options.on_full, value_hook=self._tensors.convert)
        self._writer = Writer(self._buffer, sinks, flush_interval=options.flush_interval)
        self._writer.deferred = self._tensors
        self._state = RunState.NEW
        self._host: Host | None = None
        self._info: RunInfo | None = None
        self._pid = os.getpid()
        # re-entrant: steplog's SIGTERM handler runs in the main thread between any two bytecodes, also
        # inside _begin_close holding this lock, and closes the run from there (a plain Lock deadlocked)
        self._close_lock = threading.RLock()
        self._close_done = threading.Event()  # set when _finish has recorded the end (any thread)
        self._ended = threading.Event()  # set when the run is closed, whichever path closed it
        self._finish_started = False
        self._signalled = False  # set by steplog's SIGTERM/SIGINT handler while this run was open
        self._exit_hooks = _ExitHooks(self)  # what exit and signal handling may do with this run
        # The hot path: bind the buffer's methods on the instance, so run.log_metric(...) is
        # one call with no delegation (the class methods below carry the docs and types).
        self.__dict__["log_metric"] = self._buffer.log_metric
        self.__dict__["log_metrics"] = self._buffer.log_metrics

    # ------------------------------------------------------------------ hot path

    def log_metric(
        self, key: str, value: Any, step: SupportsIndex | None = None, timestamp: SupportsIndex | None = None
    ) -> None:
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

    def log_metrics(
        self, metrics: Mapping[str, Any], step: SupportsIndex | None = None, timestamp: SupportsIndex | None = None
    ) -> None:
        """Log several metrics of one step; all are checked before any is queued."""
        self._buffer.log_metrics(metrics, step, timestamp)

    # ------------------------------------------------------------------ params, tags, artifacts

    def log_param(self, key: str, value: Any) -> None:
        """Log a param (stored as ``str(value)``, as MLflow does); ParamChangedError if it differs from before."""
        self._buffer.log_params({key: "None" if value is None else value})

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log several params at once (all checked before any is queued)."""
        self._buffer.log_params(_mlflow_text(params))

    def set_tag(self, key: str, value: Any) -> None:
        """Set a tag (stored as ``str(value)``; setting it again overwrites)."""
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set several tags at once. Setting ``mlflow.runName`` renames the run, as in MLflow."""
        tags = _mlflow_text(tags)
        self._buffer.set_tags(tags)
        name = tags.get("mlflow.runName") if isinstance(tags, Mapping) else None
        if name is not None and self._info is not None:
            self._info = dataclasses.replace(self._info, run_name=str(name))

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Store a file or directory in the run's artifacts, as it is at the call.

        The call copies it (into the local store's staging folder, or a temporary
        directory), so re-saving the file right after the call does not change what is
        stored; the writer then moves the copy into place. A directory is copied without
        any tracking store inside it (``log_artifact(".")`` with ``./mlruns`` in ``.``).

        Args:
            local_path: an existing file or directory.
            artifact_path: folder inside the run's artifacts to put it in (default: the root).

        Raises:
            InvalidValueError: the path does not exist, is a tracking store, or its name
                clashes with an artifact already logged (a file and a folder of one name).
            WriteError: the copy failed.
        """
        from . import _artifacts

        source = Path(local_path)
        if not source.exists():
            raise InvalidValueError(f"artifact {os.fspath(local_path)!r} is not allowed: the path does not exist")
        name = source.resolve().name
        dest = name if artifact_path is None else f"{check_artifact_path(artifact_path)}/{name}"
        dest = check_artifact_path(dest)
        roots = [Path(root) for root in (getattr(sink, "root", None) for sink in self._sinks) if isinstance(root, Path)]
        run_dirs = [d for d in (getattr(sink, "run_dir", None) for sink in self._sinks) if isinstance(d, Path)]
        record = _artifacts.snapshot(
            source.resolve(),
            dest,
            staging=run_dirs[0] / _artifacts.STAGING if run_dirs else None,
            exclude=roots,
            index=_artifacts.index_of(self),
            bases=[d / "artifacts" for d in run_dirs],
        )
        self._buffer.log_artifact(record)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` (UTF-8) to ``artifact_file`` inside the run's artifacts."""
        from ._artifacts import check_fits, index_of

        if not isinstance(text, str):
            raise InvalidValueError(f"log_text() takes str, not {type(text).__name__}")
        path = check_artifact_path(artifact_file, "artifact file")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidValueError(
                f"artifact file {path!r}: the text is not valid Unicode ({exc.reason} at {exc.start})"
            ) from None
        run_dirs = [d for d in (getattr(sink, "run_dir", None) for sink in self._sinks) if isinstance(d, Path)]
        check_fits([path], [d / "artifacts" for d in run_dirs])
        index_of(self).claim([path])
        self._buffer.log_artifact(ArtifactRecord(artifact_path=path, data=data))

    def log_dict(self, dictionary: Any, artifact_file: str) -> None:
        """Write a JSON (or, for ``.yaml``/``.yml`` with PyYAML installed, YAML) artifact.

        The object is serialized at the call, so later changes to it are not logged.
        """
        from ._artifacts import check_fits, index_of

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
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate in a YAML string (JSON escapes them)
            raise InvalidValueError(f"artifact file {path!r}: the object holds text that is not valid Unicode") from exc
        run_dirs = [d for d in (getattr(sink, "run_dir", None) for sink in self._sinks) if isinstance(d, Path)]
        check_fits([path], [d / "artifacts" for d in run_dirs])
        index_of(self).claim([path])
        self._buffer.log_artifact(ArtifactRecord(artifact_path=path, data=data))

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

    @property
    def writes(self) -> bool:
        """False on a rank that does not write (``ranks="zero"``, rank > 0): calls are checked, nothing is kept."""
        return self._job.writes

    @property
    def rank(self) -> int:
        """This process's rank in its job (0 without a launcher)."""
        return self._job.ranks.rank

    @property
    def world_size(self) -> int:
        """The number of processes in the job (1 without a launcher)."""
        return self._job.ranks.world_size

    @property
    def closed(self) -> bool:
        """True once the run is closed."""
        return self._state is RunState.CLOSED

    # ------------------------------------------------------------------ state

    def _set_state(self, new: RunState) -> None:
        """The one place the run's state changes (an impossible move is a steplog bug)."""
        self._state = self._state.check_transition(new)

    def _begin_close(self) -> bool:
        """Move to CLOSING; False when another close got there first (or in a forked child)."""
        with self._close_lock:
            if self._state in (RunState.CLOSING, RunState.CLOSED) or os.getpid() != self._pid:
                return False
            self._set_state(RunState.CLOSING)
            return True

    def _end_state(self, status: RunStatus) -> None:
        self._set_state(RunState.CLOSED)
        self._buffer.close("the run is closed: start a new run to log more")
        self._buffer.detach()
        if self._info is not None and self._info.end_time is None:
            self._info = dataclasses.replace(self._info, end_time=now_ms(), status=status)
        self._stop_sampler()
        self._stop_extras(status)
        _exit.unregister(self._exit_hooks)
        self._ended.set()

    def _refuse_restart(self) -> RunStateError:
        return RunStateError(f"the run is {self._state.value}; start a new run with steplog.start_run()")

    # ------------------------------------------------------------------ starting

    def _start_threaded(self) -> None:
        """Start the writer on a background thread with its own event loop (sync hosting)."""
        try:
            self._host, self._info = ThreadHosting.start(
                self._writer, self._buffer, self._request, self._finish, self._open
            )
        except BaseException:
            self._stop_extras(RunStatus.FAILED)
            raise
        self._set_state(RunState.RUNNING)
        _exit.register(self._exit_hooks)
        self._start_extras()

    # ------------------------------------------------------------------ long jobs: opening and extra tasks

    async def _open(self, writer: Writer, request: RunRequest) -> RunInfo:
        """Open the run: the job's parent first (``ranks="each"``), the resumed run's state, then every sink."""
        if self._job.mode == "each" and self._job.writes:
            from ._jobs import open_parent

            parent_id, experiment_id, end_parent = await open_parent(self._sinks, request, self._job, self._options)
            self._extras.append(end_parent)
            tags = {**request.tags, PARENT_TAG: parent_id, RANK_TAG: str(self.rank)}
            request = dataclasses.replace(request, tags=tags, experiment_id=self._local_id(experiment_id))
        resume = self._resume
        if resume is not None:
            state = await resume_in(self._sinks, resume)
            tags = dict(request.tags)
            if resume.rewind_to_step is not None:
                tags[REWIND_TAG] = rewind_tag(resume.rewind_to_step)
            request = dataclasses.replace(
                request,
                run_id=state.run_id,
                experiment_id=self._local_id(state.experiment_id),
                experiment_name=state.experiment_name or request.experiment_name,
                start_time=state.start_time,
                run_name=resume.run_name or state.run_name,
                tags=tags,
            )
            self._buffer.seed(params=state.params, tags=state.tags, metric_keys=state.metric_keys, step=state.last_step)
            self._system_first_step = state.last_system_step + 1
        return await open_run(writer, request)

    def _local_id(self, experiment_id: str) -> str | None:
        """The experiment id to open the run in, when the first destination is a local store.

        A server's experiment ids mean nothing in a local store that mirrors it: there the
        experiment is found by name, as for a new run.
        """
        from .sinks.mlruns import MlrunsSink

        return experiment_id if self._sinks and isinstance(self._sinks[0], MlrunsSink) else None

    def _start_extras(self) -> None:
        """Start the heartbeat (local stores) and the system-metrics sampler, off the hot path."""
        if not self._job.writes:
            return
        from ._heartbeat import Heartbeat
        from .sinks.mlruns import MlrunsSink

        for sink in self._sinks:
            run_dir = getattr(sink, "run_dir", None)
            if isinstance(sink, MlrunsSink) and run_dir is not None:
                beat = Heartbeat(run_dir)
                beat.start()
                self._extras.append(_stopper(beat))
        if self._system_metrics and self._job.ranks.local_rank == 0:
            from ._system_metrics import SystemMetrics

            buffer = self._buffer
            sampler = SystemMetrics(
                lambda metrics, step: buffer.log_side_metrics(metrics, step, now_ms()),
                interval=self._options.system_metrics_interval,
                first_step=getattr(self, "_system_first_step", 0),
            )
            sampler.start()
            self._sampler = sampler

    def _stop_sampler(self) -> None:
        """Stop sampling system metrics as a close begins, so every sample taken is written."""
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.stop()

    def _stop_extras(self, status: RunStatus) -> None:
        extras, self._extras = self._extras, []
        end = self._info.end_time if self._info is not None and self._info.end_time is not None else now_ms()
        for stop in reversed(extras):
            try:
                stop(status, end)
            except Exception as exc:  # the run has ended; a parent or heartbeat left behind is reported
                log.warning("steplog: ending run %s: %s", self._request.run_name, exc)

    async def astart(self) -> Self:
        """Start the writer as a task in the current event loop (asyncio or trio).

        Called by ``async with``; call it yourself when not using a context manager, and
        then :meth:`aclose` from the same task.
        """
        if self._state is not RunState.NEW:
            if self._state is RunState.RUNNING:
                return self
            raise self._refuse_restart()
        try:
            self._host, self._info = await LoopHosting.start(
                self._writer, self._buffer, self._request, self._finish, self._finish_sync, self._open
            )
        except Exception:
            # the destination refused the run and the caller has the error: not again at exit
            _exit.unregister(self._exit_hooks)
            self._stop_extras(RunStatus.FAILED)
            raise
        self._set_state(RunState.RUNNING)
        _exit.register(self._exit_hooks)
        self._start_extras()
        return self

    # ------------------------------------------------------------------ barriers

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything logged before the call is written (to the OS, or fsynced).

        Called while the run closes (from another thread), it waits for the close and reports
        what the close could not write.

        Raises:
            WriteError: something could not be written (it stays queued and is retried).
            FlushTimeoutError: ``timeout`` seconds passed first (says what is unwritten).
            RunStateError: called from inside the event loop the run's writer runs in
                (use ``await run.aflush()`` there), or the run's writer stopped with its event loop.
            StepLogError: called in a forked child (the writer lives in the parent).
        """
        if os.getpid() != self._pid:
            check_usable(self._buffer)  # raises: the writer's thread does not exist in a forked child
        host = self._running_host()
        if host is not None:
            try:
                host.flush(timeout)
                return
            except (WriteError, RuntimeError):
                if self._state is RunState.RUNNING:
                    raise
                # a close began meanwhile: its outcome is the answer (what it wrote, or could not)
        if self._host is not None:
            self._host.check_blocking("flush()", "await run.aflush()")
        self._close_outcome(timeout)

    async def aflush(self, timeout: float | None = None) -> None:
        """Wait, without blocking the event loop, until everything logged before the call is written."""
        if os.getpid() != self._pid:
            check_usable(self._buffer)  # raises: the writer does not exist in a forked child
        host = self._running_host()
        if host is not None:
            try:
                await host.aflush(timeout)
                return
            except (WriteError, RuntimeError):
                if self._state is RunState.RUNNING:
                    raise
        await anyio.to_thread.run_sync(self._close_outcome, timeout, abandon_on_cancel=True)

    def _running_host(self) -> Host | None:
        """The host while the run is running; None once a close began; RunStateError before the start."""
        if self._state is RunState.NEW:
            raise RunStateError("the run has not started yet: enter it with `async with run` first")
        if self._state is RunState.RUNNING:
            assert self._host is not None
            return self._host
        return None

    def _close_outcome(self, timeout: float | None) -> None:
        """For a barrier during or after close: wait for the close, then raise what it left unwritten."""
        if not self._ended.wait(timeout):
            raise self._writer.timeout_error("flush()", timeout)
        error = unwritten_error(self._writer)
        if error is not None:
            raise error

    # ------------------------------------------------------------------ closing

    def close(self, status: str | RunStatus = "FINISHED", timeout: float | None = None) -> None:
        """Write everything, record the end time and status, and stop the writer.

        Bounded: gives up after ``timeout`` seconds (default: the ``close_timeout`` option)
        and raises FlushTimeoutError naming what was not written. Closing twice is a no-op
        (a close while another runs waits for it). For an async run, called from another
        thread: everything is written and the run ends, and the task that started the run
        still leaves it (``async with`` or ``await run.aclose()``).
        """
        final = parse_status(status, END_STATUSES)
        timeout = self._options.close_timeout if timeout is None else timeout
        if os.getpid() != self._pid or self._state is RunState.CLOSED:
            return  # a forked child has no writer to close; a closed run stays as it ended
        if self._state is RunState.NEW:
            # created inside an event loop (a notebook, say) and never entered: write what was
            # logged through a writer thread, as outside a loop, rather than drop it
            self._start_threaded()
        host = self._host
        assert host is not None
        host.check_blocking("close()", "await run.aclose()")
        if not self._begin_close():
            self._ended.wait(timeout)  # another close is writing: return once it has ended the run
            return
        self._stop_sampler()
        try:
            host.close(final, timeout)
        finally:
            self._end_state(final)

    async def aclose(self, status: str | RunStatus = "FINISHED", timeout: float | None = None) -> None:
        """Like :meth:`close`, without blocking the event loop."""
        final = parse_status(status, END_STATUSES)
        timeout = self._options.close_timeout if timeout is None else timeout
        if os.getpid() != self._pid:
            return
        if self._state is RunState.NEW:
            await self.astart()  # never entered: start the writer here so that what was logged is written
        host = self._host
        assert host is not None
        if not self._begin_close():
            if not self._ended.is_set():  # another close is writing: wait for it without blocking the loop
                await anyio.to_thread.run_sync(self._ended.wait, timeout, abandon_on_cancel=True)
            await host.aleave()  # closed from another thread: the task that entered the run leaves here
            return
        self._stop_sampler()
        try:
            await host.aclose(final, timeout)
        finally:
            self._end_state(final)

    async def _finish(self, status: RunStatus, timeout: float) -> None:
        """Drain, write, record the end: the common close path (runs in the writer's loop)."""
        self._finish_started = True
        try:
            await self._finish_once(status, timeout)
        finally:
            self._close_done.set()

    async def _finish_once(self, status: RunStatus, timeout: float) -> None:
        writer = self._writer
        end_time = now_ms()
        error: BaseException | None = None
        deadline = anyio.current_time() + timeout
        if self._signalled:  # SIGKILL may follow soon: sinks stop waiting on networks and journal first
            writer.interrupt()
        with anyio.move_on_after(timeout) as scope:
            await writer.stop()
        self._buffer.close(f"the run {self._info.run_id if self._info else ''} is closed: start a new run to log more")
        failing = writer_last_error(writer) if writer_pending(writer) else None
        if scope.cancelled_caught and failing is None:
            error = writer.timeout_error("close()", timeout)
        elif failing is not None:
            # still failing when close gave up: name the file and the OS error, not just the timeout
            error = WriteError(
                f"steplog could not write {writer.unwritten_summary()}"
                f"{f' (gave up after {timeout} s)' if scope.cancelled_caught else ''}: {failing}"
            )
            error.__cause__ = failing
            if isinstance(failing, OSError):
                error.errno, error.filename = failing.errno, failing.filename
        if status is RunStatus.FINISHED and writer_lost(writer) > 0:
            status = RunStatus.FAILED  # a sink refused records for good: the run did not log everything
        if error is None:
            try:  # records refused for good that no barrier has reported yet: close says so, once
                writer.raise_if_unwritten()
            except WriteError as exc:
                error = exc
        with anyio.move_on_after(max(0.5, deadline - anyio.current_time())):
            try:
                await writer.close_sinks(status, end_time)
            except WriteError as exc:
                # keep both: a sink's close may say where the unwritten data went (the REST journal)
                error = exc if error is None else type(error)(f"{error}; {exc}")
        if self._info is not None:
            self._info = dataclasses.replace(self._info, end_time=end_time, status=status)
        if error is not None:
            raise error

    def _finish_sync(self, status: RunStatus, timeout: float) -> None:
        """The close path when no event loop can run it: write what is left through the sinks' sync calls."""
        self._buffer.close("the run is closed: start a new run to log more")
        if status is RunStatus.FINISHED and writer_lost(self._writer) > 0:
            status = RunStatus.FAILED
        self._writer.emergency_flush(status, now_ms(), timeout=timeout)

    def _emergency_close(self, status: RunStatus) -> None:
        """Close from a signal handler or at exit: bounded, never raises."""
        host = self._host
        timeout = self._options.close_timeout
        if self._state is RunState.CLOSING and isinstance(host, ThreadHosting):
            # a close is under way (the signal may have interrupted the very thread waiting for it):
            # let it write everything and record the end before we go on; if the signal landed
            # before that close reached the writer's thread, run it from here
            if not self._finish_started:
                try:
                    host.finish_interrupted(status, timeout)
                except Exception as exc:  # nobody is left to catch it: say it on stderr
                    log.error("steplog: closing run %s: %s", self._request.run_name, exc)
            self._close_done.wait(timeout)
            return
        if self._state is RunState.NEW or isinstance(host, ThreadHosting):
            try:
                self.close(status, timeout=timeout)
            except (StepLogError, OSError) as exc:  # nobody is left to catch it: say it on stderr
                log.error("steplog: closing run %s at exit: %s", self._request.run_name, exc)
            return
        # hosted in an event loop: the loop may be the very thread we are interrupting; write synchronously
        if not self._begin_close():
            if self._finish_started and not self._close_done.is_set():
                # a close in that loop was under way (waiting on a sink) and never resumes: the process
                # ends (SIG_DFL) or is exiting. What it holds goes through the sinks' sync path now
                self._finish_sync(status, timeout)
            return
        try:
            self._finish_sync(status, timeout)
        finally:
            self._end_state(status)

    def _emergency_flush(self, timeout: float) -> None:
        """Write pending data from a signal handler without closing the run: bounded, never raises.

        Only for a run whose writer has its own thread; an async-hosted writer shares the
        interrupted thread, and its run is closed by ``async with`` or at exit instead.
        """
        if not isinstance(self._host, ThreadHosting) or self._state is not RunState.RUNNING:
            return
        if os.getpid() != self._pid:
            return
        try:
            self.flush(timeout)
        except (StepLogError, OSError):
            pass

    # ------------------------------------------------------------------ context managers

    def __enter__(self) -> Self:
        if self._state is RunState.NEW:
            self._start_threaded()
        elif self._state is not RunState.RUNNING:
            raise self._refuse_restart()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        status = exit_status(exc_type, exc, signalled=self._signalled)
        try:
            self.close(status)
        except StepLogError as error:
            if exc is None:
                raise
            exc.add_note(f"steplog: closing the run also failed: {error}")

    async def __aenter__(self) -> Self:
        return await self.astart()  # a run already writing (on its own thread) is returned as it is

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        status = exit_status(exc_type, exc, signalled=self._signalled)
        try:
            await self.aclose(status)
        except StepLogError as error:
            if exc is None:
                raise
            exc.add_note(f"steplog: closing the run also failed: {error}")

    def __repr__(self) -> str:
        ident = self._info.run_id if self._info else "not started"
        return f"<steplog.Run {ident} {self._state.value} at {self._where}>"


# ---------------------------------------------------------------------------- start_run


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
        sinks: extra destinations (objects implementing :class:`steplog.typing.Sink`); given
            without ``tracking_uri``, the run writes to these only.
        **options: ``flush_interval``, ``max_buffer``, ``on_full``, ``durability``,
            ``handle_signals``, ``close_timeout`` (see the README); for long and distributed jobs
            ``run_id`` (resume; default ``STEPLOG_RUN_ID``, then ``MLFLOW_RUN_ID``),
            ``rewind_to_step``, ``parent_run_id``, ``ranks`` (``"zero"``, ``"each"``, ``"off"``),
            ``system_metrics`` and ``system_metrics_interval``.

    Raises:
        InvalidValueError: a bad option, run name or tag value; a tracking URI steplog does not
            serve (``databricks``, ``postgresql://...``, an empty string); no destination at all.
        StepLogError: the destination cannot be created (a folder without write permission, a
            server that does not answer); the run to resume does not exist there.
    """
    opts = Options.from_kwargs(options)
    handle = opts.handle_signals if opts.handle_signals is not None else _handle_signals_from_env()
    check_experiment_name(experiment)
    run_name_given = run_name
    if run_name is None:
        run_name = random_run_name()
    elif not isinstance(run_name, str) or not run_name or len(run_name) > 250:
        raise InvalidValueError(f"run_name {run_name!r} is not allowed: a non-empty str of at most 250 characters")
    clean_tags: dict[str, str] = {}
    for key, value in _mlflow_text(tags or {}).items():
        clean_tags[check_key(key, "tag")] = check_tag_value(key, value)
    destinations = make_sinks(tracking_uri, sinks, opts)
    from ._runmeta import default_user

    job = plan_job(experiment, opts, run_name_given)
    resume = resume_spec(opts, job, run_name_given)
    if opts.parent_run_id is not None:
        clean_tags[PARENT_TAG] = opts.parent_run_id
    if job.mode == "each" and job.writes:
        run_name = f"{run_name_given or 'rank'}-{job.ranks.rank}"
    request = RunRequest(
        experiment_name=experiment,
        run_name=run_name,
        tags=clean_tags,
        start_time=now_ms(),
        user_id=default_user(),
    )
    chosen = destinations.sinks if job.writes else [NullSink()]
    if resume is not None and resume.rewind_to_step is not None:
        _check_rewindable(chosen)
    system_metrics = opts.system_metrics if opts.system_metrics is not None else enabled_by_env()
    run = Run(
        request,
        chosen,
        opts,
        tracking_uri=destinations.uri,
        where=destinations.where if job.writes else f"nowhere (rank {job.ranks.rank} of {job.ranks.world_size})",
        job=job,
        resume=resume,
        system_metrics=system_metrics and job.writes,
    )
    if current_loop() is None:
        run._start_threaded()
    else:
        _exit.register(run._exit_hooks)  # not started yet: the exit hook still writes what it buffered
    if handle is not False:
        _exit.install_signal_handlers(explicit=handle is True)
    return run


def _handle_signals_from_env() -> bool | None:
    """``STEPLOG_HANDLE_SIGNALS``: ``0``/``false``/``no``/``off`` keeps steplog's signal handlers out of the process
    (for runs whose ``start_run`` call the user does not write: MLflow's ``steplog+`` URIs, a framework's own)."""
    raw = os.environ.get("STEPLOG_HANDLE_SIGNALS")
    if raw is None or not raw.strip():
        return None
    word = raw.strip().lower()
    if word in ("0", "false", "no", "off"):
        return False
    if word in ("1", "true", "yes", "on"):
        return True
    raise InvalidValueError(
        f"environment variable STEPLOG_HANDLE_SIGNALS={raw[:40]!r} is not allowed: use 0/false/no/off or 1/true/yes/on"
    )


def plan_job(experiment: str, opts: Options, run_name: str | None) -> JobPlan:
    """Which mode this process runs in, and whether it writes (``ranks=``)."""
    mode, ranks = resolve_ranks(opts.ranks)
    if mode == "zero":
        return JobPlan(mode=mode, ranks=ranks, writes=ranks.is_zero)
    if mode == "each":
        if opts.run_id:
            raise InvalidValueError(
                "run_id and ranks='each' cannot be combined: each rank writes its own child run of the job's "
                "parent; resume with ranks='zero' (rank 0 resumes the run), or restart the job under the same job id"
            )
        return JobPlan(mode=mode, ranks=ranks, writes=True, key=job_key(experiment, ranks), parent_name=run_name)
    return JobPlan(mode=mode, ranks=ranks, writes=True)


def resume_spec(opts: Options, job: JobPlan, run_name: str | None) -> ResumeSpec | None:
    """What to resume: ``run_id=``, else ``STEPLOG_RUN_ID``, else ``MLFLOW_RUN_ID``; None for a new run."""
    run_id = opts.run_id
    if run_id == "":  # a new run, whatever the environment says (MLflow's own create_run, a sweep's trials)
        run_id = None
    elif run_id is None and job.mode != "each":
        found = run_id_from_env()
        run_id = None if found is None else found[0]
    if run_id is None:
        if opts.rewind_to_step is not None:
            raise InvalidValueError(
                "rewind_to_step needs the run to rewind: give run_id= (or set STEPLOG_RUN_ID / MLFLOW_RUN_ID)"
            )
        return None
    if not job.writes:
        return None  # a rank that writes nothing leaves the run to rank 0
    return ResumeSpec(run_id=check_run_id(run_id), rewind_to_step=opts.rewind_to_step, run_name=run_name)


def _check_rewindable(sinks: Sequence[Sink]) -> None:
    """Refuse a rewind at start where a destination cannot delete points (a tracking server, a custom sink)."""
    from .sinks.mlruns import MlrunsSink

    for sink in sinks:
        if not isinstance(sink, MlrunsSink):
            where = getattr(sink, "display_uri", None) or type(sink).__name__
            raise InvalidValueError(
                f"rewind_to_step is not possible with {where}: it cannot delete logged points. Start a new run "
                "with parent_run_id=<the old run's id> and log from the checkpoint's step on, or resume without "
                "rewind_to_step"
            )


def _stopper(task: Any) -> Callable[[RunStatus, int], None]:
    """An extra's stop, as :meth:`Run._stop_extras` calls it."""

    def stop(_status: RunStatus, _end: int) -> None:
        task.stop()

    return stop


class _ExitHooks:
    """The run as :mod:`steplog._exit` sees it (:class:`~steplog._exit.ExitTarget`): the few calls
    exit and signal handling make, so that module never reaches into a run's private state."""

    __slots__ = ("_run",)

    def __init__(self, run: Run) -> None:
        self._run = run

    @property
    def pid(self) -> int:
        return self._run._pid

    @property
    def closed(self) -> bool:
        return self._run.closed

    def mark_signalled(self) -> None:
        run = self._run
        run._signalled = True
        if run._finish_started and not run._close_done.is_set() and run._host is not None:
            # the close began before the signal and will not look at the flag again: its sinks
            # stop waiting on networks now (a close that has not begun calls it itself)
            run._host.interrupt_soon()

    def emergency_close(self, status: RunStatus) -> None:
        self._run._emergency_close(status)

    def emergency_flush(self, timeout: float) -> None:
        self._run._emergency_flush(timeout)
