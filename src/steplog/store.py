"""Reading runs back from any MLflow file store (steplog's or MLflow's own).

    store = steplog.Store("./mlruns")
    for run in store.runs(experiment="mnist", status="FINISHED"):
        print(run.run_name, run.status.name, run.latest["loss"].value)
    history = store.metric_history(run.run_id, "loss")
    plt.plot(history.steps, history.values)        # or history.to_pandas(), history.to_numpy()

Reading never writes to the store (MLflow's own reader creates ``.trash`` and the
Default experiment when it opens one). A live run's incomplete last line is
ignored, not an error, and :meth:`Store.watch` follows a run as it writes,
reading only what was appended since the last look.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Self, overload

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

__all__ = [
    "Experiment",
    "History",
    "HistoryArrays",
    "LatestMetrics",
    "RunData",
    "RunWatcher",
    "Store",
    "StoreError",
]


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


# --------------------------------------------------------------------------- histories


def _latest_index(steps: Sequence[int], stamps: Sequence[int], values: Sequence[float]) -> int:
    """Index of MLflow's "latest" point: ``max(points, key=(step, timestamp, value))`` in file order.

    Steps and timestamps are ints (a total order), so that scan ends on the group of points with
    the highest (step, timestamp), and within it keeps the first point whose value no later one
    exceeds: the same result, NaN included, as a scan by value over that group alone. Each pass
    here runs in C (``max``, ``map``, ``compress``), about 50 times faster than the tuple scan.
    """
    top_step = max(steps)
    group = list(itertools.compress(range(len(steps)), map(top_step.__eq__, steps)))
    if len(group) > 1:
        top_stamp = max(map(stamps.__getitem__, group))
        group = [i for i in group if stamps[i] == top_stamp]
    return group[0] if len(group) == 1 else max(group, key=values.__getitem__)


class HistoryArrays(NamedTuple):
    """A history as numpy arrays (:meth:`History.to_numpy`)."""

    steps: Any
    """``int64`` array of steps."""
    values: Any
    """``float64`` array of values."""
    timestamps: Any
    """``int64`` array of timestamps (ms since the epoch)."""


class History(Sequence[MetricPoint]):
    """A metric history in logged (file) order: a sequence of :class:`MetricPoint`.

    The column views ``steps``, ``values`` and ``timestamps`` are plain lists that
    matplotlib, numpy and pandas take directly; :meth:`to_numpy` and :meth:`to_pandas`
    convert in one call.
    """

    __slots__ = ("bad_lines", "key", "steps", "timestamps", "values")

    def __init__(
        self, key: str, steps: list[int], values: list[float], timestamps: list[int], *, bad_lines: int = 0
    ) -> None:
        self.key = key
        self.steps = steps
        self.values = values
        self.timestamps = timestamps
        self.bad_lines = bad_lines
        """Malformed lines skipped while reading (MLflow's reader would refuse the whole file)."""

    def __len__(self) -> int:
        return len(self.steps)

    @overload
    def __getitem__(self, index: int) -> MetricPoint: ...
    @overload
    def __getitem__(self, index: slice) -> list[MetricPoint]: ...
    def __getitem__(self, index: int | slice) -> MetricPoint | list[MetricPoint]:
        if isinstance(index, slice):
            return list(map(MetricPoint, self.steps[index], self.values[index], self.timestamps[index]))
        return MetricPoint(self.steps[index], self.values[index], self.timestamps[index])

    def __iter__(self) -> Iterator[MetricPoint]:
        return map(MetricPoint, self.steps, self.values, self.timestamps)

    def __repr__(self) -> str:
        return f"<History {self.key!r}: {len(self)} points>"

    def latest(self) -> MetricPoint | None:
        """The latest point by MLflow's rule (the max by step, timestamp, value), or None if empty."""
        if not self.steps:
            return None
        return self[_latest_index(self.steps, self.timestamps, self.values)]

    def to_numpy(self) -> HistoryArrays:
        """The columns as numpy arrays ``(steps, values, timestamps)`` (needs numpy)."""
        try:
            import numpy as np
        except ImportError:
            raise StoreError("History.to_numpy() needs numpy: pip install numpy") from None
        return HistoryArrays(
            np.array(self.steps, dtype=np.int64),
            np.array(self.values, dtype=np.float64),
            np.array(self.timestamps, dtype=np.int64),
        )

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` with columns step, value, timestamp (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise StoreError("History.to_pandas() needs pandas: pip install pandas") from None
        steps, values, stamps = self.to_numpy()
        return pd.DataFrame({"step": steps, "value": values, "timestamp": stamps})


def _read_history(key: str, path: Path) -> History:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read metric {key!r} at {path}: {exc.strerror or exc}") from exc
    steps, values, stamps, bad = parse_metric_lines(data)
    return History(key, steps, values, stamps, bad_lines=bad)


# --------------------------------------------------------------------------- runs


class LatestMetrics(Mapping[str, MetricPoint]):
    """A run's latest point per metric key, read from disk on first access and then kept.

    Looking up one key reads that key's file only, so listing many runs with a few
    metrics each stays cheap; iterating reads every file. A metric whose file has no
    complete line yet (a live writer's first append) has no latest point and is left out.
    """

    __slots__ = ("_cache", "_files")

    def __init__(self, files: Mapping[str, Path]) -> None:
        self._files = dict(files)
        self._cache: dict[str, MetricPoint | None] = {}

    def _get(self, key: str) -> MetricPoint | None:
        try:
            return self._cache[key]
        except KeyError:
            pass
        file = self._files.get(key)
        point = None if file is None else _read_history(key, file).latest()
        self._cache[key] = point
        return point

    def __getitem__(self, key: str) -> MetricPoint:
        point = self._get(key)
        if point is None:
            raise KeyError(key)
        return point

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._get(key) is not None

    def __iter__(self) -> Iterator[str]:
        return (key for key in sorted(self._files) if self._get(key) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"<LatestMetrics {sorted(self._files)}>"


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
    latest: LatestMetrics
    """Latest point per metric key (read lazily, see :class:`LatestMetrics`)."""
    path: Path
    metric_keys: tuple[str, ...] = ()
    """The run's metric keys, sorted (from the directory listing; reading no metric file)."""

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


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")


class Store:
    """A read-only view of an MLflow file store (the same URIs as ``start_run``).

    Args:
        uri: a directory or ``file:`` URI; ``sqlite:///path.db`` reads MLflow's database, and
            ``http(s)://host:port`` a tracking server over read-only REST calls (a
            ``steplog._rest_reader.RestStore``, with these methods; needs ``steplog[rest]``).
            Default: ``STEPLOG_TRACKING_URI``, then ``MLFLOW_TRACKING_URI``, then ``./mlruns``,
            as for ``start_run``.

    Raises:
        StoreError: the directory does not exist, or the URI is not a store steplog reads.
    """

    def __new__(cls, uri: str | os.PathLike[str] | None = None) -> Store:
        # a sqlite: URI (MLflow's database) is read by the SQLite reader, a Store with the same methods;
        # an http(s):// URI by the REST reader, which has the same methods (Python then skips __init__)
        if cls is Store:
            text = os.fspath(uri) if uri is not None else _default_uri()
            if text[:7].lower() == "sqlite:":
                from ._sqlite_reader import SqliteStore

                return object.__new__(SqliteStore)
            if text.lower().startswith(("http://", "https://")):
                from ._rest_reader import RestStore

                # RestStore answers with RemoteRun (no folder) where a Store answers RunData: not a subclass
                return RestStore(text)  # type: ignore[return-value]
        return object.__new__(cls)

    def __init__(self, uri: str | os.PathLike[str] | None = None) -> None:
        if uri is None:
            uri = os.environ.get("STEPLOG_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI") or "./mlruns"
        text = os.fspath(uri)
        if _SCHEME.match(text) and not text.lower().startswith("file:"):
            raise StoreError(
                f"{text!r} is not a store steplog reads: give a directory, a file: URI, "
                "sqlite:///path.db (MLflow's database) or http(s)://host:port (a tracking server)"
            )
        self.root = uri_to_path(text).absolute()
        if not self.root.is_dir():
            raise StoreError(f"no MLflow store at {self.root} (the directory does not exist)")

    def __repr__(self) -> str:
        return f"<steplog.Store {self.root}>"

    # ------------------------------------------------------------------ experiments

    def experiments(self, *, include_deleted: bool = False) -> list[Experiment]:
        """Every experiment, sorted by id (deleted ones, from ``.trash``, only if asked)."""
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
        """An experiment by name or id (deleted ones included)."""
        experiments = self.experiments(include_deleted=True)
        for exp in experiments:
            if name_or_id in (exp.name, exp.experiment_id):
                return exp
        names = ", ".join(sorted(repr(e.name) for e in experiments if e.lifecycle_stage == "active")) or "none"
        raise StoreError(f"no experiment named {name_or_id!r} in {self.root} (experiments: {names})")

    # ------------------------------------------------------------------ runs

    def runs(
        self,
        experiment: str | None = None,
        *,
        status: str | RunStatus | None = None,
        include_deleted: bool = False,
    ) -> list[RunData]:
        """Runs, newest first.

        Args:
            experiment: only this experiment's runs (name or id); default all active experiments.
            status: only runs with this status (``"RUNNING"``, ``RunStatus.FINISHED``, ...).
            include_deleted: also runs marked deleted (MLflow's ``search_runs`` leaves them out).
        """
        experiments = [self.experiment(experiment)] if experiment is not None else self.experiments()
        wanted = None if status is None else _to_status(status)
        out: list[RunData] = []
        for exp in experiments:
            for entry in exp.path.iterdir():
                if entry.name in RESERVED_EXPERIMENT_FOLDERS or not (entry / META).is_file():
                    continue
                run = self._load_run(entry)
                if run is None or (wanted is not None and run.status != wanted):
                    continue
                if run.lifecycle_stage == "deleted" and not include_deleted:
                    continue
                out.append(run)
        out.sort(key=lambda r: (-(r.start_time or 0), r.run_id))
        return out

    def get_run(self, run_id: str) -> RunData:
        """A run by id or unique id prefix.

        Raises:
            StoreError: no run matches, or the prefix matches several runs.
        """
        return self._load_run_or_raise(self._find_run_dir(run_id))

    def resolve_run_id(self, prefix: str) -> str:
        """The full id of the run whose id starts with ``prefix`` (it must be unique)."""
        return self._find_run_dir(prefix).name

    def _find_run_dir(self, prefix: str) -> Path:
        if not prefix or prefix in (".", "..") or "/" in prefix or os.sep in prefix:
            raise StoreError(f"{prefix!r} is not a run id: give a run id or the first characters of one")
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
                matches.extend(
                    entry
                    for entry in exp_dir.iterdir()
                    if entry.name.startswith(prefix)
                    and entry.name not in RESERVED_EXPERIMENT_FOLDERS
                    and (entry / META).is_file()
                )
        if not matches:
            raise StoreError(f"no run with id {prefix!r} in {self.root} (list them with `steplog runs`)")
        if len(matches) > 1:
            shown = ", ".join(sorted(m.name[:12] for m in matches)[:5])
            more = ", ..." if len(matches) > 5 else ""
            raise StoreError(
                f"run id prefix {prefix!r} is ambiguous: {len(matches)} runs match ({shown}{more}); "
                "give more characters"
            )
        return matches[0]

    def _load_run_or_raise(self, path: Path) -> RunData:
        run = self._load_run(path)
        if run is None:
            raise StoreError(f"run {path.name} in {path.parent} has a missing or broken meta.yaml")
        return run

    def _load_run(self, path: Path) -> RunData | None:
        try:
            meta = parse_meta((path / META).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        if not meta or "run_id" not in meta:
            return None
        tags = _read_values(path / "tags")
        metrics_dir = path / "metrics"
        files = dict(iter_files(metrics_dir)) if metrics_dir.is_dir() else {}
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
            start_time=_int_or_none(meta.get("start_time")),
            end_time=_int_or_none(meta.get("end_time")),
            lifecycle_stage=str(meta.get("lifecycle_stage") or "active"),
            user_id=str(meta.get("user_id") or ""),
            artifact_uri=str(meta.get("artifact_uri") or ""),
            params=_read_values(path / "params"),
            tags=tags,
            latest=LatestMetrics(files),
            path=path,
            metric_keys=tuple(sorted(files)),
        )

    # ------------------------------------------------------------------ metrics

    def metric_keys(self, run_id: str) -> list[str]:
        """The metric keys of a run, sorted."""
        folder = self._find_run_dir(run_id) / "metrics"
        return sorted(key for key, _ in iter_files(folder)) if folder.is_dir() else []

    def metric_history(self, run_id: str | RunData, key: str) -> History:
        """The full history of one metric, in logged (file) order.

        Args:
            run_id: a run id, a unique prefix of one, or a :class:`RunData` this store returned
                (which saves looking the run up again).
            key: the metric key (``/`` for nested keys, as logged).

        Raises:
            StoreError: no such run or metric (the message lists the run's metrics).
        """
        run_dir = run_id.path if isinstance(run_id, RunData) else self._find_run_dir(run_id)
        return _read_history(key, self._metric_file(run_dir, key))

    def _metric_file(self, run_dir: Path, key: str) -> Path:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise StoreError(f"{key!r} is not a metric key (keys are relative paths without '.' or '..' parts)")
        path = run_dir.joinpath("metrics", *parts)
        if not path.is_file():
            folder = run_dir / "metrics"
            keys = sorted(k for k, _ in iter_files(folder)) if folder.is_dir() else []
            shown = ", ".join(keys[:20]) + (", ..." if len(keys) > 20 else "") if keys else "none"
            raise StoreError(f"run {run_dir.name[:12]} has no metric {key!r} (its metrics: {shown})")
        return path

    def watch(self, run_id: str) -> RunWatcher:
        """A :class:`RunWatcher` following a run (id or unique prefix) as it writes."""
        return RunWatcher(self, self._find_run_dir(run_id))

    def alive(self, run_id: str) -> bool | None:
        """For a RUNNING run: True if its writer lives, False if it died without closing; else None.

        Told from the heartbeat steplog's writer refreshes (see :mod:`steplog._heartbeat`); a run
        MLflow wrote, or one that ended, gives None.
        """
        from ._heartbeat import liveness

        return liveness(self._find_run_dir(run_id))

    def close(self) -> None:
        """Release what the reader holds: nothing for a local store (a tracking server's reader closes its
        connection), so code reading any kind of store can close it the same way."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RunWatcher:
    """Follows a live run: each :meth:`poll` reads only what its metric files gained since the last.

    ``latest`` (MLflow's rule) and ``counts`` (points per key) cover everything read so far;
    a metric file that shrank or was replaced is read again from its start.
    """

    def __init__(self, store: Store, run_dir: Path) -> None:
        self._store = store
        self._dir = run_dir
        self.run_id = run_dir.name
        self.latest: dict[str, MetricPoint] = {}
        self.counts: dict[str, int] = {}
        self._offsets: dict[str, int] = {}

    def run(self) -> RunData:
        """The run's metadata as it is now (status, end time, params, tags)."""
        return self._store._load_run_or_raise(self._dir)

    def poll(self) -> dict[str, MetricPoint]:
        """Read what was appended since the last poll; return the keys whose latest point changed."""
        changed: dict[str, MetricPoint] = {}
        folder = self._dir / "metrics"
        if not folder.is_dir():
            return changed
        for key, path in sorted(iter_files(folder)):
            point = self._read_new(key, path)
            if point is not None and point != self.latest.get(key):
                self.latest[key] = point
                changed[key] = point
        return changed

    def _read_new(self, key: str, path: Path) -> MetricPoint | None:
        offset = self._offsets.get(key, 0)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < offset:  # truncated or replaced: start over
                    offset = 0
                    self.latest.pop(key, None)
                    self.counts[key] = 0
                f.seek(offset)
                data = f.read(size - offset)
        except OSError:
            return None  # removed between the listing and the read: the next poll sees the truth
        end = data.rfind(b"\n")
        if end < 0:
            return self.latest.get(key)
        self._offsets[key] = offset + end + 1
        steps, values, stamps, _bad = parse_metric_lines(data[: end + 1])
        if not steps:
            return self.latest.get(key)
        self.counts[key] = self.counts.get(key, 0) + len(steps)
        before = self.latest.get(key)
        if before is not None:  # continue MLflow's scan from the point it ended on
            steps.insert(0, before.step)
            values.insert(0, before.value)
            stamps.insert(0, before.timestamp)
        i = _latest_index(steps, stamps, values)
        return MetricPoint(steps[i], values[i], stamps[i])


# --------------------------------------------------------------------------- helpers


def _default_uri() -> str:
    return os.environ.get("STEPLOG_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI") or "./mlruns"


def _read_values(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    out: dict[str, str] = {}
    for key, path in iter_files(folder):
        try:
            out[key] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
    return dict(sorted(out.items()))


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _to_status(status: str | RunStatus) -> RunStatus:
    if isinstance(status, RunStatus):
        return status
    try:
        return RunStatus[str(status).upper()]
    except KeyError:
        raise StoreError(f"unknown run status {status!r}: use RUNNING, SCHEDULED, FINISHED, FAILED or KILLED") from None
