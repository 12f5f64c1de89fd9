"""Reading runs back from MLflow's SQLite database (``steplog.Store("sqlite:///mlflow.db")``).

:class:`SqliteStore` has :class:`~steplog.store.Store`'s methods and returns the same types, so
the CLI (``runs``, ``show``, ``plot``, ``tail``) works on a database as on a folder. It opens the
file read-only and never creates or changes anything; a metric history comes back in logged
order (the metrics table's insertion order), NaN as NaN, ±inf as MLflow keeps it (±max float).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._errors import StepLogError
from ._records import MetricPoint, RunStatus
from .sinks.sqlite import _schema_revision, database_path
from .store import Experiment, History, LatestMetrics, RunData, RunWatcher, Store, StoreError, _latest_index

__all__ = ["SqliteRunWatcher", "SqliteStore"]

_RUN_COLUMNS = "run_uuid, experiment_id, name, status, start_time, end_time, lifecycle_stage, user_id, artifact_uri"


class _Latest(LatestMetrics):
    """A run's latest points, read from ``latest_metrics`` in one query."""

    __slots__ = ()

    def __init__(self, points: dict[str, MetricPoint], path: Path) -> None:
        super().__init__(dict.fromkeys(points, path))
        self._cache.update(points)


def _point(step: Any, value: Any, timestamp: Any, is_nan: Any) -> MetricPoint:
    return MetricPoint(int(step), float("nan") if is_nan else float(value), int(timestamp or 0))


