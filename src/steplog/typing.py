"""Public protocols and the data a sink receives: implement :class:`Sink` to add a destination.

A sink knows nothing of threads, queues or timing. The writer calls it from one
task at a time, in order: ``open`` once, then ``write`` for each batch (again with
the same batch after a failure: the sink marks what it finished in
``batch.done`` so a retry never writes anything twice), then ``close``.
``write_sync``/``close_sync`` are the emergency path used when no event loop can
run (a signal handler on the loop's own thread, interpreter exit after the loop
is gone); they must be bounded and must not wait on the event loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ._records import ArtifactRecord, RunInfo, RunStatus

__all__ = ["Batch", "RunRequest", "Sink"]


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

    ``metrics`` holds ``(key, items)`` with ``items`` interleaved as
    ``[timestamp_ms, value, step, timestamp_ms, value, step, ...]`` in logged order.
    ``done`` is the sink's own progress mark: entries ``("metric", key)``,
    ``("param", key)``, ``("tag", key)``, ``("artifact", path)`` are skipped on a retry.
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
    """A destination for a run's data (the local mlruns store, an MLflow server, memory)."""

    async def open(self, request: RunRequest) -> RunInfo:
        """Create (or join, when ``request.run_id`` is set) the run; return its identity."""
        ...

    async def write(self, batch: Batch) -> None:
        """Write the batch, marking each finished entry in ``batch.done``; raise on failure."""
        ...

    async def close(self, status: RunStatus, end_time: int) -> None:
        """Record the run's final status and end time, and release resources."""
        ...

    def write_sync(self, batch: Batch) -> None:
        """Emergency write without an event loop (bounded; best effort)."""
        ...

    def close_sync(self, status: RunStatus, end_time: int) -> None:
        """Emergency close without an event loop (bounded; best effort)."""
        ...
