"""``steplog sync SOURCE --to URL``: upload a local store (mlruns or MLflow's SQLite database), or an outage journal.

Incremental and idempotent, so it is cheap and safe to run again (after an interruption,
after the runs grew, or by mistake):

* a run is matched to the server's copy by its id (a run written to a server and a
  local store at once, or a journal) or by the ``steplog.run_key`` tag an earlier
  sync set to the local run id, and created only when neither exists;
* only what the server lacks is sent: params and tags the server's run does not hold,
  metric points appended since the last sync, artifact files the server lacks or that
  changed since they were sent, and the end status if it differs;
* what was sent is remembered per run in a sync-state file in the run's folder
  (``.steplog-sync.json``, written atomically; MLflow ignores it), or for a
  ``sqlite:`` source in a file beside the database (``<db>.steplog-sync.json``:
  MLflow's schema stays as MLflow made it). A key is marked
  in flight before its points are sent and committed after the server acknowledged
  them, so after a crash, or when the state is missing, stale (a metric file that
  was rewritten, a database whose history of a key no longer starts as it did, a run
  the server no longer has) or unwritable, sync compares with the
  server's history of that key instead and sends only the points it lacks: never twice;
* a journal remembers how far the server acknowledged it, and resumes from there.

On a terminal it shows progress (points and bytes, rate, time left); into a pipe, one
line per run. This is also the way from a store written without network (an HPC node)
into a server.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import os
import sys
import time
import zlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import StepLogError
from .._journal import Journal, journal_folders
from .._layout import TMP_PREFIX, iter_files, parse_metric_lines, uri_to_path, write_atomic

if TYPE_CHECKING:
    import httpx

    from ..sinks.mlflow_rest import RestClient
    from ..store import History, Store

__all__ = ["SyncResult", "register", "sync"]


@dataclasses.dataclass(frozen=True, slots=True)
class SyncResult:
    """What one run's upload did."""

    source: str
    """The local run id (or the journal folder)."""
    run_id: str
    """The run's id on the server."""
    experiment_id: str
    points: int
    params: int
    tags: int
    artifacts: int
    created: bool
    """True when the run was created on the server by this sync."""
    bytes: int = 0
    """Bytes sent: request bodies of metrics, params and tags, and artifact files."""
    state_saved: bool = True
    """False when the run's sync state could not be written (a read-only source): the next sync checks the server."""


async def sync(
    source: str | Path,
    url: str,
    *,
    experiment: str | None = None,
    run_ids: Sequence[str] | None = None,
    timeout: float = 60.0,
    transport: httpx.AsyncBaseTransport | None = None,
    progress: Progress | None = None,
) -> list[SyncResult]:
    """Upload ``source`` to the server at ``url``.

    ``source`` is an mlruns store (a directory or ``file:`` URI), MLflow's SQLite database
    (``sqlite:///path.db``, read through :class:`steplog.Store`), a run's journal, or a folder
    of journals.

    Args:
        experiment: only runs of this experiment (name or id; store sources).
        run_ids: only these runs (ids or unique prefixes, or ``latest``; store sources).
        timeout: seconds each request may keep failing transiently before giving up.
        progress: told what each run sends as it goes (the command's display); None: silent.
    """
    if not url.lower().startswith(("http://", "https://")):
        raise StepLogError(f"--to {url!r} is not a tracking server URL: give http(s)://host:port")
    try:
        from ..sinks.mlflow_rest import RestClient
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise StepLogError(f"steplog sync needs the REST extra: pip install 'steplog[rest]' ({exc})") from exc
    text = os.fspath(source)
    if text[:7].lower() == "sqlite:":  # MLflow's database: no journals, read through the Store API
        store = await anyio.to_thread.run_sync(_open_database, text)
        client = RestClient(url, transport=transport)
        try:
            return await _sync_store(client, store, text, experiment, run_ids, timeout, progress or Progress())
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()
    if text.lower().startswith(("http://", "https://")):
        raise StepLogError(f"{text} is a tracking server: sync uploads a local store or journal to one (--to)")
    path = uri_to_path(text) if text[:5].lower() == "file:" else Path(text)
    if not await anyio.Path(path).exists():
        raise StepLogError(f"{path} does not exist: give an mlruns directory, sqlite:///path.db, or a journal folder")
    client = RestClient(url, transport=transport)
    try:
        journals = await anyio.to_thread.run_sync(journal_folders, path)
        if journals:
            results = []
            for folder in journals:
                result = await _sync_journal(client, folder, timeout)
                (progress or Progress()).run_done(result)
                results.append(result)
            return results
        from ..store import Store, StoreError

        try:
            store = Store(path)
        except StoreError as exc:
            raise StepLogError(f"{path} is neither a journal nor a readable mlruns store: {exc}") from exc
        return await _sync_store(client, store, str(path), experiment, run_ids, timeout, progress or Progress())
    except OSError as exc:  # an unreadable file of the source: one line, not a traceback
        if isinstance(exc, StepLogError):
            raise
        raise StepLogError(f"cannot read {exc.filename or path}: {exc.strerror or exc}") from exc
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()


