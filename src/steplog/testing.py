"""Helpers for users' own tests.

* :class:`MemorySink`: an in-memory sink that records everything a run writes.
* :func:`defer_cpu_tensors` with :class:`CpuBackend` (and its :class:`ManualEvent`): run
  the device-tensor path (values read back in bulk by the writer, see the README's GPU
  section) with CPU tensors, so code that logs CUDA tensors can be tested on a machine
  without a GPU, and the deferral's cost measured against the plain path.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
import uuid
from typing import TYPE_CHECKING, Any, TypeVar, overload

from ._records import ArtifactRecord, MetricPoint, RunInfo, RunStatus
from ._tensors import Backend
from .typing import Batch, RunRequest

if TYPE_CHECKING:
    from ._tensors import DeviceValues

__all__ = ["CpuBackend", "ManualEvent", "MemorySink", "defer_cpu_tensors"]


@dataclasses.dataclass
class MemorySink:
    """A :class:`~steplog.typing.Sink` that keeps the run in memory.

    Use it to check what your training code logs without touching the disk::

        sink = MemorySink()
        with steplog.start_run("test", sinks=[sink]) as run:
            train(run)
        assert sink.values("loss") == [...]
    """

    metrics: dict[str, list[MetricPoint]] = dataclasses.field(default_factory=dict)
    params: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    artifacts: dict[str, ArtifactRecord] = dataclasses.field(default_factory=dict)
    status: RunStatus | None = None
    end_time: int | None = None
    request: RunRequest | None = None
    writes: int = 0

    async def open(self, request: RunRequest) -> RunInfo:
        self.request = request
        run_id = request.run_id or uuid.uuid4().hex
        return RunInfo(
            run_id=run_id,
            experiment_id=request.experiment_id or "0",
            experiment_name=request.experiment_name,
            run_name=request.run_name,
            artifact_uri=f"memory:/{run_id}/artifacts",
            tracking_uri="memory:",
            start_time=request.start_time or int(time.time() * 1000),
            user_id=request.user_id,
        )

    async def write(self, batch: Batch) -> None:
        self.write_sync(batch)

    def write_sync(self, batch: Batch) -> None:
        self.writes += 1
        for column in batch.metric_columns():
            self.metrics.setdefault(column.key, []).extend(column.points())
            batch.mark_done("metric", column.key)
        for key, text in batch.pending_params():
            self.params[key] = text
            batch.mark_done("param", key)
        for key, text in batch.pending_tags():
            self.tags[key] = text
            batch.mark_done("tag", key)
        for record in batch.pending_artifacts():
            self.artifacts[record.artifact_path] = record
            batch.mark_done("artifact", record.artifact_path)

    async def close(self, status: RunStatus, end_time: int) -> None:
        self.close_sync(status, end_time)

    def close_sync(self, status: RunStatus, end_time: int) -> None:
        self.status = status
        self.end_time = end_time

    def values(self, key: str) -> list[float]:
        """The values logged for ``key``, in order."""
        return [p.value for p in self.metrics.get(key, [])]

    def steps(self, key: str) -> list[int]:
        """The steps logged for ``key``, in order."""
        return [p.step for p in self.metrics.get(key, [])]


class ManualEvent:
    """A stand-in for a device event: complete when ``done`` is set (tests and benchmarks)."""

    __slots__ = ("done",)

    def __init__(self, done: bool) -> None:
        self.done = done


class CpuBackend:
    """Treats CPU tensors like device tensors, so the deferral runs without a GPU (tests, benchmarks).

    ``auto_complete=False`` leaves every copy in flight until :meth:`complete` is called,
    which is how tests fill the ring.
    """

    def __init__(self, *, auto_complete: bool = True) -> None:
        self._torch: Any = importlib.import_module("torch")
        self.auto_complete = auto_complete
        self.events: list[ManualEvent] = []
        self.copies = 0
        self.waits = 0

    def stream(self, device: int) -> int:
        return 0

    def copy(self, device: int, stream: int, tensors: list[Any]) -> tuple[Any, Any]:
        self.copies += 1
        event = ManualEvent(self.auto_complete)
        self.events.append(event)
        return self._torch.stack(tensors), event

    def done(self, event: Any) -> bool:
        return bool(event.done)

    def wait(self, event: Any) -> None:
        self.waits += 1
        event.done = True

    def complete(self) -> None:
        """Complete every copy started so far."""
        for event in self.events:
            event.done = True


_B = TypeVar("_B", bound=Backend)


@overload
def defer_cpu_tensors(
    values: DeviceValues, backend: None = None, *, max_outstanding: int | None = None, ring: int | None = None
) -> CpuBackend: ...


@overload
def defer_cpu_tensors(
    values: DeviceValues, backend: _B, *, max_outstanding: int | None = None, ring: int | None = None
) -> _B: ...


def defer_cpu_tensors(
    values: DeviceValues,
    backend: Backend | None = None,
    *,
    max_outstanding: int | None = None,
    ring: int | None = None,
) -> Backend:
    """Make ``values`` defer CPU torch tensors (and CPU JAX arrays) through ``backend``.

    Call it on a run's device values (``run._tensors``) before the run logs a tensor. Returns the backend in use
    (a :class:`CpuBackend` unless one is given).
    """
    if backend is None:
        backend = CpuBackend()
    values._backend = backend
    values._defer_cpu = True
    values._handlers.clear()
    if max_outstanding is not None:
        values._max = max_outstanding
    if ring is not None:
        values._ring = ring
    return backend
