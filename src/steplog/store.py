"""Reading runs back from any MLflow file store (steplog's or MLflow's own).

    store = steplog.Store("./mlruns")
    for run in store.runs(experiment="mnist"):
        print(run.run_name, run.status, run.latest["loss"].value)
    history = store.metric_history(run.run_id, "loss")
    plt.plot(history.steps, history.values)

A live run's incomplete last line is ignored, not an error.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

from ._errors import StepLogError
from ._layout import (
    META,
    RESERVED_EXPERIMENT_FOLDERS,
    RESERVED_ROOT_FOLDERS,
    iter_files,
    parse_meta,
    parse_metric_lines,
    uri_to_path,
)
from ._records import MetricPoint, RunStatus

__all__ = ["Experiment", "History", "RunData", "Store", "StoreError"]


class StoreError(StepLogError, LookupError):
    """Raised when a store, experiment, run or metric cannot be found or read."""


@dataclasses.dataclass(frozen=True, slots=True)
class Experiment:
    """An experiment of a store."""

    experiment_id: str
    name: str
    artifact_location: str
    lifecycle_stage: str
    creation_time: int | None
    path: Path


@dataclasses.dataclass(frozen=True, slots=True)
class RunData:
    """A run's metadata, params, tags and latest metric values."""

    run_id: str
    experiment_id: str
    run_name: str | None
    status: RunStatus
    start_time: int | None
    end_time: int | None
    lifecycle_stage: str
    user_id: str
    artifact_uri: str
    params: dict[str, str]
    tags: dict[str, str]
    latest: dict[str, MetricPoint]
    path: Path

    @property
    def metrics(self) -> dict[str, float]:
        """Latest value per metric key (MLflow's rule: the max by step, timestamp, value)."""
        return {k: p.value for k, p in self.latest.items()}

    @property
    def duration_ms(self) -> int | None:
        """End minus start, in ms (None while running)."""
        if self.start_time is None or self.end_time is None:
            return None
        return self.end_time - self.start_time