def _open_database(uri: str) -> Store:
    from ..store import Store, StoreError

    try:
        return Store(uri)
    except StoreError as exc:
        raise StepLogError(f"cannot sync {uri}: {exc}") from exc


def _deadline(timeout: float) -> float:
    return anyio.current_time() + timeout


async def _sync_journal(client: RestClient, folder: Path, timeout: float) -> SyncResult:
    """Replay a journal from where the server last acknowledged it; the run must exist on the server."""
    journal = Journal.open(folder)
    try:
        header = journal.header
        run_id = str(header["run_id"])
        info = await client.retrying(
            lambda: client.get_run(run_id), deadline=_deadline(timeout), what=f"looking up run {run_id}"
        )
        if info is None:
            raise StepLogError(
                f"run {run_id} of journal {folder} does not exist on {client.display_uri} (the journal was "
                f"written for {header.get('tracking_uri')}): sync it to that server"
            )
        artifact_uri = str(info.get("artifact_uri") or header.get("artifact_uri") or "")
        points = artifacts = 0
        for offset, op in journal.pending():
            kind = op.get("op")
            if kind == "batch":
                body = _orjson_dumps(op["body"])
                await client.retrying(
                    partial(client.log_batch, body),
                    deadline=_deadline(timeout),
                    what=f"uploading {folder}",
                )
                points += int(op.get("points", 0))
            elif kind == "artifact":
                artifacts += await _upload_tree(
                    client, artifact_uri, journal.artifact_file(op["path"]), op["path"], timeout
                )
            elif kind == "end":
                await client.retrying(
                    partial(client.update_run, run_id, str(op["status"]), int(op["end_time"])),
                    deadline=_deadline(timeout),
                    what=f"ending run {run_id}",
                )
            journal.ack(offset)
        return SyncResult(str(folder), run_id, str(info["experiment_id"]), points, 0, 0, artifacts, created=False)
    finally:
        journal.close()


async def _sync_store(
    client: RestClient,
    store: Store,
    label: str,
    experiment: str | None,
    run_ids: Sequence[str] | None,
    timeout: float,
    progress: Progress,
) -> list[SyncResult]:
    """Upload the runs of a store read through the Store API (an mlruns folder or MLflow's database)."""
    from ..store import Store, StoreError

    try:
        experiments = [store.experiment(experiment)] if experiment is not None else store.experiments()
        wanted = None if not run_ids else {_resolve(store, r) for r in run_ids}
    except StoreError as exc:
        raise StepLogError(f"cannot sync {label}: {exc}") from exc
    # a folder store keeps each run's state in the run's folder; a database keeps all of them beside the file
    sidecar = None if type(store) is Store else _Sidecar(store.root)
    results: list[SyncResult] = []
    for exp in experiments:
        runs = [r for r in store.runs(exp.experiment_id) if wanted is None or r.run_id in wanted]
        if not runs:
            continue
        exp_id = await client.experiment_id(exp.name, deadline=_deadline(timeout))
        for run in runs:
            result = await _sync_run(client, run, exp_id, timeout, progress, store if sidecar else None, sidecar)
            progress.run_done(result)
            results.append(result)
    if wanted is not None and len(results) < len(wanted):
        missing = wanted - {r.source for r in results}
        raise StepLogError(f"runs not found in the selected experiments: {', '.join(sorted(missing))}")
    return results


def _resolve(store: Any, ref: str) -> str:
    """A run id from an id, a unique prefix, or ``latest`` (the newest run)."""
    if ref == "latest":
        runs = store.runs()
        if not runs:
            raise StepLogError(f"no runs in {store.root}: `latest` names the newest run")
        return str(runs[0].run_id)
    return str(store.resolve_run_id(ref))


