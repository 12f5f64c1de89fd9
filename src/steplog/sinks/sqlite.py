"""MLflow's own SQLite database (``sqlite:///mlflow.db``), written with the standard library's ``sqlite3``.

The tables, columns, indexes and alembic revision are MLflow 3.17's (``steplog._sqlite_schema``,
generated from a real MLflow), so ``mlflow ui``, ``mlflow server`` and ``MlflowClient`` read what
this sink writes with no flag, and ``mlflow db upgrade`` takes the database further.

Values are stored exactly as MLflow's SQL store stores them: NaN as ``value 0, is_nan 1``, ±inf
as ±1.7976931348623157e308 (SQL has no infinity), and -0.0 reads back as 0.0 (SQLite keeps a
whole-number REAL as an integer). Identical points are written once (the metrics table's primary
key), and ``latest_metrics`` keeps MLflow's "latest": the max by (step, timestamp, value).

Each ``write`` is one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) in WAL mode, so a reader
(``mlflow ui``) never blocks it and a crash leaves either the whole batch or none of it. A
database another process holds locked is waited for up to ``busy_timeout``, then the write fails
with a :class:`~steplog.WriteError` the writer retries later: nothing is lost.
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Literal

import orjson

from .._artifacts import place_file, place_tree
from .._errors import InvalidKeyError, InvalidValueError, StepLogError, WriteError
from .._layout import DEFAULT_EXPERIMENT_ID, DEFAULT_EXPERIMENT_NAME, new_run_id, temp_name, uri_to_path
from .._records import ArtifactRecord, RunInfo, RunStatus
from .._runmeta import source_name
from .._sqlite_schema import DDL, KNOWN_REVISIONS, MLFLOW_VERSION, REVISION, SEEDS
from .._threads import in_daemon_thread
from ..typing import Batch, RunRequest

__all__ = ["SqliteSink", "database_path", "default_artifact_root", "is_sqlite_uri"]

MAX_FLOAT = 1.7976931348623157e308
"""What MLflow's SQL store writes for +inf (and its negative for -inf): SQL has no infinity."""
_WORKSPACE = "default"
"""The workspace MLflow files experiments under when workspaces are off (its default)."""

_INSERT_METRIC = (
    'INSERT INTO metrics ("key", value, timestamp, run_uuid, step, is_nan) VALUES (?, ?, ?, ?, ?, ?) '
    "ON CONFLICT DO NOTHING"  # an identical point (the whole primary key) is kept once, as MLflow does
)
_UPSERT_LATEST = (
    'INSERT INTO latest_metrics ("key", value, timestamp, step, is_nan, run_uuid) VALUES (?, ?, ?, ?, ?, ?) '
    'ON CONFLICT ("key", run_uuid) DO UPDATE SET value = excluded.value, timestamp = excluded.timestamp, '
    "step = excluded.step, is_nan = excluded.is_nan"
)
_BULK_METRICS = (
    'INSERT INTO metrics ("key", value, timestamp, run_uuid, step, is_nan) '
    "SELECT ?1, json_extract(j.value, '$[1]') * "
    "(SELECT s FROM temp.steplog_pow2 WHERE k = json_extract(j.value, '$[2]')), "
    "json_extract(j.value, '$[0]'), ?2, json_extract(j.value, '$[3]'), json_extract(j.value, '$[4]') "
    "FROM json_each(?3) AS j WHERE true ORDER BY j.key "  # in logged order (rowid order is what readers see)
    "ON CONFLICT DO NOTHING"
)
_BULK_CHUNK = 8192
_POW2 = "CREATE TEMP TABLE IF NOT EXISTS steplog_pow2 (k INTEGER PRIMARY KEY, s REAL NOT NULL)"
"""The powers of two a double's ``M * 2**k`` form needs, bound as exact doubles (a temp table: not in the file)."""
_INSERT_PARAM = 'INSERT INTO params ("key", value, run_uuid) VALUES (?, ?, ?) ON CONFLICT DO NOTHING'
_UPSERT_TAG = (
    'INSERT INTO tags ("key", value, run_uuid) VALUES (?, ?, ?) '
    'ON CONFLICT ("key", run_uuid) DO UPDATE SET value = excluded.value'
)


