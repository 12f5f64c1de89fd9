"""A third sink written as a user would, from ``steplog.typing``'s docstring and the README alone.

A sync-only CSV sink (plain methods, no async twins, no write_sync): it is run in a worker
thread, reports progress with ``batch.mark_done`` and reads points with ``batch.metric_columns()``.
"""

from __future__ import annotations

import csv
import errno
import time
import uuid
from pathlib import Path

import pytest

import steplog
from steplog import RunInfo, RunStatus, WriteError
from steplog.typing import Batch, PermanentWriteError, RunRequest, Sink, SyncSink


class CsvSink:
    """Writes every metric point as a ``key,step,value,timestamp`` row; params and tags to their own files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.bytes_written = 0
        self.status: RunStatus | None = None
        self.fail_next = 0

    def open(self, request: RunRequest) -> RunInfo:
        self.folder.mkdir(parents=True, exist_ok=True)
        run_id = request.run_id or uuid.uuid4().hex
        return RunInfo(
            run_id=run_id,
            experiment_id="0",
            experiment_name=request.experiment_name,
            run_name=request.run_name,
            artifact_uri=self.folder.as_uri(),
            tracking_uri=self.folder.as_uri(),
            start_time=request.start_time or int(time.time() * 1000),
            user_id=request.user_id,
        )

    def write(self, batch: Batch) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise OSError(errno.EIO, "injected I/O error")
        with (self.folder / "metrics.csv").open("a", newline="") as f:
            out = csv.writer(f)
            for column in batch.metric_columns():
                for step, value, ts in zip(column.steps, column.values, column.timestamps, strict=True):
                    out.writerow([column.key, step, repr(value), ts])
                batch.mark_done("metric", column.key)
        for key, text in batch.pending_params():
            if "/" in key:
                raise PermanentWriteError(f"param {key!r}: this sink has no folders", entry=("param", key))
            self._append("params.csv", [key, text])
            batch.mark_done("param", key)
        for key, text in batch.pending_tags():
            self._append("tags.csv", [key, text])
            batch.mark_done("tag", key)
        for record in batch.pending_artifacts():
            batch.mark_done("artifact", record.artifact_path)

    def _append(self, name: str, row: list[str]) -> None:
        with (self.folder / name).open("a", newline="") as f:
            csv.writer(f).writerow(row)
        self.bytes_written += sum(len(x) for x in row)

    def close(self, status: RunStatus, end_time: int) -> None:
        self.status = status

    def rows(self, name: str) -> list[list[str]]:
        path = self.folder / name
        if not path.exists():
            return []
        with path.open(newline="") as f:
            return list(csv.reader(f))


def test_a_sync_csv_sink_gets_every_point_exactly_once(tmp_path: Path) -> None:
    """A sync-only sink works through start_run(sinks=[...]): every point once, in order, after a retried failure."""
    sink = CsvSink(tmp_path / "csv")
    assert isinstance(sink, SyncSink)
    assert isinstance(sink, Sink)  # structurally a Sink too: plain methods run in a worker thread
    with steplog.start_run("custom", sinks=[sink], flush_interval=0.01) as run:
        run.log_params({"lr": 0.1})
        for step in range(100):
            run.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 100}, step=step)
        run.flush()
        sink.fail_next = 1  # the next write fails once with EIO: retried, nothing doubled
        run.log_metric("loss", 0.5, step=100)
        run.set_tags({"stage": "done"})
        with pytest.raises(WriteError, match="injected I/O error"):
            run.flush()
        run.flush()  # the retry succeeded
        assert run.stats().bytes_written == sink.bytes_written > 0
    rows = sink.rows("metrics.csv")
    loss = [(int(r[1]), float(r[2])) for r in rows if r[0] == "loss"]
    acc = [(int(r[1]), float(r[2])) for r in rows if r[0] == "acc"]
    assert loss == [(s, 1.0 / (s + 1)) for s in range(100)] + [(100, 0.5)]
    assert acc == [(s, s / 100) for s in range(100)]
    assert sink.rows("params.csv") == [["lr", "0.1"]]
    assert ["stage", "done"] in sink.rows("tags.csv")
    assert sink.status == RunStatus.FINISHED
    assert run.stats().written == 201


def test_a_sinks_permanent_refusal_loses_only_that_entry(tmp_path: Path) -> None:
    """PermanentWriteError from a sync sink drops the entry it names, counts it lost, and the rest is written."""
    sink = CsvSink(tmp_path / "csv")
    with steplog.start_run("custom", sinks=[sink]) as run:
        run.log_params({"a": 1, "nested/b": 2, "c": 3})
        run.log_metric("x", 1.0)
        with pytest.raises(WriteError, match="this sink has no folders"):
            run.flush()
    assert sink.rows("params.csv") == [["a", "1"], ["c", "3"]]
    assert [r[0] for r in sink.rows("metrics.csv")] == ["x"]


def test_a_run_without_any_sink_is_refused_clearly() -> None:
    """start_run(sinks=[]) raises a typed error saying a run needs a sink (it was a raw IndexError)."""
    with pytest.raises(steplog.InvalidValueError, match="at least one sink"):
        steplog.start_run("nowhere", sinks=[])