# ---------------------------------------------------------------------------- progress


class Progress:
    """Told what a sync sends; this base class shows nothing (the library's default)."""

    def run_started(self, label: str, points: int, nbytes: int) -> None:
        """A run starts sending ``points`` metric points and ``nbytes`` bytes of artifacts."""

    def advance(self, points: int, nbytes: int) -> None:
        """Some were sent (``nbytes``: request and artifact bytes)."""

    def run_done(self, result: SyncResult) -> None:
        """A run is up to date on the server."""

    def close(self) -> None:
        """The sync ended (or failed)."""


class LineProgress(Progress):
    """One line per run (into a pipe or a file), as ``pip`` prints into a log."""

    def __init__(self, target: str, out: Any = None) -> None:
        self.target = target
        self.out = out or sys.stdout
        self._started = time.monotonic()

    def run_started(self, label: str, points: int, nbytes: int) -> None:
        self._started = time.monotonic()

    def run_done(self, result: SyncResult) -> None:
        seconds = time.monotonic() - self._started
        if not (result.points or result.params or result.tags or result.artifacts or result.created):
            what = "up to date"
        else:
            what = (
                f"{'created' if result.created else 'updated'}: {result.points} points, {result.params} params, "
                f"{result.tags} tags, {result.artifacts} artifact files, {_fmt_bytes(result.bytes)}"
            )
        note = "" if result.state_saved else " (sync state not saved: the source is read-only?)"
        self.out.write(
            f"{result.source} -> {self.target} run {result.run_id} (experiment {result.experiment_id}): "
            f"{what} in {seconds:.1f}s{note}\n"
        )
        self.out.flush()


class TerminalProgress(LineProgress):
    """A live line per run: points and bytes sent, rate, time left; a rich bar when rich is installed."""

    def __init__(self, target: str, out: Any = None) -> None:
        super().__init__(target, out)
        self._points = self._bytes = self._done_points = self._done_bytes = 0
        self._label = ""
        self._last = 0.0
        self._drawn = False
        self._bar: Any = None
        self._task: Any = None
        try:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[points]}"),
                DownloadColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=Console(file=self.out),
                transient=True,
            )
        except ImportError:  # rich is an optional extra: a plain line redrawn in place
            self._bar = None

    def run_started(self, label: str, points: int, nbytes: int) -> None:
        super().run_started(label, points, nbytes)
        self._label, self._points, self._bytes = label, points, nbytes
        self._done_points = self._done_bytes = 0
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task(label[:12], total=max(self._work(points, nbytes), 1), points="", rate="")
        self._draw(force=True)

    def advance(self, points: int, nbytes: int) -> None:
        self._done_points += points
        self._done_bytes += nbytes
        self._draw()

    def run_done(self, result: SyncResult) -> None:
        self._clear()
        super().run_done(result)

    def close(self) -> None:
        self._clear()

    @staticmethod
    def _work(points: int, nbytes: int) -> float:
        # a point costs about as much to send as 100 bytes of an artifact (its JSON is ~80 bytes)
        return points + nbytes / 100

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        elapsed = max(now - self._started, 1e-6)
        rate = f"{self._done_points / elapsed:,.0f} pts/s, {_fmt_bytes(int(self._done_bytes / elapsed))}/s"
        points = f"{self._done_points:,}/{self._points:,} points"
        if self._bar is not None and self._task is not None:
            done = self._work(self._done_points, self._done_bytes)
            self._bar.update(self._task, completed=done, points=points, rate=rate)
            return
        total = self._work(self._points, self._bytes)
        done = self._work(self._done_points, self._done_bytes)
        left = elapsed * (total - done) / done if done > 0 else math.inf
        eta = f"{left:.0f}s left" if math.isfinite(left) else "--"
        self._drawn = True
        self.out.write(f"\r\x1b[K{self._label[:12]}  {points}  {_fmt_bytes(self._done_bytes)}  {rate}  {eta}")
        self.out.flush()

    def _clear(self) -> None:
        if self._bar is not None:
            if self._task is not None:
                self._bar.remove_task(self._task)
                self._task = None
                self._bar.stop()
        elif self._drawn:
            self._drawn = False
            self.out.write("\r\x1b[K")
            self.out.flush()


