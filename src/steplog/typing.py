"""Public protocols and the data a sink receives: implement :class:`Sink` (or :class:`SyncSink`) to add a destination.

A sink knows nothing of threads, queues or timing. The writer gives each sink its own
task and calls it one call at a time, in order: ``open`` once, then ``write`` for each
batch, then ``close``. A slow or failing sink never holds up another sink.

Writing a sink::

    class CsvSink:                       # a SyncSink: plain methods, run in a worker thread
        def open(self, request: RunRequest) -> RunInfo: ...
        def write(self, batch: Batch) -> None:
            for column in batch.metric_columns():          # only what is not marked done
                for step, value, ts in zip(column.steps, column.values, column.timestamps):
                    ...                                     # write one point
                batch.mark_done("metric", column.key)      # a retry skips it
            for key, value in batch.pending_params(): ...  # then batch.mark_done("param", key)
            for key, value in batch.pending_tags(): ...    # then batch.mark_done("tag", key)
            for record in batch.pending_artifacts(): ...   # then mark_done("artifact", record.artifact_path)
        def close(self, status: RunStatus, end_time: int) -> None: ...

* **Sync or async.** A method defined with ``async def`` is awaited in the writer's event
  loop; a plain one runs in a worker thread. A sink whose methods are all plain
  (:class:`SyncSink`) needs nothing else: its ``write``/``close`` are also the emergency
  path. An async sink may add ``write_sync``/``close_sync`` for the emergency path (a
  signal handler, interpreter exit: no event loop can run); they must be bounded and must
  not wait on the event loop. Without them, what the sink has not written by then is
  reported as unwritten.
* **Progress.** A batch comes again after a failure: mark each entry you finished with
  :meth:`Batch.mark_done` and iterate with ``metric_columns()``/``pending_*()``, which skip
  marked entries, so a retry never writes anything twice.
* **Errors.** Raise to report a failure. An ``OSError`` such as ``ENOSPC`` or ``EIO``, a
  timeout, a network error: the batch is retried with backoff. :class:`PermanentWriteError`
  (or an ``OSError`` whose errno refuses the name, such as ``ENAMETOOLONG``, ``EISDIR``,
  ``ENOTDIR``, ``EINVAL``; or a ``ValueError``/``TypeError``): the entry it names (its
  ``entry``, else the first entry not marked done) is dropped and counted in
  ``run.stats().lost``, the rest of the batch is written, and the run ends FAILED.
* **Optional attribute.** ``bytes_written: int`` (default 0) is summed into
  ``run.stats().bytes_written``.
* **Optional method.** ``outage_state()`` returning an object with ``backlog_points``,
  ``spilled_points``, ``retries`` and ``last_error`` (as
  :class:`steplog.sinks.mlflow_rest.OutageState` does) is summed into ``run.stats()``'s
  ``backlog``, ``spilled`` and ``retries``, and its ``last_error`` is shown when the writer has none:
  a sink that keeps data through an outage of its own says so there.

The first sink's :class:`~steplog.RunInfo` is the run's identity; the others get
``request.run_id`` set and join that run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, runtime_checkable

from ._errors import WriteError
from ._records import MetricPoint

if TYPE_CHECKING:
    from ._records import ArtifactRecord, RunInfo, RunStatus

__all__ = ["Batch", "EntryKind", "MetricColumn", "PermanentWriteError", "RunRequest", "Sink", "SyncSink"]

EntryKind = Literal["metric", "param", "tag", "artifact"]
"""What a batch entry is; with its name (metric/param/tag key, or artifact path) it identifies the entry."""


class PermanentWriteError(WriteError):
    """Raised by a sink for an entry it can never write (retrying cannot help).

    The writer drops that entry (``entry``, or the batch's first entry not marked done),
    counts it in ``run.stats().lost``, writes the rest, and reports the error at the next
    ``flush()`` or ``close()``; the run ends FAILED.
    """

    def __init__(self, message: str, *, entry: tuple[EntryKind, str] | None = None) -> None:
        super().__init__(message)
        self.entry: tuple[EntryKind, str] | None = entry


class MetricColumn(NamedTuple):
    """One metric key's points in a batch, as parallel columns in logged order."""

    key: str
    steps: Sequence[int]
    values: Sequence[float]
    timestamps: Sequence[int]
    """Milliseconds since the epoch."""

    def points(self) -> list[MetricPoint]:
        """The column as :class:`~steplog.MetricPoint` tuples."""
        return [
            MetricPoint(step=s, value=v, timestamp=t)
            for s, v, t in zip(self.steps, self.values, self.timestamps, strict=True)
        ]


@dataclasses.dataclass(frozen=True, slots=True)
class RunRequest:
    """What a sink needs to create (or join) a run."""

    experiment_name: str
    run_name: str
    tags: Mapping[str, str]
    start_time: int
    user_id: str
    run_id: str | None = None
    """Set when another sink already created the run: join it under this id."""
    experiment_id: str | None = None


@dataclasses.dataclass(slots=True)
class Batch:
    """One drained slice of the run, handed to a sink.

    Read it with :meth:`metric_columns`, :meth:`pending_params`, :meth:`pending_tags` and
    :meth:`pending_artifacts`, and report progress with :meth:`mark_done`. Each sink gets
    its own Batch (its own progress marks) over the same data; do not modify the data.

    ``metrics`` and ``done`` are the internal representation, read directly by the built-in
    sinks for speed: ``metrics`` holds ``(key, items)`` with ``items`` interleaved as
    ``[timestamp_ms, value, step, ...]``, and ``done`` the marked ``(kind, name)`` entries.
    They may change in any release; other sinks use the methods.
    """

    metrics: list[tuple[str, list[Any]]]
    params: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    tags: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    artifacts: list[ArtifactRecord] = dataclasses.field(default_factory=list)
    done: set[tuple[str, str]] = dataclasses.field(default_factory=set)

    @property
    def points(self) -> int:
        """Number of metric points in the batch."""
        return sum(len(items) for _key, items in self.metrics) // 3

    def metric_columns(self) -> Iterator[MetricColumn]:
        """Each metric key not marked done, with its points as columns (one key may come once per batch)."""
        done = self.done
        for key, items in self.metrics:
            if ("metric", key) not in done:
                yield MetricColumn(key, items[2::3], items[1::3], items[0::3])

    def pending_params(self) -> list[tuple[str, str]]:
        """``(key, value)`` of params not marked done."""
        return [(k, v) for k, v in self.params if ("param", k) not in self.done]

    def pending_tags(self) -> list[tuple[str, str]]:
        """``(key, value)`` of tags not marked done, in logged order (a tag set twice comes twice)."""
        return [(k, v) for k, v in self.tags if ("tag", k) not in self.done]

    def pending_artifacts(self) -> list[ArtifactRecord]:
        """Artifacts not marked done."""
        return [a for a in self.artifacts if ("artifact", a.artifact_path) not in self.done]

    def mark_done(self, kind: EntryKind, name: str) -> None:
        """Record that this sink finished an entry: a retry of this batch skips it."""
        self.done.add((kind, name))

    def is_marked(self, kind: str, name: str) -> bool:
        """True if :meth:`mark_done` was called for the entry."""
        return (kind, name) in self.done

    def first_unmarked(self) -> tuple[EntryKind, str] | None:
        """The first entry not marked done, in the order metrics, params, tags, artifacts."""
        done = self.done
        for key, _items in self.metrics:
            if ("metric", key) not in done:
                return ("metric", key)
        for key, _text in self.params:
            if ("param", key) not in done:
                return ("param", key)
        for key, _text in self.tags:
            if ("tag", key) not in done:
                return ("tag", key)
        for record in self.artifacts:
            if ("artifact", record.artifact_path) not in done:
                return ("artifact", record.artifact_path)
        return None

    def remaining(self) -> Batch:
        """A batch with only what is not marked done (the same lists, not copies, where possible)."""
        done = self.done
        return Batch(
            metrics=[(k, v) for k, v in self.metrics if ("metric", k) not in done],
            params=[(k, v) for k, v in self.params if ("param", k) not in done],
            tags=[(k, v) for k, v in self.tags if ("tag", k) not in done],
            artifacts=[a for a in self.artifacts if ("artifact", a.artifact_path) not in done],
        )

    def is_done(self) -> bool:
        """True once every entry is marked done."""
        return self.remaining().is_empty()

    def is_empty(self) -> bool:
        """True when the batch holds nothing."""
        return not (self.metrics or self.params or self.tags or self.artifacts)


@runtime_checkable
class Sink(Protocol):
    """A destination for a run's data (the local mlruns store, an MLflow server, memory).

    Each method may be ``async def`` (awaited in the writer's loop) or plain (run in a
    worker thread; see :class:`SyncSink`): both kinds satisfy this protocol.
    ``write_sync``/``close_sync`` are optional: the emergency path without an event loop
    (see the module docstring). ``bytes_written`` (an ``int`` attribute) is optional too.
    ``interrupt()`` is optional: a plain method the writer calls in its loop when the process
    got SIGTERM or SIGINT and the run is closing, before the close's last writes. A sink that
    waits on something slow (a network) stops waiting and keeps what it took, so that its
    ``close`` puts it somewhere durable first: the grace period before SIGKILL is short.
    """

    def open(self, request: RunRequest) -> Awaitable[RunInfo] | RunInfo:
        """Create (or join, when ``request.run_id`` is set) the run; return its identity."""
        ...

    def write(self, batch: Batch) -> Awaitable[None] | None:
        """Write the batch, marking each finished entry with ``batch.mark_done``; raise on failure."""
        ...

    def close(self, status: RunStatus, end_time: int) -> Awaitable[None] | None:
        """Record the run's final status and end time, and release resources."""
        ...


@runtime_checkable
class SyncSink(Protocol):
    """A sink with plain methods: the writer runs them in a worker thread, one call at a time.

    They also serve as the emergency path, so they must be bounded and must not need an
    event loop.
    """

    def open(self, request: RunRequest) -> RunInfo:
        """Create (or join, when ``request.run_id`` is set) the run; return its identity."""
        ...

    def write(self, batch: Batch) -> None:
        """Write the batch, marking each finished entry with ``batch.mark_done``; raise on failure."""
        ...

    def close(self, status: RunStatus, end_time: int) -> None:
        """Record the run's final status and end time, and release resources."""
        ...
