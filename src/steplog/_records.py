"""Small immutable types shared by the run, the writer, the sinks and the reader."""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple

__all__ = ["ArtifactRecord", "MetricPoint", "RunInfo", "RunStatus", "Stats"]


class RunStatus(enum.IntEnum):
    """A run's status, with MLflow's integer codes (what the file store writes)."""

    RUNNING = 1
    SCHEDULED = 2
    FINISHED = 3
    FAILED = 4
    KILLED = 5


@dataclasses.dataclass(frozen=True, slots=True)
class RunInfo:
    """Identity and lifecycle of a run, as the destination recorded it."""

    run_id: str
    experiment_id: str
    experiment_name: str
    run_name: str
    artifact_uri: str
    tracking_uri: str
    start_time: int
    end_time: int | None = None
    status: RunStatus = RunStatus.RUNNING
    user_id: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Stats:
    """What a run has done so far (``run.stats()``).

    ``logged == written + queued + dropped + lost`` once the writer has taken what it drained;
    latencies are seconds from the moment the oldest record of a write was logged until
    the write returned.
    """

    logged: int
    written: int
    queued: int
    dropped: int
    flushes: int
    bytes_written: int
    last_flush_latency: float
    max_flush_latency: float
    retries: int
    errors: int
    last_error: str | None
    blocking_reads: int = 0
    """Device tensor values (CUDA, JAX) read with a blocking copy at the log call, because
    the most values allowed to wait on the device were waiting (see the README's GPU section).
    ``dropped`` also counts device values modified in place before they could be read."""
    lost: int = 0
    """Metric points a sink refused for good (a name the file system cannot hold, say): never written."""
    backlog: int = 0
    """Metric points a sink has taken but its destination has not acknowledged yet (a tracking
    server during an outage: held in memory or in the on-disk journal). They count as ``written``
    (the sink keeps them safe) and are sent when the server answers again."""
    spilled: int = 0
    """Of those, the points that went to the on-disk outage journal (``steplog sync`` sends them if
    the run ends before the server is back)."""


class MetricPoint(NamedTuple):
    """One point of a metric history."""

    step: int
    value: float
    timestamp: int


@dataclasses.dataclass(frozen=True, slots=True)
class ArtifactRecord:
    """An artifact to copy into the run: from a local path, or from bytes held in memory."""

    artifact_path: str
    """Destination, relative to the run's artifact root (a file path, or a directory for ``source``)."""
    source: str | None = None
    """Absolute local path of a file or directory to copy (taken when the writer runs)."""
    data: bytes | None = None
    """Content to write, for ``log_text`` and ``log_dict``."""