def _fmt_bytes(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    amount = float(n)
    unit = "B"
    for unit in ("kB", "MB", "GB"):  # noqa: B007 - the unit the loop stopped at is the one to print
        amount /= 1000
        if amount < 1000:
            break
    return f"{amount:.1f} {unit}"


# ---------------------------------------------------------------------------- the sync state of a run

STATE_FILE = ".steplog-sync.json"
"""Per run, in its folder: what each sync target acknowledged (MLflow ignores extra files in a run folder)."""
_STATE_VERSION = 1
_TAIL = 4096


class _Sidecar:
    """The sync state of every run of a database, in ``<db>.steplog-sync.json`` beside it (written atomically).

    ``{"version": 1, "runs": {local run id: {"version": 1, "targets": ...}}}``: each run's part is
    what a folder store keeps in the run's folder. A database has no run folders, and MLflow's
    schema is not steplog's to extend.
    """

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + STATE_FILE)
        self.runs = self._read()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return {}  # missing or unreadable: every key is checked against the server
        runs = data.get("runs") if isinstance(data, dict) and data.get("version") == _STATE_VERSION else None
        return runs if isinstance(runs, dict) else {}

    def update(self, run_id: str, target: str, mine: dict[str, Any]) -> None:
        """Record one run's state for one server, keeping what other syncs (other servers) wrote meanwhile.

        The file is re-read and replaced under an exclusive lock on the database's folder (a lock on the
        folder leaves no lock file behind and never touches the database, whose locks are SQLite's).
        """
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            runs = self._read()
            entry = runs.get(run_id)
            if not (isinstance(entry, dict) and isinstance(entry.get("targets"), dict)):
                entry = {"version": _STATE_VERSION, "targets": {}}
            entry["targets"][target] = mine
            runs[run_id] = entry
            data = {"version": _STATE_VERSION, "runs": runs}
            write_atomic(self.path, json.dumps(data, separators=(",", ":")).encode())
            self.runs = runs
        finally:
            os.close(fd)  # releases the lock


class _State:
    """One run's sync state for one server: per metric key what was acknowledged, per artifact its stamp.

    For a folder store a key's entry is the byte offset acknowledged in its metric file (and a
    fingerprint of the bytes before it); for a database, the number of rows acknowledged in
    logged order and the last of them.
    """

    def __init__(self, run_dir: Path, target: str, sidecar: _Sidecar | None = None, run_id: str = "") -> None:
        self.path = run_dir / STATE_FILE
        self.run_dir = run_dir
        self.target = target
        self.sidecar = sidecar
        self.run_id = run_id
        self.saved = True
        self.dirty = False
        """True when something changed since the state was read or saved."""
        self._all: dict[str, Any] = {}
        try:
            data = sidecar.runs.get(run_id) if sidecar is not None else json.loads(self.path.read_bytes())
            if (
                isinstance(data, dict)
                and data.get("version") == _STATE_VERSION
                and isinstance(data.get("targets"), dict)
            ):
                self._all = data
        except (OSError, ValueError):
            pass  # missing or unreadable: every key is checked against the server
        mine = self._all.get("targets", {}).get(target)
        self.mine: dict[str, Any] = mine if isinstance(mine, dict) else {}

    def for_run(self, server_run_id: str) -> None:
        """Forget what was recorded for another server run (the server lost it, or a new one was made)."""
        if self.mine.get("run_id") != server_run_id:
            self.mine = {"run_id": server_run_id, "metrics": {}, "artifacts": {}}
            self.dirty = True

    def metric(self, key: str) -> dict[str, Any] | None:
        entry = self.mine.get("metrics", {}).get(key)
        return entry if isinstance(entry, dict) else None

    def artifact(self, path: str) -> list[Any] | None:
        entry = self.mine.get("artifacts", {}).get(path)
        return entry if isinstance(entry, list) else None

    def set_metric(self, key: str, entry: dict[str, Any]) -> None:
        metrics = self.mine.setdefault("metrics", {})
        self.dirty = self.dirty or metrics.get(key) != entry
        metrics[key] = entry

    def set_artifact(self, path: str, stamp: list[Any]) -> None:
        artifacts = self.mine.setdefault("artifacts", {})
        self.dirty = self.dirty or artifacts.get(path) != stamp
        artifacts[path] = stamp

    def save(self) -> None:
        """Write the state atomically (temp file in the run folder, then rename); a failure only costs checks."""
        self._all = {"version": _STATE_VERSION, "targets": {**self._all.get("targets", {}), self.target: self.mine}}
        try:
            if self.sidecar is not None:
                self.sidecar.update(self.run_id, self.target, self.mine)
            else:
                write_atomic(self.path, json.dumps(self._all, separators=(",", ":")).encode(), temp_dir=self.run_dir)
        except OSError:
            self.saved = False
        else:
            self.dirty = False


