"""Helpers for users' own tests: an in-memory sink that records everything a run writes."""

from __future__ import annotations

import dataclasses
import time
import uuid

from ._records import ArtifactRecord, MetricPoint, RunInfo, RunStatus
from .typing import Batch, RunRequest

__all__ = ["MemorySink"]


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