# ---------------------------------------------------------------------------- URIs and the schema


def is_sqlite_uri(uri: str) -> bool:
    """True for a ``sqlite:`` tracking URI."""
    return uri[:7].lower() == "sqlite:"


def database_path(uri: str) -> Path:
    """The file of a ``sqlite:///relative.db`` or ``sqlite:////abs/path.db`` URI (SQLAlchemy's forms).

    Raises:
        InvalidValueError: an in-memory database, a URI without a path, or query options.
    """
    if not is_sqlite_uri(uri) or not uri[7:].startswith("///"):
        raise InvalidValueError(
            f"tracking_uri {uri!r} is not a SQLite database URI: use sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db (MLflow's forms)"
        )
    path = uri[10:]
    if not path or path == ":memory:" or path.startswith("file:"):
        raise InvalidValueError(
            f"tracking_uri {uri!r} names no database file: steplog writes a file MLflow can open "
            "later (sqlite:///mlflow.db), not an in-memory database"
        )
    if "?" in path:
        raise InvalidValueError(
            f"tracking_uri {uri!r} has query options, which steplog does not take: drop the '?...' part"
        )
    return Path(path)


def default_artifact_root() -> str:
    """Where MLflow's client puts a SQLite store's artifacts: ``./mlruns`` made absolute (plain path)."""
    return os.path.abspath("mlruns")


def _connect(path: Path, *, busy_timeout: float) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), usable from any one thread at a time."""
    con = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    return con


def _schema_revision(con: sqlite3.Connection, path: Path) -> str | None:
    """The database's alembic revision, or None for an empty database.

    Raises:
        StepLogError: tables exist but not MLflow's (no ``alembic_version``).
    """
    names = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not names:
        return None
    if "alembic_version" not in names or "runs" not in names:
        raise StepLogError(
            f"{path} is a SQLite database but not MLflow's (no alembic_version or runs table): "
            "point tracking_uri at a new file or at a database MLflow created"
        )
    row = con.execute("SELECT version_num FROM alembic_version").fetchone()
    return None if row is None else str(row[0])


def _check_revision(revision: str | None, path: Path) -> None:
    """Refuse a database whose schema revision steplog does not know, saying what to do."""
    if revision in KNOWN_REVISIONS:
        return
    raise StepLogError(
        f"{path} has MLflow schema revision {revision!r}, which steplog does not know (it reads and writes "
        f"revision {REVISION!r}, MLflow {MLFLOW_VERSION}'s). If an older MLflow created the database, "
        f"upgrade it with MLflow {MLFLOW_VERSION}: `mlflow db upgrade sqlite:///{path}`; if a newer MLflow "
        "did, use a steplog release that knows that revision, or log to another database file"
    )


def _create_schema(con: sqlite3.Connection, artifact_root: str) -> None:
    """Create MLflow's tables, seeds, revision and Default experiment (inside the caller's transaction)."""
    for statement in DDL:
        con.execute(statement)
    for table, columns, row in SEEDS:
        names = ", ".join(f'"{c}"' for c in columns)
        con.execute(f'INSERT INTO "{table}" ({names}) VALUES ({", ".join("?" * len(row))})', row)
    con.execute("INSERT INTO alembic_version (version_num) VALUES (?)", (REVISION,))
    now = int(time.time() * 1000)
    con.execute(
        "INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage, creation_time, "
        "last_update_time, workspace) VALUES (?, ?, ?, 'active', ?, ?, ?)",
        (int(DEFAULT_EXPERIMENT_ID), DEFAULT_EXPERIMENT_NAME, f"{artifact_root}/0", now, now, _WORKSPACE),
    )


def _bulk_ready(con: sqlite3.Connection) -> bool:
    """Prepare the one-statement insert (the powers-of-two table); False where SQLite has no JSON functions."""
    try:
        con.execute("SELECT json_extract('[1]', '$[0]')")
    except sqlite3.OperationalError:
        return False  # an old SQLite without JSON: executemany, slower under a busy interpreter lock
    con.execute(_POW2)
    if con.execute("SELECT count(*) FROM temp.steplog_pow2").fetchone()[0] != 971 + 1074 + 1:
        con.executemany("INSERT OR REPLACE INTO temp.steplog_pow2 VALUES (?, ?)", _POWERS)
    return True


_POWERS = [(k, math.ldexp(1.0, k)) for k in range(-1074, 972)]
"""2**k for every k of a finite double's ``M * 2**k`` form with ``M < 2**53`` (subnormals: k = -1074)."""