class SqliteStore(Store):
    """A read-only view of MLflow's SQLite database, with :class:`~steplog.store.Store`'s methods.

    Args:
        uri: ``sqlite:///relative.db`` or ``sqlite:////abs/path.db``.

    Raises:
        StoreError: the file does not exist or is not MLflow's database.
    """

    def __init__(self, uri: str | os.PathLike[str] | None = None) -> None:
        if uri is None:
            uri = os.environ.get("STEPLOG_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI") or ""
        text = os.fspath(uri)
        try:
            self.root = database_path(text).absolute()
        except StepLogError as exc:
            raise StoreError(str(exc)) from None
        if not self.root.is_file():
            raise StoreError(f"no MLflow database at {self.root} (the file does not exist)")
        with self._connect() as con:
            try:
                revision = _schema_revision(con, self.root)
            except StepLogError as exc:
                raise StoreError(str(exc)) from None
            if revision is None:
                raise StoreError(f"{self.root} is an empty SQLite database, not MLflow's")

    def __repr__(self) -> str:
        return f"<steplog.Store sqlite:///{self.root}>"

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(f"{self.root.as_uri()}?mode=ro", uri=True, timeout=10.0)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.root}: {exc}") from exc
        try:
            yield con
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {self.root}: {exc}") from exc
        finally:
            con.close()

    # ------------------------------------------------------------------ experiments

    def experiments(self, *, include_deleted: bool = False) -> list[Experiment]:
        """Every experiment, sorted by id (deleted ones only if asked)."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT experiment_id, name, artifact_location, lifecycle_stage, creation_time FROM experiments"
            ).fetchall()
        out = [
            Experiment(
                experiment_id=str(eid),
                name=str(name),
                artifact_location=str(location or ""),
                lifecycle_stage=str(stage or "active"),
                creation_time=created,
                path=self.root,
            )
            for eid, name, location, stage, created in rows
            if include_deleted or stage != "deleted"
        ]
        return sorted(out, key=lambda e: (len(e.experiment_id), e.experiment_id))

    # ------------------------------------------------------------------ runs

    def runs(
        self,
        experiment: str | None = None,
        *,
        status: str | RunStatus | None = None,
        include_deleted: bool = False,
    ) -> list[RunData]:
        """Runs, newest first (see :meth:`steplog.store.Store.runs`)."""
        experiments = [self.experiment(experiment)] if experiment is not None else self.experiments()
        ids = [int(e.experiment_id) for e in experiments]
        if not ids:
            return []
        wanted = None if status is None else _status(status)
        with self._connect() as con:
            rows = con.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE experiment_id IN ({', '.join('?' * len(ids))})", ids
            ).fetchall()
            out = [self._run(con, row) for row in rows]
        out = [
            r
            for r in out
            if (wanted is None or r.status == wanted) and (include_deleted or r.lifecycle_stage != "deleted")
        ]
        out.sort(key=lambda r: (-(r.start_time or 0), r.run_id))
        return out

    def get_run(self, run_id: str) -> RunData:
        """A run by id or unique id prefix."""
        full = self.resolve_run_id(run_id)
        with self._connect() as con:
            row = con.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_uuid = ?", (full,)).fetchone()
            if row is None:  # removed since resolve_run_id looked
                raise StoreError(f"no run with id {run_id!r} in {self.root} (list them with `steplog runs`)")
            return self._run(con, row)

    def resolve_run_id(self, prefix: str) -> str:
        """The full id of the run whose id starts with ``prefix`` (it must be unique)."""
        if not prefix:
            raise StoreError(f"{prefix!r} is not a run id: give a run id or the first characters of one")
        with self._connect() as con:
            if con.execute("SELECT 1 FROM runs WHERE run_uuid = ?", (prefix,)).fetchone():
                return prefix
            matches = [
                str(r[0])
                for r in con.execute(
                    "SELECT run_uuid FROM runs WHERE substr(run_uuid, 1, ?) = ? ORDER BY run_uuid",
                    (len(prefix), prefix),
                )
            ]
        if not matches:
            raise StoreError(f"no run with id {prefix!r} in {self.root} (list them with `steplog runs`)")
        if len(matches) > 1:
            shown = ", ".join(m[:12] for m in matches[:5])
            more = ", ..." if len(matches) > 5 else ""
            raise StoreError(
                f"run id prefix {prefix!r} is ambiguous: {len(matches)} runs match ({shown}{more}); "
                "give more characters"
            )
        return matches[0]

    def _run(self, con: sqlite3.Connection, row: tuple[Any, ...]) -> RunData:
        run_id, experiment_id, name, status, start, end, stage, user, artifact_uri = row
        params = dict(con.execute('SELECT "key", value FROM params WHERE run_uuid = ?', (run_id,)).fetchall())
        tags = dict(con.execute('SELECT "key", value FROM tags WHERE run_uuid = ?', (run_id,)).fetchall())
        latest = {
            str(key): _point(step, value, stamp, is_nan)
            for key, value, stamp, step, is_nan in con.execute(
                'SELECT "key", value, timestamp, step, is_nan FROM latest_metrics WHERE run_uuid = ?', (run_id,)
            )
        }
        try:
            run_status = RunStatus[str(status)]
        except KeyError:
            run_status = RunStatus.RUNNING
        run_name = name or tags.get("mlflow.runName")
        return RunData(
            run_id=str(run_id),
            experiment_id=str(experiment_id),
            run_name=None if run_name is None else str(run_name),
            status=run_status,
            start_time=start,
            end_time=end,
            lifecycle_stage=str(stage or "active"),
            user_id=str(user or ""),
            artifact_uri=str(artifact_uri or ""),
            params=dict(sorted((str(k), str(v)) for k, v in params.items())),
            tags=dict(sorted((str(k), "" if v is None else str(v)) for k, v in tags.items())),
            latest=_Latest(latest, self.root),
            path=self.root,
            metric_keys=tuple(sorted(latest)),
        )

    # ------------------------------------------------------------------ metrics

    def metric_keys(self, run_id: str) -> list[str]:
        """The metric keys of a run, sorted."""
        full = self.resolve_run_id(run_id)
        with self._connect() as con:
            return sorted(
                str(r[0]) for r in con.execute('SELECT DISTINCT "key" FROM metrics WHERE run_uuid = ?', (full,))
            )

    def metric_history(self, run_id: str | RunData, key: str) -> History:
        """The full history of one metric, in logged order (see :meth:`steplog.store.Store.metric_history`)."""
        full = run_id.run_id if isinstance(run_id, RunData) else self.resolve_run_id(run_id)
        with self._connect() as con:
            rows = con.execute(
                'SELECT step, value, timestamp, is_nan FROM metrics WHERE run_uuid = ? AND "key" = ? ORDER BY rowid',
                (full, key),
            ).fetchall()
        if not rows:
            keys = self.metric_keys(full)
            shown = ", ".join(keys[:20]) + (", ..." if len(keys) > 20 else "") if keys else "none"
            raise StoreError(f"run {full[:12]} has no metric {key!r} (its metrics: {shown})")
        steps = [int(r[0]) for r in rows]
        values = [float("nan") if r[3] else float(r[1]) for r in rows]
        stamps = [int(r[2]) for r in rows]
        return History(key, steps, values, stamps)

    def watch(self, run_id: str) -> RunWatcher:
        """A watcher following a run (id or unique prefix) as it writes."""
        return SqliteRunWatcher(self, self.resolve_run_id(run_id))


class SqliteRunWatcher(RunWatcher):
    """Follows a live run in a database: each :meth:`poll` reads only the rows added since the last."""

    def __init__(self, store: SqliteStore, run_id: str) -> None:
        self._sql = store
        self.run_id = run_id
        self.latest: dict[str, MetricPoint] = {}
        self.counts: dict[str, int] = {}
        self._last_row = 0

    def run(self) -> RunData:
        """The run's metadata as it is now (status, end time, params, tags)."""
        return self._sql.get_run(self.run_id)

    def poll(self) -> dict[str, MetricPoint]:
        """Read the rows added since the last poll; return the keys whose latest point changed."""
        with self._sql._connect() as con:
            rows = con.execute(
                'SELECT rowid, "key", step, value, timestamp, is_nan FROM metrics '
                "WHERE run_uuid = ? AND rowid > ? ORDER BY rowid",
                (self.run_id, self._last_row),
            ).fetchall()
        if not rows:
            return {}
        self._last_row = int(rows[-1][0])
        grouped: dict[str, tuple[list[int], list[float], list[int], list[bool]]] = {}
        for _rowid, key, step, value, stamp, is_nan in rows:
            steps, values, stamps, nans = grouped.setdefault(str(key), ([], [], [], []))
            steps.append(int(step))
            values.append(0.0 if is_nan else float(value))  # MLflow compares a NaN as its stored 0
            stamps.append(int(stamp))
            nans.append(bool(is_nan))
        changed: dict[str, MetricPoint] = {}
        for key, (steps, values, stamps, nans) in grouped.items():
            self.counts[key] = self.counts.get(key, 0) + len(steps)
            before = self.latest.get(key)
            if before is not None:  # continue MLflow's scan from the point it ended on
                is_nan = before.value != before.value
                steps.insert(0, before.step)
                values.insert(0, 0.0 if is_nan else before.value)
                stamps.insert(0, before.timestamp)
                nans.insert(0, is_nan)
            i = _latest_index(steps, stamps, values)
            if before is not None and i == 0:
                continue
            point = MetricPoint(steps[i], float("nan") if nans[i] else values[i], stamps[i])
            self.latest[key] = point
            changed[key] = point
        return changed


def _status(status: str | RunStatus) -> RunStatus:
    if isinstance(status, RunStatus):
        return status
    try:
        return RunStatus[str(status).upper()]
    except KeyError:
        raise StoreError(f"unknown run status {status!r}: use RUNNING, SCHEDULED, FINISHED, FAILED or KILLED") from None