def _fingerprint(path: Path, offset: int) -> tuple[int, int, int] | None:
    """``(device, inode, crc32 of the bytes before offset)``: tells an appended file from a rewritten one."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            start = max(0, offset - _TAIL)
            f.seek(start)
            tail = f.read(offset - start)
    except OSError:
        return None
    if len(tail) != offset - start:
        return None
    return st.st_dev, st.st_ino, zlib.crc32(tail)


def _point_key(ts: int, value: float, step: int) -> tuple[int, int, str]:
    """A point as the server stores it: NaN as text, infinities clamped to the largest double, -0.0 as 0.0."""
    if math.isnan(value):
        text = "nan"
    elif math.isinf(value):
        text = repr(math.copysign(1.7976931348623157e308, value))
    else:
        text = repr(value + 0.0)
    return ts, step, text


# ---------------------------------------------------------------------------- one run


_API = "/api/2.0/mlflow"


async def _server_run(client: RestClient, run_id: str, deadline: float, what: str) -> dict[str, Any] | None:
    """The server's run (info and data), or None if it has no such run."""
    from .._errors import ServerError

    async def get() -> dict[str, Any] | None:
        try:
            response = await client.request("GET", f"{_API}/runs/get", params={"run_id": run_id})
        except ServerError as exc:
            if exc.status == 404:
                return None
            raise
        run = _json_object(response, "runs/get").get("run")
        if not isinstance(run, dict) or not isinstance(run.get("info"), dict):
            raise StepLogError(f"{client.display_uri} answered runs/get without a run: not an MLflow server?")
        return run

    return await client.retrying(get, deadline=deadline, what=what)


def _json_object(response: Any, endpoint: str) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise StepLogError(f"the server answered {endpoint} with something that is not MLflow's JSON")
    return data


def _pairs(items: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and isinstance(item.get("key"), str):
            out[item["key"]] = str(item.get("value", ""))
    return out


async def _server_history(
    client: RestClient, run_id: str, key: str, deadline: float, what: str
) -> set[tuple[int, int, str]]:
    """Every point of ``key`` the server's run holds (for a key whose sync state is missing or stale)."""
    out: set[tuple[int, int, str]] = set()
    token: str | None = None
    tokens: set[str] = set()
    while True:
        params = {"run_id": run_id, "metric_key": key, "max_results": 25000, **({"page_token": token} if token else {})}
        response = await client.retrying(
            partial(client.request, "GET", f"{_API}/metrics/get-history", params=params), deadline=deadline, what=what
        )
        page = _json_object(response, "metrics/get-history")
        for point in page.get("metrics") or []:
            try:
                value = point["value"]
                value = float(value.replace("Infinity", "inf")) if isinstance(value, str) else float(value)
                out.add(_point_key(int(point["timestamp"]), value, int(point.get("step", 0))))
            except (KeyError, TypeError, ValueError, AttributeError):
                raise StepLogError(f"the server answered a malformed point of {key!r}: not MLflow's format") from None
        token = page.get("next_page_token") or None
        if token is None:
            return out
        if not isinstance(token, str) or token in tokens:
            raise StepLogError("the server repeated a page token of metrics/get-history")
        tokens.add(token)


async def _server_artifacts(client: RestClient, run_id: str, deadline: float, what: str) -> dict[str, int | None]:
    """``{path: size}`` of every artifact file the server holds for the run."""
    out: dict[str, int | None] = {}
    folders, seen = [""], set()
    while folders:
        folder = folders.pop()
        if folder in seen:
            continue
        seen.add(folder)
        params = {"run_id": run_id, **({"path": folder} if folder else {})}
        response = await client.retrying(
            partial(client.request, "GET", f"{_API}/artifacts/list", params=params), deadline=deadline, what=what
        )
        for entry in _json_object(response, "artifacts/list").get("files") or []:
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                continue
            if entry.get("is_dir"):
                folders.append(entry["path"])
            else:
                size = entry.get("file_size")
                out[entry["path"]] = int(size) if isinstance(size, int | str) and str(size).isdigit() else None
    return out


def _local_artifacts(run: Any) -> list[tuple[Path, str]]:
    """``(file, artifact path)`` of each local artifact file, leaving out interrupted copies' leftovers."""
    if not (run.artifact_uri.startswith("file:") or "://" not in run.artifact_uri):
        return []
    folder = uri_to_path(run.artifact_uri) if run.artifact_uri else run.path / "artifacts"
    if not folder.is_dir():
        return []
    stem = TMP_PREFIX.rstrip("-")
    out: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(stem) and d != ".steplog-staging")
        for name in sorted(filenames):
            if not name.startswith(stem):
                path = Path(dirpath, name)
                out.append((path, path.relative_to(folder).as_posix()))
    return out