def _sql_value(value: float) -> tuple[float, int]:
    """A metric value as MLflow's SQL store keeps it: ``(value, is_nan)``."""
    if value != value:
        return 0.0, 1
    if math.isinf(value):
        return (MAX_FLOAT if value > 0 else -MAX_FLOAT), 0
    return value, 0


def _latest_of(steps: list[int], stamps: list[int], values: list[float]) -> int:
    """Index of the point MLflow keeps as latest: the first maximal (step, timestamp, value)."""
    top = max(steps)
    group = [i for i, s in enumerate(steps) if s == top] if steps.count(top) > 1 else [steps.index(top)]
    if len(group) > 1:
        top_stamp = max(stamps[i] for i in group)
        group = [i for i in group if stamps[i] == top_stamp]
    return group[0] if len(group) == 1 else max(group, key=values.__getitem__)


# ---------------------------------------------------------------------------- the batch (one place)


def _unwritten(batch: Batch) -> tuple[list[tuple[str, list[Any]]], list[tuple[str, str]], list[tuple[str, str]]]:
    """The batch's metrics (key, flat ``[ts, value, step, ...]``), params and tags not yet marked done."""
    done = batch.done
    return (
        [(k, items) for k, items in batch.metrics if ("metric", k) not in done],
        [(k, v) for k, v in batch.params if ("param", k) not in done],
        [(k, v) for k, v in batch.tags if ("tag", k) not in done],
    )


def _mark_written(batch: Batch) -> None:
    """Mark every metric, param and tag of the batch done (after their transaction committed)."""
    batch.done.update(("metric", k) for k, _items in batch.metrics)
    batch.done.update(("param", k) for k, _v in batch.params)
    batch.done.update(("tag", k) for k, _v in batch.tags)


# ---------------------------------------------------------------------------- the sink