class History(Sequence[MetricPoint]):
    """A metric history in logged order, with column views for plotting and data frames."""

    __slots__ = ("key", "steps", "timestamps", "values")

    def __init__(self, key: str, steps: list[int], values: list[float], timestamps: list[int]) -> None:
        self.key = key
        self.steps = steps
        self.values = values
        self.timestamps = timestamps

    def __len__(self) -> int:
        return len(self.steps)

    @overload
    def __getitem__(self, index: int) -> MetricPoint: ...
    @overload
    def __getitem__(self, index: slice) -> list[MetricPoint]: ...
    def __getitem__(self, index: int | slice) -> MetricPoint | list[MetricPoint]:
        if isinstance(index, slice):
            return [MetricPoint(*t) for t in zip(self.steps[index], self.values[index], self.timestamps[index])]
        return MetricPoint(self.steps[index], self.values[index], self.timestamps[index])

    def __iter__(self) -> Iterator[MetricPoint]:
        return map(MetricPoint, self.steps, self.values, self.timestamps)

    def __repr__(self) -> str:
        return f"<History {self.key!r}: {len(self)} points>"

    def latest(self) -> MetricPoint | None:
        """The latest point by MLflow's rule (max by step, timestamp, value)."""
        if not self.steps:
            return None
        return max(self, key=lambda p: (p.step, p.timestamp, p.value))

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` with columns step, value, timestamp (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise StoreError("History.to_pandas() needs pandas: pip install pandas") from None
        return pd.DataFrame({"step": self.steps, "value": self.values, "timestamp": self.timestamps})


class Store:
    """A read-only view of an MLflow file store (the same URIs as ``start_run``).

    Unlike MLflow's reader, opening a store never writes to it.
    """

    def __init__(self, uri: str | os.PathLike[str] | None = None) -> None:
        if uri is None:
            uri = os.environ.get("STEPLOG_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI") or "./mlruns"
        text = os.fspath(uri)
        if text.lower().startswith(("http://", "https://")):
            raise StoreError(f"{text!r} is a tracking server: Store reads local file stores only")
        self.root = uri_to_path(text).absolute()
        if not self.root.is_dir():
            raise StoreError(f"no MLflow store at {self.root} (the directory does not exist)")

    # ------------------------------------------------------------------ experiments

    def experiments(self, *, include_deleted: bool = False) -> list[Experiment]:
        """Every experiment, sorted by id."""
        out: list[Experiment] = []
        bases = [self.root] + ([self.root / ".trash"] if include_deleted else [])
        for base in bases:
            if not base.is_dir():
                continue
            for entry in base.iterdir():
                if entry.name in RESERVED_ROOT_FOLDERS or not (entry / META).is_file():
                    continue
                try:
                    meta = parse_meta((entry / META).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if not meta or "name" not in meta:
                    continue
                stage = str(meta.get("lifecycle_stage") or "active")
                if stage == "deleted" and not include_deleted:
                    continue
                out.append(
                    Experiment(
                        experiment_id=str(meta.get("experiment_id", entry.name)),
                        name=str(meta["name"]),
                        artifact_location=str(meta.get("artifact_location") or ""),
                        lifecycle_stage=stage,
                        creation_time=meta.get("creation_time"),
                        path=entry,
                    )
                )
        return sorted(out, key=lambda e: (len(e.experiment_id), e.experiment_id))

    def experiment(self, name_or_id: str) -> Experiment:
        """An experiment by name or id."""
        for exp in self.experiments(include_deleted=True):
            if name_or_id in (exp.name, exp.experiment_id):
                return exp
        raise StoreError(f"no experiment named {name_or_id!r} in {self.root}")

    # ------------------------------------------------------------------ runs

    def runs(self, experiment: str | None = None, *, status: str | RunStatus | None = None) -> list[RunData]:
        """Runs (newest first), optionally of one experiment (name or id) and one status."""
        experiments = [self.experiment(experiment)] if experiment is not None else self.experiments()
        wanted = None if status is None else _to_status(status)
        out: list[RunData] = []
        for exp in experiments:
            for entry in exp.path.iterdir():
                if entry.name in RESERVED_EXPERIMENT_FOLDERS or not (entry / META).is_file():
                    continue
                run = self._load_run(entry)
                if run is not None and (wanted is None or run.status == wanted):
                    out.append(run)
        out.sort(key=lambda r: (-(r.start_time or 0), r.run_id))
        return out

    def get_run(self, run_id: str) -> RunData:
        """A run by id or unique id prefix."""
        return self._load_run_or_raise(self._find_run_dir(run_id))

    def resolve_run_id(self, prefix: str) -> str:
        """The full id of the run whose id starts with ``prefix`` (it must be unique)."""
        return self._find_run_dir(prefix).name

    def _find_run_dir(self, prefix: str) -> Path:
        matches: list[Path] = []
        for base in (self.root, self.root / ".trash"):
            if not base.is_dir():
                continue
            for exp_dir in base.iterdir():
                if exp_dir.name in RESERVED_ROOT_FOLDERS or not exp_dir.is_dir():
                    continue
                exact = exp_dir / prefix
                if (exact / META).is_file():
                    return exact
                for entry in exp_dir.iterdir():
                    if entry.name.startswith(prefix) and (entry / META).is_file():
                        matches.append(entry)
        if not matches:
            raise StoreError(f"no run with id {prefix!r} in {self.root}")
        if len(matches) > 1:
            shown = ", ".join(sorted(m.name[:12] for m in matches[:5]))
            raise StoreError(f"run id prefix {prefix!r} is ambiguous ({shown}...): give more characters")
        return matches[0]

    def _load_run_or_raise(self, path: Path) -> RunData:
        run = self._load_run(path)
        if run is None:
            raise StoreError(f"run {path.name} in {path.parent} has a broken meta.yaml")
        return run

    def _load_run(self, path: Path) -> RunData | None:
        try:
            meta = parse_meta((path / META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not meta or "run_id" not in meta:
            return None
        tags = _read_values(path / "tags")
        latest: dict[str, MetricPoint] = {}
        metrics_dir = path / "metrics"
        if metrics_dir.is_dir():
            for key, file in iter_files(metrics_dir):
                point = self._history_of(key, file).latest()
                if point is not None:
                    latest[key] = point
        status_value = meta.get("status", 1)
        try:
            status = RunStatus(int(status_value)) if status_value is not None else RunStatus.RUNNING
        except (TypeError, ValueError):
            status = _to_status(str(status_value))
        run_name = meta.get("run_name") or tags.get("mlflow.runName")
        return RunData(
            run_id=str(meta["run_id"]),
            experiment_id=str(meta.get("experiment_id", path.parent.name)),
            run_name=None if run_name is None else str(run_name),
            status=status,
            start_time=meta.get("start_time"),
            end_time=meta.get("end_time"),
            lifecycle_stage=str(meta.get("lifecycle_stage") or "active"),
            user_id=str(meta.get("user_id") or ""),
            artifact_uri=str(meta.get("artifact_uri") or ""),
            params=_read_values(path / "params"),
            tags=tags,
            latest=latest,
            path=path,
        )

    # ------------------------------------------------------------------ metrics

    def metric_keys(self, run_id: str) -> list[str]:
        """The metric keys of a run, sorted."""
        folder = self._find_run_dir(run_id) / "metrics"
        return sorted(key for key, _ in iter_files(folder)) if folder.is_dir() else []

    def metric_history(self, run_id: str, key: str) -> History:
        """The full history of one metric, in logged (file) order."""
        path = self._find_run_dir(run_id) / "metrics" / key
        if not path.is_file():
            raise StoreError(f"run {run_id} has no metric {key!r}")
        return self._history_of(key, path)

    @staticmethod
    def _history_of(key: str, path: Path) -> History:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc
        steps, values, stamps, _bad = parse_metric_lines(data)
        return History(key, steps, values, stamps)


def _read_values(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    out: dict[str, str] = {}
    for key, path in iter_files(folder):
        try:
            out[key] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
    return out


def _to_status(status: str | RunStatus) -> RunStatus:
    if isinstance(status, RunStatus):
        return status
    try:
        return RunStatus[str(status).upper()]
    except KeyError:
        raise StoreError(f"unknown run status {status!r}: use RUNNING, FINISHED, FAILED or KILLED") from None