@dataclasses.dataclass(slots=True)
class _KeyPlan:
    key: str
    items: list[Any]
    """``[ts, value, step, ...]`` to send."""
    entry: dict[str, Any]
    """The state entry to commit once the server acknowledged them."""


async def _sync_run(
    client: RestClient,
    run: Any,
    experiment_id: str,
    timeout: float,
    progress: Progress,
    store: Store | None = None,
    sidecar: _Sidecar | None = None,
) -> SyncResult:
    """Bring one run up to date on the server; ``store`` reads the metrics of a run without metric files."""
    from ..sinks.mlflow_rest import RUN_KEY_TAG, encode_log_batches

    what = f"uploading run {run.run_id}"
    deadline = _deadline(timeout)
    state = _State(run.path, client.display_uri, sidecar, run.run_id)
    known = state.mine.get("run_id")  # the server's id for this run, as an earlier sync recorded it
    server = None
    if isinstance(known, str) and known and known != run.run_id:
        server = await _server_run(client, known, deadline, what)
        if server is not None and _pairs((server.get("data") or {}).get("tags")).get(RUN_KEY_TAG) != run.run_id:
            server = None  # not the run we made for this one (a state file copied along with the store?)
    if server is None:
        server = await _server_run(client, run.run_id, deadline, what)
    created = False
    if server is None:
        found = await client.retrying(lambda: client.find_run(experiment_id, run.run_id), deadline=deadline, what=what)
        if found is not None:
            server = await _server_run(client, str(found["run_id"]), deadline, what)
    if server is None:
        tags = {k: v for k, v in run.tags.items() if k != RUN_KEY_TAG}
        name = run.run_name or tags.get("mlflow.runName") or run.run_id
        tags["mlflow.runName"] = name
        info = await client.create_run(
            experiment_id,
            run_name=name,
            user_id=run.user_id,
            start_time=int(run.start_time or 0),
            tags=tags,
            run_key=run.run_id,
            deadline=_deadline(timeout),
        )
        server = {"info": info, "data": {"tags": [{"key": k, "value": v} for k, v in tags.items()]}}
        created = True
    info = server["info"]
    data: dict[str, Any] = server["data"] if isinstance(server.get("data"), dict) else {}
    run_id = str(info.get("run_id") or info.get("run_uuid") or "")
    if not run_id:
        raise StepLogError(f"{client.display_uri} answered a run without an id: not an MLflow server?")
    state.for_run(run_id)

    # params and tags the server lacks (a param with another value is sent too: the server refuses the conflict)
    server_params, server_tags = _pairs(data.get("params")), _pairs(data.get("tags"))
    params = sorted((k, v) for k, v in run.params.items() if server_params.get(k) != v)
    tags_to_send = sorted((k, v) for k, v in run.tags.items() if k != RUN_KEY_TAG and server_tags.get(k) != v)
    server_keys = {m.get("key") for m in data.get("metrics") or [] if isinstance(m, dict)}

    plans: list[_KeyPlan] = []
    if store is not None:
        for key in await anyio.to_thread.run_sync(store.metric_keys, run.run_id):
            rows = await anyio.to_thread.run_sync(store.metric_history, run, key)
            plan = await _plan_rows(client, state, run_id, rows, key in server_keys, deadline, what)
            if plan is not None:
                plans.append(plan)
    else:
        for key, file in sorted(iter_files(run.path / "metrics")) if (run.path / "metrics").is_dir() else []:
            if file.name.startswith(TMP_PREFIX):
                continue
            plan = await _plan_key(client, state, run_id, key, file, key in server_keys, deadline, what)
            if plan is not None:
                plans.append(plan)
    points = sum(len(p.items) // 3 for p in plans)

    artifacts = _local_artifacts(run)
    uploads: list[tuple[Path, str, list[Any]]] = []
    if artifacts:
        on_server = None
        for file, rel in artifacts:
            st = file.stat()
            stamp = [st.st_size, st.st_mtime_ns]
            if state.artifact(rel) == stamp and not created:
                continue  # sent as it is now
            if on_server is None:
                on_server = {} if created else await _server_artifacts(client, run_id, deadline, what)
            if state.artifact(rel) is None and on_server.get(rel) == st.st_size:
                state.set_artifact(rel, stamp)  # there already (an earlier sync whose state was lost)
                continue
            uploads.append((file, rel, stamp))
    artifact_bytes = sum(stamp[0] for _f, _r, stamp in uploads)

    progress.run_started(run.run_id, points, artifact_bytes)
    sent_bytes = 0
    if plans:  # in flight before sending: a crash from here on makes the next sync check these keys on the server
        for plan in plans:
            state.set_metric(plan.key, {**plan.entry, "pending": True})
        state.save()
    bodies = encode_log_batches(run_id, [(p.key, p.items) for p in plans], params, tags_to_send)
    for body, n in bodies:
        await client.retrying(partial(client.log_batch, body), deadline=_deadline(timeout), what=what)
        sent_bytes += len(body)
        progress.advance(n, len(body))
    for plan in plans:
        state.set_metric(plan.key, plan.entry)
    for file, rel, stamp in uploads:
        data_bytes = await anyio.Path(file).read_bytes()
        await client.retrying(
            partial(client.upload_artifact, str(info.get("artifact_uri") or ""), rel, data_bytes),
            deadline=_deadline(timeout),
            what=f"uploading artifact {rel}",
        )
        state.set_artifact(rel, stamp)
        sent_bytes += len(data_bytes)
        progress.advance(0, len(data_bytes))
    if run.status.name != "RUNNING" and run.end_time is not None:
        status, end_time = run.status.name, int(run.end_time)
        if info.get("status") != status or _int(info.get("end_time")) != end_time:
            await client.retrying(
                lambda: client.update_run(run_id, status, end_time), deadline=_deadline(timeout), what=what
            )
    if state.dirty:
        state.save()
    return SyncResult(
        run.run_id,
        run_id,
        str(info.get("experiment_id") or experiment_id),
        points,
        len(params),
        len(tags_to_send),
        len(uploads),
        created,
        bytes=sent_bytes,
        state_saved=state.saved,
    )


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


async def _plan_key(
    client: RestClient,
    state: _State,
    run_id: str,
    key: str,
    file: Path,
    on_server: bool,
    deadline: float,
    what: str,
) -> _KeyPlan | None:
    """The points of ``key`` the server lacks, from the state's offset when it holds, else by asking the server."""
    try:
        data = await anyio.Path(file).read_bytes()
    except OSError as exc:
        raise StepLogError(f"cannot read {file}: {exc.strerror or exc}") from exc
    end = data.rfind(b"\n") + 1  # a live writer's incomplete last line waits for the next sync
    entry = state.metric(key)
    start = None
    if entry is not None and not entry.get("pending") and on_server:
        offset = entry.get("offset")
        if isinstance(offset, int) and 0 < offset <= end:
            fingerprint = _fingerprint(file, offset)
            if fingerprint is not None and list(fingerprint) == entry.get("fingerprint"):
                start = offset
    if start == end:
        return None  # nothing appended since the last sync
    steps, values, stamps, _bad = parse_metric_lines(data[start or 0 : end])
    items: list[Any] = []
    if start is None and on_server:  # no trustworthy state: send only the points the server does not hold
        held = await _server_history(client, run_id, key, deadline, what)
        for step, value, ts in zip(steps, values, stamps, strict=True):
            point = _point_key(ts, value, step)
            if point not in held:
                held.add(point)  # a point twice in the file is sent once
                items += (ts, value, step)
    else:
        for step, value, ts in zip(steps, values, stamps, strict=True):
            items += (ts, value, step)
    fingerprint = _fingerprint(file, end)
    new_entry = {"offset": end, "fingerprint": None if fingerprint is None else list(fingerprint)}
    if not items:
        state.set_metric(key, new_entry)
        return None
    return _KeyPlan(key, items, new_entry)


async def _plan_rows(
    client: RestClient,
    state: _State,
    run_id: str,
    history: History,
    on_server: bool,
    deadline: float,
    what: str,
) -> _KeyPlan | None:
    """The points of a database's key the server lacks: the rows after the count acknowledged, if it holds.

    A database only appends a run's metric rows, so the first ``count`` rows in logged order are
    the ones acknowledged; when the row at ``count - 1`` is no longer the one recorded (the
    database was replaced or rewritten), or the state is missing or in flight, the server's
    history decides instead.
    """
    key, end = history.key, len(history)
    entry = state.metric(key)
    start = None
    if entry is not None and not entry.get("pending") and on_server:
        count = entry.get("count")
        if isinstance(count, int) and 0 < count <= end and entry.get("last") == _row_key(history, count - 1):
            start = count
    if start == end:
        return None  # nothing added since the last sync
    new_entry = {"count": end, "last": _row_key(history, end - 1) if end else None}
    items: list[Any] = []
    rows = range(start or 0, end)
    if start is None and on_server:  # no trustworthy state: send only the points the server does not hold
        held = await _server_history(client, run_id, key, deadline, what)
        for i in rows:
            point = _point_key(history.timestamps[i], history.values[i], history.steps[i])
            if point not in held:
                held.add(point)
                items += (history.timestamps[i], history.values[i], history.steps[i])
    else:
        for i in rows:
            items += (history.timestamps[i], history.values[i], history.steps[i])
    if not items:
        state.set_metric(key, new_entry)
        return None
    return _KeyPlan(key, items, new_entry)


def _row_key(history: History, i: int) -> list[Any]:
    return list(_point_key(history.timestamps[i], history.values[i], history.steps[i]))


async def _upload_tree(client: RestClient, artifact_uri: str, source: Path, artifact_path: str, timeout: float) -> int:
    """Upload a file (or each file of a directory) under ``artifact_path``; returns the number of files."""
    from ..sinks.mlflow_rest import artifact_files

    files = await anyio.to_thread.run_sync(artifact_files, source, artifact_path)
    for file, dest in files:
        data = await anyio.Path(file).read_bytes()
        await client.retrying(
            partial(client.upload_artifact, artifact_uri, dest, data),
            deadline=_deadline(timeout),
            what=f"uploading artifact {dest}",
        )
    return len(files)


def _orjson_dumps(obj: Any) -> bytes:
    import orjson

    return orjson.dumps(obj)


# ---------------------------------------------------------------------------- the command


def register(subparsers: Any) -> None:
    """Add ``steplog sync`` to the command line."""
    parser = subparsers.add_parser(
        "sync",
        help="upload a local store (mlruns or sqlite:///...) or an outage journal to an MLflow tracking server",
        description=(
            "Upload a local mlruns store, MLflow's SQLite database (sqlite:///path.db), a run's outage journal, "
            "or a folder of journals to an MLflow tracking server. Incremental: only what the server lacks is "
            "sent, and what was sent is remembered in .steplog-sync.json (in each run's folder; beside a "
            "database, <db>.steplog-sync.json). Safe to run again: each point, param and tag is stored once. "
            "On a terminal it shows progress; into a pipe, one line per run."
        ),
    )
    parser.add_argument(
        "source", help="an mlruns directory, sqlite:///path.db, a journal folder, or a folder of journals"
    )
    parser.add_argument("--to", required=True, metavar="URL", help="the tracking server, http(s)://host:port")
    parser.add_argument("--experiment", help="only this experiment (name or id; store sources)")
    parser.add_argument(
        "--run",
        dest="run_ids",
        action="append",
        metavar="RUN_ID",
        help="only this run: an id, a unique prefix, or latest (repeatable; store sources)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds a request may keep failing before giving up (60)"
    )
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    from . import CommandError

    if not args.to.lower().startswith(("http://", "https://")):
        raise CommandError(f"--to {args.to!r} is not a tracking server URL: give http(s)://host:port")
    from ..sinks.mlflow_rest import redact

    target = redact(args.to)
    progress = TerminalProgress(target) if sys.stdout.isatty() else LineProgress(target)
    try:
        results = anyio.run(
            lambda: sync(
                args.source,
                args.to,
                experiment=args.experiment,
                run_ids=args.run_ids,
                timeout=args.timeout,
                progress=progress,
            )
        )
    finally:
        progress.close()
    if not results:
        print(f"nothing to upload from {args.source}")
    return 0