class SqliteSink:
    """Writes one run into MLflow's SQLite database (created at MLflow 3.17's schema if missing).

    Args:
        uri: ``sqlite:///relative.db`` or ``sqlite:////abs/path.db``.
        durability: ``"os"``: a committed write survives the process being killed (WAL,
            ``synchronous=NORMAL``); ``"fsync"``: it also survives power loss (``synchronous=FULL``).
        busy_timeout: seconds a write waits for another process's lock before it fails (and is
            retried by the writer).
    """

    def __init__(
        self,
        uri: str,
        *,
        durability: Literal["os", "fsync"] = "os",
        busy_timeout: float = 5.0,
    ) -> None:
        self.uri = uri
        self.path = database_path(uri).absolute()
        self._synchronous = "FULL" if durability == "fsync" else "NORMAL"
        self._busy_timeout = busy_timeout
        self._con: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._latest: dict[str, tuple[int, int, float, int]] = {}
        self._bulk = False
        self.run_id = ""
        self.artifact_uri = ""
        self.bytes_written = 0
        """Approximate: the database file's and its WAL's growth while this sink wrote."""

    # ------------------------------------------------------------------ open

    async def open(self, request: RunRequest) -> RunInfo:
        return await in_daemon_thread(lambda: self.open_sync(request))

    def open_sync(self, request: RunRequest) -> RunInfo:
        """Open (or create) the database, find or create the experiment, create (or join) the run."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = _connect(self.path, busy_timeout=self._busy_timeout)
        except (OSError, sqlite3.Error) as exc:
            raise self._error("open", exc) from exc
        try:
            info = self._open(con, request)
        except BaseException:
            con.close()
            raise
        self._con = con
        return info

    def _open(self, con: sqlite3.Connection, request: RunRequest) -> RunInfo:
        try:
            try:
                con.execute("PRAGMA journal_mode = WAL")  # persistent; readers never block the writer
            except sqlite3.OperationalError:
                pass  # another process holds the file right now: its rollback journal is just as safe
            con.execute(f"PRAGMA synchronous = {self._synchronous}")
            self._bulk = _bulk_ready(con)
            con.execute("BEGIN IMMEDIATE")  # one process creates the schema or the experiment
            try:
                revision = _schema_revision(con, self.path)
                if revision is None:
                    _create_schema(con, default_artifact_root())
                else:
                    _check_revision(revision, self.path)
                experiment_id, location = self._experiment(con, request)
                run_id = request.run_id or new_run_id()
                artifact_uri = f"{location.rstrip('/')}/{run_id}/artifacts"
                self._create_run(con, request, run_id, experiment_id, artifact_uri)
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._error("create the run in", exc) from exc
        self.run_id = run_id
        self.artifact_uri = artifact_uri
        return RunInfo(
            run_id=run_id,
            experiment_id=experiment_id,
            experiment_name=request.experiment_name,
            run_name=request.run_name,
            artifact_uri=artifact_uri,
            tracking_uri=f"sqlite:///{self.path}",
            start_time=request.start_time,
            user_id=request.user_id,
        )

    def _experiment(self, con: sqlite3.Connection, request: RunRequest) -> tuple[str, str]:
        name = request.experiment_name
        if request.experiment_id is not None:
            row = con.execute(
                "SELECT experiment_id, lifecycle_stage, artifact_location FROM experiments WHERE experiment_id = ?",
                (request.experiment_id,),
            ).fetchone()
        else:
            row = con.execute(
                "SELECT experiment_id, lifecycle_stage, artifact_location FROM experiments "
                "WHERE name = ? AND workspace = ?",
                (name, _WORKSPACE),
            ).fetchone()
        if row is not None:
            experiment_id, stage, location = row
            if stage == "deleted":
                raise InvalidKeyError(
                    f"experiment {name!r} is deleted (id {experiment_id}): restore it "
                    "(mlflow experiments restore) or log to another experiment name"
                )
            return str(experiment_id), str(location or f"{default_artifact_root()}/{experiment_id}")
        now = int(time.time() * 1000)
        cur = con.execute(
            "INSERT INTO experiments (name, lifecycle_stage, creation_time, last_update_time, workspace) "
            "VALUES (?, 'active', ?, ?, ?)",
            (name, now, now, _WORKSPACE),
        )
        experiment_id = str(cur.lastrowid)
        # MLflow's create_experiment: the id first (SQLite's autoincrement), then the location from it
        location = f"{default_artifact_root()}/{experiment_id}"
        con.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (location, int(experiment_id))
        )
        return experiment_id, location

    def _create_run(
        self, con: sqlite3.Connection, request: RunRequest, run_id: str, experiment_id: str, artifact_uri: str
    ) -> None:
        exists = con.execute("SELECT 1 FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
        if exists:  # joined or resumed: running again
            con.execute("UPDATE runs SET status = 'RUNNING', end_time = NULL WHERE run_uuid = ?", (run_id,))
        else:
            # the columns as MLflow's SqlAlchemyStore.create_run fills them
            con.execute(
                "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status, "
                "start_time, end_time, source_version, lifecycle_stage, artifact_uri, experiment_id, deleted_time) "
                "VALUES (?, ?, 'UNKNOWN', '', '', ?, 'RUNNING', ?, NULL, '', 'active', ?, ?, NULL)",
                (run_id, request.run_name, request.user_id, request.start_time, artifact_uri, int(experiment_id)),
            )
        tags = {
            "mlflow.user": request.user_id,
            "mlflow.source.name": source_name(),
            "mlflow.source.type": "LOCAL",
            **request.tags,
            "mlflow.runName": request.run_name,
        }
        con.executemany(_UPSERT_TAG, [(k, v, run_id) for k, v in tags.items()])

    # ------------------------------------------------------------------ write

    async def write(self, batch: Batch) -> None:
        await in_daemon_thread(lambda: self.write_sync(batch))

    def write_sync(self, batch: Batch) -> None:
        """Write the batch's metrics, params and tags in one transaction, then its artifacts."""
        with self._lock:
            metrics, params, tags = _unwritten(batch)
            if metrics or params or tags:
                self._transaction(metrics, params, tags)
                _mark_written(batch)
            for record in batch.artifacts:
                if ("artifact", record.artifact_path) not in batch.done:
                    self._write_artifact(record)
                    batch.done.add(("artifact", record.artifact_path))

    def _transaction(
        self, metrics: list[tuple[str, list[Any]]], params: list[tuple[str, str]], tags: list[tuple[str, str]]
    ) -> None:
        con = self._connection()
        run_id = self.run_id
        size = self._size()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                latest = self._insert_metrics(con, metrics)
                if params:
                    con.executemany(_INSERT_PARAM, [(k, v, run_id) for k, v in params])
                if tags:
                    con.executemany(_UPSERT_TAG, [(k, v, run_id) for k, v in tags])
                    for key, value in tags:
                        if key == "mlflow.runName":  # MLflow keeps the name in runs.name too
                            con.execute("UPDATE runs SET name = ? WHERE run_uuid = ?", (value, run_id))
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._error("write to", exc) from exc
        self._latest.update(latest)  # only once committed: a failed write leaves the cache as the database
        self.bytes_written += max(0, self._size() - size)

    def _insert_metrics(
        self, con: sqlite3.Connection, metrics: list[tuple[str, list[Any]]]
    ) -> dict[str, tuple[int, int, float, int]]:
        """Insert every point and stage the new latest per key; return the staged latest rows."""
        run_id = self.run_id
        staged: dict[str, tuple[int, int, float, int]] = {}
        repeat = itertools.repeat
        for key, items in metrics:
            stamps = items[0::3]
            values = items[1::3]
            steps = items[2::3]
            if math.isfinite(sum(values)):  # no NaN, no inf (the usual case): values go in as they are
                flags: Any = repeat(0)
            else:
                pairs = [_sql_value(v) for v in values]
                values = [p[0] for p in pairs]
                flags = [p[1] for p in pairs]
            if self._bulk:
                self._insert_bulk(con, key, stamps, values, steps, flags)
            else:
                con.executemany(_INSERT_METRIC, zip(repeat(key), values, stamps, repeat(run_id), steps, flags))  # noqa: B905 - repeat() is endless
            i = _latest_of(steps, stamps, values)
            new = (steps[i], stamps[i], values[i], 0 if isinstance(flags, itertools.repeat) else flags[i])
            old = self._latest.get(key)
            if old is None:
                row = con.execute(
                    'SELECT step, timestamp, value, is_nan FROM latest_metrics WHERE run_uuid = ? AND "key" = ?',
                    (run_id, key),
                ).fetchone()
                old = None if row is None else (int(row[0]), int(row[1] or 0), float(row[2]), int(row[3]))
            if old is None or new[:3] > old[:3]:  # strictly newer, as MLflow compares
                con.execute(_UPSERT_LATEST, (key, new[2], new[1], new[0], new[3], run_id))
                staged[key] = new
            else:
                staged[key] = old
        return staged

    def _insert_bulk(
        self, con: sqlite3.Connection, key: str, stamps: list[int], values: list[float], steps: list[int], flags: Any
    ) -> None:
        """Insert a key's points with one statement (one ``sqlite3_step``, run without the GIL).

        ``executemany`` releases and retakes the interpreter lock for every row: with a training
        loop holding it, each row then waits for the loop to let go, and the writer crawled at a
        few thousand rows a second. Here the rows travel as one JSON text and SQLite inserts them
        all in C. A value goes as the exact integers ``(M, k)`` with ``value == M * 2**k`` (JSON
        integers parse exactly; a decimal float might not round the same everywhere), and SQLite
        multiplies ``M`` by ``2**k`` from a table of exact powers of two: an exact product.
        """
        frexp, ldexp = math.frexp, math.ldexp
        rows = [
            (ts, int(ldexp(v, -k)), k, step, flag)
            for ts, v, step, flag in zip(stamps, values, steps, flags)  # noqa: B905 - flags may be repeat()
            for k in (max(frexp(v)[1] - 53, -1074),)
        ]
        # a chunk per statement: orjson holds the interpreter lock throughout (~1 ms per chunk)
        for start in range(0, len(rows), _BULK_CHUNK):
            text = orjson.dumps(rows[start : start + _BULK_CHUNK]).decode()
            con.execute(_BULK_METRICS, (key, self.run_id, text))

    def _write_artifact(self, record: ArtifactRecord) -> None:
        location = self.artifact_uri
        if location.startswith(("file:", "/")):
            root = uri_to_path(location).resolve()
        else:
            raise WriteError(
                f"cannot write artifact {record.artifact_path!r}: the run's artifact location {location!r} is "
                "not a local path (steplog copies artifacts into local folders only); log it with MLflow's client"
            )
        dest = (root / record.artifact_path).resolve()
        if dest != root and root not in dest.parents:  # validated at the call; checked again here
            raise WriteError(f"artifact path {record.artifact_path!r} escapes the run's artifact directory")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            # through a temp name beside the final one: a kill mid-copy never leaves a truncated artifact
            if record.data is not None:
                tmp = dest.parent / temp_name()
                tmp.write_bytes(record.data)
                os.replace(tmp, dest)
                self.bytes_written += len(record.data)
            elif record.source is not None:
                source = Path(record.source)
                place = place_tree if source.is_dir() else place_file
                self.bytes_written += place(source, dest, dest.parent, link=False, fsync=self._synchronous == "FULL")
        except OSError as exc:
            err = WriteError(f"cannot write artifact {dest}: {exc.strerror or exc}")
            err.errno, err.filename = exc.errno, str(dest)
            raise err from exc

    # ------------------------------------------------------------------ close

    async def close(self, status: RunStatus, end_time: int) -> None:
        await in_daemon_thread(lambda: self.close_sync(status, end_time))

    def close_sync(self, status: RunStatus, end_time: int) -> None:
        """Record the final status and end time, then close the connection."""
        with self._lock:
            con = self._con
            if con is None:
                return
            try:
                con.execute("BEGIN IMMEDIATE")
                try:
                    con.execute(
                        "UPDATE runs SET status = ?, end_time = ? WHERE run_uuid = ?",
                        (status.name, end_time, self.run_id),
                    )
                    con.execute("COMMIT")
                except BaseException:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._error("record the run's end in", exc) from exc
            self._con = None
            con.close()

    # ------------------------------------------------------------------ helpers

    def _connection(self) -> sqlite3.Connection:
        if self._con is None:
            raise WriteError(f"the database {self.path} is not open (the run was not started or is closed)")
        return self._con

    def _size(self) -> int:
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                total += path.stat().st_size
            except OSError:
                pass
        return total

    def _error(self, what: str, exc: BaseException) -> WriteError:
        """A :class:`WriteError` naming the database and the cause (errno ENOSPC for a full disk)."""
        code = getattr(exc, "sqlite_errorcode", None)
        number: int | None = getattr(exc, "errno", None)
        hint = ""
        if code == sqlite3.SQLITE_FULL:
            number, hint = errno.ENOSPC, " (the disk is full: free space; the data is kept and retried)"
        elif code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            number = errno.EBUSY
            hint = f" (another process held the database for over {self._busy_timeout} s; retried later)"
        err = WriteError(f"cannot {what} {self.path}: {exc}{hint}")
        err.errno, err.filename = number, str(self.path)
        return err
